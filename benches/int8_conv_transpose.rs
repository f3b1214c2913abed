//! A converted (int8) ConvTranspose2d layer beside candle's f32 `conv_transpose2d` on the same
//! shapes, our f32 ConvTranspose2d layer (the direct formulation the QAT forward runs), and a
//! `Tensor::copy` of the u8 input, in the same run.
//!
//! Shapes: batch 8, 32 -> 16 channels, 14x14 -> 28x28, as a decoder's upsampling step:
//! `k3_s2` (3x3, stride 2, padding 1, output_padding 1) and `k2_s2` (2x2, stride 2, U-Net's).
//! The int8 layer computes the stride² zero taps of its dilated input (exact, not skipped).
//! Compare the variants of one run (ratios); absolute times follow the machine's load.
//!
//! Run with `cargo bench --bench int8_conv_transpose`.

use std::hint::black_box;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::nn::{ConvTranspose2d, ConvTransposeConfig, DeQuantStub, QuantStub};
use candle_qat::passes::{convert, disable_observer, eval, prepare_qat};
use candle_qat::qconfig::{Backend, QConfig};
use candle_qat::qconfig_mapping::QConfigMapping;
use candle_qat::Quantizable;
use criterion::{criterion_group, criterion_main, Criterion};

#[derive(Quantizable)]
struct Up {
    quant: QuantStub,
    up: ConvTranspose2d,
    dequant: DeQuantStub,
}

impl Module for Up {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dequant
            .forward(&self.up.forward(&self.quant.forward(x)?)?)
    }
}

fn benches(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (n, cin, cout, hw) = (8usize, 32usize, 16usize, 14usize);
    for (name, k, padding, output_padding) in
        [("k3_s2", 3usize, 1usize, 1usize), ("k2_s2", 2, 0, 0)]
    {
        let cfg = ConvTransposeConfig {
            padding,
            output_padding,
            stride: 2,
            ..Default::default()
        };
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let mut net = Up {
            quant: QuantStub::new(),
            up: ConvTranspose2d::new(cin, cout, k, cfg, true, vb.pp("up")).expect("layer"),
            dequant: DeQuantStub::new(),
        };
        let x = Tensor::randn(0f32, 1.0, (n, cin, hw, hw), &dev).expect("x");
        let float_up = net.up.clone();
        let w = net.up.weight().clone();
        prepare_qat(
            &mut net,
            &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
        )
        .expect("prepare");
        net.forward(&x).expect("calibrate");
        disable_observer(&mut net).expect("observers");
        eval(&mut net).expect("eval");
        convert(&mut net).expect("convert");
        let xq = net.quant.forward(&x).expect("codes");
        assert_eq!(xq.dtype(), DType::U8);
        let mut g = c.benchmark_group(format!("conv_transpose2d/{name}"));
        g.bench_function("int8_layer", |b| {
            b.iter(|| black_box(net.up.forward(&xq).expect("int8")))
        });
        g.bench_function("f32_layer", |b| {
            b.iter(|| black_box(float_up.forward(&x).expect("f32 layer")))
        });
        g.bench_function("f32_candle", |b| {
            b.iter(|| {
                black_box(
                    x.conv_transpose2d(&w, padding, output_padding, 2, 1)
                        .expect("candle"),
                )
            })
        });
        g.bench_function("copy_u8_input", |b| {
            b.iter(|| black_box(xq.copy().expect("copy")))
        });
        g.finish();
    }
}

criterion_group! {
    name = conv_transpose;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(conv_transpose);
