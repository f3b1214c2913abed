//! One training step of one block of the tiny-shakespeare Llama (examples/common/tiny_llama.rs:
//! RmsNorm -> rotary attention 4 x 32 -> residual, RmsNorm -> SwiGLU 128 -> 352 -> 128 ->
//! residual) on x of shape (32, 64, 128) that needs its gradient, loss = mean(out^2),
//! AdamW (lr 3e-4, weight decay 0.1) over the block's parameters — the step of
//! `benches/reference/llama_block_step.py`, which times PyTorch 2.15 float and torchao 0.18's
//! 8da4w QAT on the same block. Variants, in one run:
//!
//! - `float`: the block as built;
//! - `8da4w`: prepared with `QConfig::int8_dynamic_activation_int4_weight(32)` (every Linear's
//!   input int8 per token, weight int4 per group of 32), torchao's QATConfig 8da4w;
//! - `q4_0`: prepared with `QConfig::ggml(BlockType::Q4_0)` (weights in Q4_0 blocks, inputs in
//!   Q8_0 blocks, as candle's quantized runtime computes).
//!
//! Threads: `RAYON_NUM_THREADS` (one count per run, every pool pinned: common/threads.rs).
//! The allocator is mimalloc keeping freed memory (common/alloc.rs), as the examples run: a
//! step frees and reallocates the same activation-sized buffers, which glibc's malloc hands
//! back to the OS and page-faults in again (PyTorch keeps them in its caching allocator).
//! Every step fails the bench on an error, in criterion's warm-up.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_qat::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../examples/common/tiny_llama.rs"]
mod tiny_llama;
use tiny_llama::{Block, TinyLlamaConfig};

#[path = "common/threads.rs"]
mod threads;

#[path = "../examples/common/alloc.rs"]
mod alloc;

const BATCH: usize = 32;

/// A block with its rotary tables, optimizer and input (attention causal).
struct Step {
    block: Block,
    cos: Tensor,
    sin: Tensor,
    opt: AdamW,
    x: Var,
}

impl Step {
    fn new(qconfig: Option<QConfig>) -> candle_qat::Result<Self> {
        let cfg = TinyLlamaConfig::shakespeare();
        let vm = VarMap::new();
        let dev = Device::Cpu;
        let mut block = Block::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        if let Some(qc) = qconfig {
            prepare_qat(&mut block, &QConfigMapping::global(qc))?;
        }
        let (cos, sin) = tiny_llama::rope_tables(&cfg, DType::F32, &dev)?;
        let opt = AdamW::new(
            vm.all_vars(),
            ParamsAdamW {
                lr: 3e-4,
                weight_decay: 0.1,
                ..Default::default()
            },
        )?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (BATCH, cfg.ctx, cfg.dim), &dev)?)?;
        Ok(Step {
            block,
            cos,
            sin,
            opt,
            x,
        })
    }

    fn run(&mut self) -> candle_core::Result<()> {
        let y = self
            .block
            .forward(self.x.as_tensor(), &self.cos, &self.sin, true)?;
        let loss = y.sqr()?.mean_all()?;
        self.opt.backward_step(&loss)
    }
}

fn bench(c: &mut Criterion) {
    alloc::keep_freed_memory();
    let threads = threads::from_env();
    let pool = threads::pin(threads);
    let mut g = c.benchmark_group(format!("llama_step/threads={threads}"));
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    let variants: [(&str, Option<QConfig>); 3] = [
        ("float", None),
        (
            "8da4w",
            Some(QConfig::int8_dynamic_activation_int4_weight(32).expect("8da4w preset")),
        ),
        ("q4_0", Some(QConfig::ggml(BlockType::Q4_0))),
    ];
    for (name, qc) in variants {
        let mut s = Step::new(qc).expect("build the block");
        g.bench_function(name, |b| {
            b.iter(|| pool.install(|| s.run()).expect("a training step"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
