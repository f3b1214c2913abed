//! MnistNet inference: the converted int8 model vs the same model in float with BN folded
//! (`fuse_modules`), batch 1 and 64, in the same run. Threads: `RAYON_NUM_THREADS`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use criterion::{criterion_group, criterion_main, Criterion};

#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
use mnist_net::MnistNet;

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

fn bench(c: &mut Criterion) {
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into());
    let Ok((float, int8)) = models() else {
        eprintln!("model setup failed");
        return;
    };
    for batch in [1usize, 64] {
        let mut g = c.benchmark_group(format!("mnist_inference/threads={threads}/batch={batch}"));
        g.sample_size(20);
        let Ok(x) = Tensor::randn(0f32, 1., (batch, 1, 28, 28), &Device::Cpu) else {
            continue;
        };
        for (name, m) in [("float_bn_folded", &float), ("int8", &int8)] {
            g.bench_function(name, |b| {
                b.iter(|| {
                    if let Err(e) = m.forward(&x) {
                        eprintln!("forward failed: {e}");
                    }
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
