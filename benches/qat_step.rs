//! MnistNet at batch 64, in one run:
//!
//! - `step/*`: one training step (forward, cross-entropy, backward, SGD step) of the same
//!   architecture built three ways: candle-nn's own layers (`candle_nn`), ours in float
//!   (`float`), and ours fused + prepared for QAT with the x86 preset (`qat_x86`);
//! - `fwd_train_b{64,1}/*`, `fwd_eval_b{64,1}/*`: the forward pass alone (train mode, as in
//!   the step, and eval mode), batch 64 and batch 1, float and QAT.
//!
//! Threads: one count per run, `RAYON_NUM_THREADS` (default: candle's, the physical cores),
//! pinned for every pool the variants use (`common/threads.rs`): each measured call runs
//! inside a rayon pool of that many threads (our kernels and candle-nn's conv2d and matmul
//! split their work on it), and candle's elementwise pool (candle-nn's bias adds, ReLUs and
//! BatchNorm, autograd's gradient sums, the SGD update) is sized to the same count. Run it
//! with 1 and 2. Every step and forward fails the bench (panics) on an error, the first one
//! in criterion's warm-up, before anything is timed. The binary uses mimalloc as its global allocator (measured faster than the
//! system allocator on the step, see below); build it with `QAT_BENCH_ALLOC=system` to
//! measure the system allocator instead (the library itself is allocator-neutral).

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Duration;

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
use mnist_net::MnistNet;

/// The allocator, chosen when the binary is built (`QAT_BENCH_ALLOC=system` for the system
/// allocator, mimalloc otherwise).
const USE_MIMALLOC: bool = match option_env!("QAT_BENCH_ALLOC") {
    Some(s) => !str_eq(s, "system"),
    None => true,
};

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

struct BenchAlloc;

// SAFETY: forwards every call to one allocator, fixed at compile time.
unsafe impl GlobalAlloc for BenchAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if USE_MIMALLOC {
            mimalloc::MiMalloc.alloc(l)
        } else {
            System.alloc(l)
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if USE_MIMALLOC {
            mimalloc::MiMalloc.dealloc(p, l)
        } else {
            System.dealloc(p, l)
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if USE_MIMALLOC {
            mimalloc::MiMalloc.alloc_zeroed(l)
        } else {
            System.alloc_zeroed(l)
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if USE_MIMALLOC {
            mimalloc::MiMalloc.realloc(p, l, n)
        } else {
            System.realloc(p, l, n)
        }
    }
}

#[global_allocator]
static GLOBAL: BenchAlloc = BenchAlloc;

/// MnistNet from candle-nn's layers: conv2d, batch_norm, linear (same shapes and order).
struct CandleNet {
    convs: Vec<(candle_nn::Conv2d, candle_nn::BatchNorm)>,
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
}

impl CandleNet {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let mut convs = Vec::new();
        for (i, (cin, cout, stride)) in [(1, 16, 1), (16, 32, 2), (32, 64, 2)]
            .into_iter()
            .enumerate()
        {
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            let conv = candle_nn::conv2d(cin, cout, 3, cfg, vb.pp(format!("conv{}", i + 1)))?;
            let bn = candle_nn::batch_norm(cout, 1e-5, vb.pp(format!("bn{}", i + 1)))?;
            convs.push((conv, bn));
        }
        Ok(CandleNet {
            convs,
            fc1: candle_nn::linear(3136, 128, vb.pp("fc1"))?,
            fc2: candle_nn::linear(128, 10, vb.pp("fc2"))?,
        })
    }
}

impl Module for CandleNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (conv, bn) in &self.convs {
            x = bn.forward_t(&conv.forward(&x)?, true)?.relu()?;
        }
        let x = self.fc1.forward(&x.flatten_from(1)?)?.relu()?;
        self.fc2.forward(&x)
    }
}

fn data(batch: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &dev)?;
    let y = (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>();
    Ok((x, Tensor::from_vec(y, batch, &dev)?))
}

fn ours(qat: bool) -> candle_qat::Result<(MnistNet, SGD)> {
    let varmap = VarMap::new();
    let mut model = MnistNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    train(&mut model)?;
    if qat {
        fuse_modules_qat(&mut model)?;
        prepare_qat(
            &mut model,
            &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
        )?;
    }
    let opt = SGD::new(varmap.all_vars(), 0.01)?;
    Ok((model, opt))
}

fn candle_nn_model() -> candle_core::Result<(CandleNet, SGD)> {
    let varmap = VarMap::new();
    let model = CandleNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let opt = SGD::new(varmap.all_vars(), 0.01)?;
    Ok((model, opt))
}

fn step(
    model: &(dyn Module + Sync),
    opt: &mut SGD,
    x: &Tensor,
    y: &Tensor,
) -> candle_core::Result<()> {
    let l = loss::cross_entropy(&model.forward(x)?, y)?;
    opt.backward_step(&l)
}

#[path = "../examples/common/alloc.rs"]
mod alloc;

#[path = "common/threads.rs"]
mod threads;

fn bench(c: &mut Criterion) {
    if USE_MIMALLOC {
        alloc::keep_freed_memory();
        assert_eq!(alloc::purge_delay(), -1, "mimalloc's purge delay option");
    }
    // As the examples run (`examples/common/trainer.rs`, `thread_pool`): every measured call on
    // a worker of the pool, candle's elementwise pool not spinning between ops.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let threads = threads::from_env();
    let pool = threads::pin(threads);
    let alloc = if USE_MIMALLOC { "mimalloc" } else { "system" };
    let mut g = c.benchmark_group(format!("qat_step/threads={threads}/{alloc}"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let (x64, y64) = data(64).expect("data");
    let (x1, _) = data(1).expect("data");

    match candle_nn_model() {
        Ok((model, mut opt)) => g.bench_function("step/candle_nn", |b| {
            b.iter(|| pool.install(|| step(&model, &mut opt, &x64, &y64).expect("candle-nn step")))
        }),
        Err(e) => panic!("candle-nn setup failed: {e}"),
    };
    for (name, qat) in [("float", false), ("qat_x86", true)] {
        let (mut model, mut opt) = ours(qat).unwrap_or_else(|e| panic!("setup {name}: {e}"));
        g.bench_function(format!("step/{name}"), |b| {
            b.iter(|| pool.install(|| step(&model, &mut opt, &x64, &y64).expect("step")))
        });
        for (batch, x) in [(64, &x64), (1, &x1)] {
            g.bench_function(format!("fwd_train_b{batch}/{name}"), |b| {
                b.iter(|| pool.install(|| model.forward(x).expect("forward")))
            });
        }
        eval(&mut model).expect("eval");
        for (batch, x) in [(64, &x64), (1, &x1)] {
            g.bench_function(format!("fwd_eval_b{batch}/{name}"), |b| {
                b.iter(|| pool.install(|| model.forward(x).expect("forward")))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
