//! MnistNet inference: the converted int8 model vs the same model in float with BN folded
//! (`fuse_modules`), batch 1 and 64, in the same run.
//!
//! Threads: one count per run, `RAYON_NUM_THREADS` (default: candle's, the physical cores),
//! pinned for every pool the two variants use (`common/threads.rs`): each measured forward
//! runs inside a rayon pool of that many threads (our int8 kernels and candle's conv2d and
//! matmul split their work on it, the matmul into that many parts), and candle's elementwise
//! pool (the float model's bias adds and ReLUs) is sized to the same count. Run it with 1
//! and 2.
//!
//! Setup and every forward are checked once before anything is timed (the outputs must be
//! finite logits of shape (batch, 10)); a forward that fails while timed aborts the bench.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use criterion::{criterion_group, Criterion};

#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
use mnist_net::MnistNet;

#[path = "common/threads.rs"]
mod threads;

fn models() -> candle_qat::Result<(MnistNet, MnistNet)> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let base = MnistNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let mut float = base.clone();
    eval(&mut float)?;
    fuse_modules(&mut float)?;
    let mut int8 = base;
    train(&mut int8)?;
    fuse_modules_qat(&mut int8)?;
    prepare_qat(
        &mut int8,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
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
fn checked_forward(name: &str, m: &MnistNet, x: &Tensor) -> Tensor {
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

fn bench(c: &mut Criterion, threads: usize, pool: &rayon::ThreadPool) {
    let (float, int8) = pool
        .install(models)
        .unwrap_or_else(|e| panic!("model setup failed: {e}"));
    for batch in [1usize, 64] {
        let mut g = c.benchmark_group(format!("mnist_inference/threads={threads}/batch={batch}"));
        g.sample_size(20);
        let x = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &Device::Cpu)
            .unwrap_or_else(|e| panic!("input of batch {batch}: {e}"));
        for (name, m) in [("float_bn_folded", &float), ("int8", &int8)] {
            pool.install(|| checked_forward(name, m, &x));
            g.bench_function(name, |b| {
                b.iter(|| {
                    pool.install(|| {
                        m.forward(&x)
                            .unwrap_or_else(|e| panic!("{name}: forward failed: {e}"))
                    })
                })
            });
        }
        g.finish();
    }
}

fn run(c: &mut Criterion) {
    let n = threads::from_env();
    let pool = threads::pin(n);
    bench(c, n, &pool);
}

criterion_group!(benches, run);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
