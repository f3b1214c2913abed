//! Int8 inference of the converted MnistNet and residual net (the models the ONNX export test
//! writes, x86 preset) vs the same models in float with BN folded (`fuse_modules`), batch 1
//! and 64, in the same run. `benches/reference/onnxruntime_int8.py` times onnxruntime on the
//! exported files over the same grid.
//!
//! Threads: one count per run, `RAYON_NUM_THREADS` (default: candle's, the physical cores),
//! pinned for every pool the variants use (`common/threads.rs`). The measuring thread is
//! itself one of the rayon pool's threads (`threads::pin_current`), as onnxruntime's calling
//! thread is one of its `intra_op_num_threads`: a forward at 1 thread runs entirely on the
//! calling thread, and no measured call pays for waking another thread to hand it the work.
//! Our int8 kernels and candle's conv2d and matmul split their work on that pool, and
//! candle's elementwise pool (the float model's bias adds and ReLUs) is sized to the same
//! count. Run it with 1 and 2.
//!
//! The allocator is mimalloc, as in the examples and the training-step bench
//! (`examples/common/alloc.rs`).
//!
//! `QAT_BENCH_PLAIN=1` replaces criterion's sampling by the statistic of
//! `benches/reference/onnxruntime_int8.py`: per cell, 10 warm-up forwards, then the median
//! (and range) of 41 timed ones, printed one line per cell, so that the two sides can be
//! interleaved and compared measured the same way (`benches/reference/int8_vs_onnxruntime.sh`).
//!
//! Setup and every forward are checked once before anything is timed (the outputs must be
//! finite logits of shape (batch, 10)); a forward that fails while timed aborts the bench.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use criterion::{criterion_group, Criterion};

#[path = "../examples/common/alloc.rs"]
mod alloc;
#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
#[path = "../examples/common/residual_net.rs"]
mod residual_net;
use mnist_net::MnistNet;
use residual_net::ResNet;

#[path = "common/threads.rs"]
mod threads;

/// A float model (BN folded) and its converted int8 twin, built from the same random
/// weights: QAT-prepared with `mapping`, observers run on 3 batches, then frozen and
/// converted.
fn models<M: Quantizable + Module + Clone>(
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
    mapping: &QConfigMapping,
) -> candle_qat::Result<(M, M)> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let base = build(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut float = base.clone();
    eval(&mut float)?;
    fuse_modules(&mut float)?;
    let mut int8 = base;
    train(&mut int8)?;
    fuse_modules_qat(&mut int8)?;
    prepare_qat(&mut int8, mapping)?;
    for _ in 0..3 {
        int8.forward(&Tensor::randn(0f32, 1., (32, 1, 28, 28), &dev)?)?;
    }
    disable_observer(&mut int8)?;
    freeze_bn_stats(&mut int8)?;
    eval(&mut int8)?;
    int8.forward(&Tensor::randn(0f32, 1., (2, 1, 28, 28), &dev)?)?;
    convert(&mut int8)?;
    Ok((float, int8))
}

/// One forward, checked: finite logits of shape `(batch, 10)`.
fn checked_forward<M: Module>(name: &str, m: &M, x: &Tensor) -> Tensor {
    let y = m
        .forward(x)
        .unwrap_or_else(|e| panic!("{name}: forward failed: {e}"));
    let batch = x.dim(0).expect("batch dim");
    assert_eq!(y.dims(), [batch, 10], "{name}: logits shape");
    let v: Vec<f32> = y
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .unwrap_or_else(|e| panic!("{name}: reading the logits: {e}"));
    assert!(v.iter().all(|l| l.is_finite()), "{name}: non-finite logits");
    y
}

/// Warm-up forwards and timed forwards per cell in the plain mode (as the onnxruntime script).
const PLAIN_WARMUP: usize = 10;
const PLAIN_RUNS: usize = 41;

/// The plain mode's cell: median, min and max of `PLAIN_RUNS` forwards, in microseconds.
fn plain_cell<M: Module>(name: &str, m: &M, x: &Tensor) -> (f64, f64, f64) {
    let run = || {
        m.forward(x)
            .unwrap_or_else(|e| panic!("{name}: forward failed: {e}"))
    };
    for _ in 0..PLAIN_WARMUP {
        run();
    }
    let mut ts: Vec<f64> = (0..PLAIN_RUNS)
        .map(|_| {
            let t = std::time::Instant::now();
            criterion::black_box(run());
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    (ts[PLAIN_RUNS / 2], ts[0], ts[PLAIN_RUNS - 1])
}

fn plain_model<M: Module>(model: &str, threads: usize, float: &M, int8: &M) {
    for batch in [1usize, 64] {
        let x = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &Device::Cpu)
            .unwrap_or_else(|e| panic!("input of batch {batch}: {e}"));
        for (name, m) in [("float_bn_folded", float), ("int8", int8)] {
            checked_forward(name, m, &x);
            let (med, lo, hi) = plain_cell(name, m, &x);
            println!(
                "ours {model} {name} threads={threads} batch={batch}: {med:.1} ({lo:.1}-{hi:.1})"
            );
        }
    }
}

fn bench_model<M: Module>(c: &mut Criterion, model: &str, threads: usize, float: &M, int8: &M) {
    for batch in [1usize, 64] {
        let mut g = c.benchmark_group(format!("{model}_inference/threads={threads}/batch={batch}"));
        g.sample_size(41);
        let x = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &Device::Cpu)
            .unwrap_or_else(|e| panic!("input of batch {batch}: {e}"));
        for (name, m) in [("float_bn_folded", float), ("int8", int8)] {
            checked_forward(name, m, &x);
            g.bench_function(name, |b| {
                b.iter(|| {
                    m.forward(&x)
                        .unwrap_or_else(|e| panic!("{model} {name}: forward failed: {e}"))
                })
            });
        }
        g.finish();
    }
}

fn run(c: &mut Criterion) {
    alloc::keep_freed_memory();
    let n = threads::from_env();
    // The measuring thread joins the pool: every rayon call below runs in it.
    let _pool = threads::pin_current(n);
    let x86 = QConfigMapping::global(QConfig::default_qat(Backend::X86));
    let (float, int8) =
        models(MnistNet::new, &x86).unwrap_or_else(|e| panic!("MnistNet setup failed: {e}"));
    let plain = std::env::var_os("QAT_BENCH_PLAIN").is_some();
    if plain {
        plain_model("mnist", n, &float, &int8);
    } else {
        bench_model(c, "mnist", n, &float, &int8);
    }
    let mapping = residual_net::qconfig_mapping(Backend::X86)
        .unwrap_or_else(|e| panic!("residual qconfigs: {e}"));
    let (float, int8) =
        models(ResNet::new, &mapping).unwrap_or_else(|e| panic!("ResNet setup failed: {e}"));
    if plain {
        plain_model("residual", n, &float, &int8);
    } else {
        bench_model(c, "residual", n, &float, &int8);
    }
}

criterion_group!(benches, run);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
