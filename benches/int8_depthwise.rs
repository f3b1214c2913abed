//! Int8 depthwise convolution (MobileNet's 3x3, one channel per group) beside candle's f32
//! grouped conv2d on the same shapes and a `Tensor::copy` of the u8 input, in the same run.
//!
//! Shapes (N, C, H, W), 3x3 kernel, padding 1, groups = C, per-channel weights, codes in
//! 0..=127: `c96_14x14` at stride 1 (a MobileNetV2 stage at 14 pixels), `c144_28x28_s2`
//! at stride 2. Compare the variants of one run (ratios); absolute times follow the machine's
//! load.
//!
//! Run with `cargo bench --bench int8_depthwise`.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use candle_qat::nn::ConvConfig;
use candle_qat::quantized::{quantize, quantized_conv2d, QuantizedWeight, Requant};
use criterion::{criterion_group, criterion_main, Criterion};

/// Deterministic data in [lo, hi) (a 64-bit LCG, top 24 bits).
fn data(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (name, n, ch, hw, stride) in [
        ("c96_14x14", 8usize, 96usize, 14usize, 1usize),
        ("c144_28x28_s2", 8, 144, 28, 2),
    ] {
        let x = Tensor::from_vec(data(n * ch * hw * hw, 1, -1.0, 1.0), (n, ch, hw, hw), &dev)
            .expect("x");
        let w = Tensor::from_vec(data(ch * 9, 2, -0.5, 0.5), (ch, 1, 3, 3), &dev).expect("w");
        let cfg = ConvConfig {
            padding: 1,
            stride,
            groups: ch,
            ..Default::default()
        };
        let xq = quantize(&x, 2.0 / 127.0, 64, 0, 127).expect("xq");
        let scales = vec![0.5f32 / 127.0; ch];
        let wq = QuantizedWeight::quantize(&w, &scales, -128, 127).expect("wq");
        let bias = vec![0.01f32; ch];
        let rq = Requant::new(0.02, 64, 0, 127).expect("requant");
        let mut g = c.benchmark_group(format!("depthwise/{name}"));
        g.bench_function("int8", |b| {
            b.iter(|| {
                black_box(
                    quantized_conv2d(&xq, 2.0 / 127.0, 64, &wq, Some(&bias), &cfg, &rq)
                        .expect("int8"),
                )
            })
        });
        g.bench_function("f32_candle", |b| {
            b.iter(|| black_box(x.conv2d(&w, 1, stride, 1, ch).expect("f32")))
        });
        g.bench_function("copy_u8_input", |b| {
            b.iter(|| black_box(xq.to_dtype(DType::U8).and_then(|t| t.copy()).expect("copy")))
        });
        g.finish();
    }
}

criterion_group! {
    name = depthwise;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = benches
}
criterion_main!(depthwise);
