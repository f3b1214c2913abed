//! Int8 inference kernels beside candle's f32 ops on the same shapes, in the same run.
//!
//! Benchmarks are named `<layer>/t<threads>/<variant>`:
//! - `conv`: Conv2d(32, 64, 3, padding=1) with bias on a 64x32x14x14 input;
//! - `linear`: Linear(3136, 128) with bias at batch 64.
//!
//! Variants:
//! - `int8`: `quantized_conv2d` / `quantized_linear`, u8 codes in 0..=127 (the x86/fbgemm
//!   presets), so the saturating `vpmaddubsw` kernel runs where AVX2 is present;
//! - `int8_full`: the same with codes in 0..=255 (qnnpack's range), so the exact widening
//!   kernel runs;
//! - `int8_portable`: the portable kernel's i32 sums alone (`gemm_u8_i8` with
//!   `Kernel::Portable`, linear only), for reference;
//! - `f32`: candle's `conv2d` / `matmul` plus the bias, as candle-nn's layers compute them.
//!
//! Threads: each count (1 and 2) runs in its own process (the binary runs itself once per
//! count, `common/threads.rs`), with every pool pinned to it: each measurement batch runs
//! inside a rayon pool of that many threads (`ThreadPool::install`; our int8 kernels and
//! candle's conv2d and matmul split their work on it, the matmul into that many parts), and
//! candle's elementwise pool (the f32 variants' bias adds) is sized to the same count.
//! Compare variants of one run (ratios): absolute times depend on the machine's load. Every
//! variant is run and checked once before timing; a failure while timed aborts the bench.
//!
//! After criterion's groups, `cargo bench` prints a paired summary: for each layer and
//! thread count, int8 and f32 run alternately (`PAIRS` pairs after a warm-up), and the table
//! gives each one's median and the median of the per-pair ratios f32 / int8. Load that comes
//! and goes hits both sides of a pair alike, so these ratios hold up on a busy machine.
//!
//! Run with `cargo bench --bench int8_kernels`; add a filter such as `conv/t1` to run a
//! part of the criterion groups.

use std::hint::black_box;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_qat::nn::ConvConfig;
use candle_qat::quantized::{
    gemm_u8_i8, quantize, quantized_conv2d, quantized_linear, Kernel, QuantizedWeight, Requant,
};
use criterion::{criterion_group, Criterion};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[path = "common/threads.rs"]
mod threads;

const THREADS: [usize; 2] = [1, 2];

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

/// A layer's operands in f32 and int8.
struct Layer {
    x: Tensor,
    w: Tensor,
    bias: Tensor,
    bias_v: Vec<f32>,
    /// Input codes in 0..=127 and in 0..=255, with their (scale, zero point).
    x_q: Tensor,
    x_qp: (f32, i32),
    x_q_full: Tensor,
    x_qp_full: (f32, i32),
    w_q: QuantizedWeight,
    out: Requant,
    out_full: Requant,
}

impl Layer {
    fn new(x_shape: &[usize], w_shape: &[usize]) -> Res<Self> {
        let dev = Device::Cpu;
        let nx: usize = x_shape.iter().product();
        let nw: usize = w_shape.iter().product();
        let o = w_shape[0];
        let fan_in = (nw / o) as f32;
        let bound = 1.0 / fan_in.sqrt();
        let x = Tensor::from_vec(data(nx, 1, -1.0, 3.0), x_shape, &dev)?;
        let w = Tensor::from_vec(data(nw, 2, -bound, bound), w_shape, &dev)?;
        let bias_v = data(o, 3, -bound, bound);
        let bias = Tensor::from_vec(bias_v.clone(), o, &dev)?;
        // Activation qparams as a MinMax observer gives them for [-1, 3].
        let x_qp = (4.0 / 127.0, 32);
        let x_qp_full = (4.0 / 255.0, 64);
        let x_q = quantize(&x, x_qp.0, x_qp.1, 0, 127)?;
        let x_q_full = quantize(&x, x_qp_full.0, x_qp_full.1, 0, 255)?;
        // Per-channel symmetric weights.
        let wv = w.flatten_all()?.to_vec1::<f32>()?;
        let scales: Vec<f32> = wv
            .chunks(nw / o)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-8) / 127.5)
            .collect();
        let w_q = QuantizedWeight::quantize(&w, &scales, -128, 127)?;
        Ok(Layer {
            x,
            w,
            bias,
            bias_v,
            x_q,
            x_qp,
            x_q_full,
            x_qp_full,
            w_q,
            out: Requant::new(0.05, 64, 0, 127)?,
            out_full: Requant::new(0.025, 128, 0, 255)?,
        })
    }
}

fn conv_f32(l: &Layer) -> Res<Tensor> {
    let y = l.x.conv2d(&l.w, 1, 1, 1, 1)?;
    Ok(y.broadcast_add(&l.bias.reshape((1, (), 1, 1))?)?)
}

fn linear_f32(l: &Layer) -> Res<Tensor> {
    Ok(l.x.matmul(&l.w.t()?)?.broadcast_add(&l.bias)?)
}

/// This process's thread count and its pinned pool (set first in `main`).
static POOL: std::sync::OnceLock<(usize, rayon::ThreadPool)> = std::sync::OnceLock::new();

/// The pools to measure in: this process's one (one count per process).
fn pools() -> Vec<(usize, &'static rayon::ThreadPool)> {
    let (n, pool) = POOL.get().expect("main pins the pool first");
    vec![(*n, pool)]
}

/// Runs every variant once and checks that each int8 output has the f32 output's shape.
fn check(conv: &Layer, linear: &Layer, cfg: &ConvConfig) {
    let f32_conv = conv_f32(conv).expect("f32 conv");
    for (xq, (s, z), out) in [
        (&conv.x_q, conv.x_qp, &conv.out),
        (&conv.x_q_full, conv.x_qp_full, &conv.out_full),
    ] {
        let y =
            quantized_conv2d(xq, s, z, &conv.w_q, Some(&conv.bias_v), cfg, out).expect("int8 conv");
        assert_eq!(y.dims(), f32_conv.dims(), "int8 conv output shape");
    }
    let f32_linear = linear_f32(linear).expect("f32 linear");
    for (xq, (s, z), out) in [
        (&linear.x_q, linear.x_qp, &linear.out),
        (&linear.x_q_full, linear.x_qp_full, &linear.out_full),
    ] {
        let y = quantized_linear(xq, s, z, &linear.w_q, Some(&linear.bias_v), out)
            .expect("int8 linear");
        assert_eq!(y.dims(), f32_linear.dims(), "int8 linear output shape");
    }
}

fn benches(c: &mut Criterion) {
    let conv = Layer::new(&[64, 32, 14, 14], &[64, 32, 3, 3]).expect("conv operands");
    let linear = Layer::new(&[64, 3136], &[128, 3136]).expect("linear operands");
    let cfg = ConvConfig {
        padding: 1,
        ..Default::default()
    };
    let x_codes = linear
        .x_q
        .flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .expect("codes");
    let acc =
        gemm_u8_i8(&x_codes, linear.x_qp.1, &linear.w_q, Kernel::Portable).expect("portable gemm");
    assert_eq!(acc.len(), 64 * 128, "portable gemm output length");
    for (threads, pool) in pools() {
        pool.install(|| check(&conv, &linear, &cfg));
        let mut g = c.benchmark_group(format!("conv/t{threads}"));
        g.sample_size(30)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(4));
        let l = &conv;
        g.bench_function("int8", |b| {
            b.iter(|| {
                pool.install(|| {
                    let (s, z) = l.x_qp;
                    quantized_conv2d(&l.x_q, s, z, &l.w_q, Some(&l.bias_v), &cfg, &l.out)
                        .expect("int8 conv")
                })
            })
        });
        g.bench_function("int8_full", |b| {
            b.iter(|| {
                pool.install(|| {
                    let (s, z) = l.x_qp_full;
                    quantized_conv2d(
                        &l.x_q_full,
                        s,
                        z,
                        &l.w_q,
                        Some(&l.bias_v),
                        &cfg,
                        &l.out_full,
                    )
                    .expect("int8 conv")
                })
            })
        });
        g.bench_function("f32", |b| {
            b.iter(|| pool.install(|| conv_f32(l).expect("f32 conv")))
        });
        g.finish();

        let mut g = c.benchmark_group(format!("linear/t{threads}"));
        g.sample_size(50)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));
        let l = &linear;
        g.bench_function("int8", |b| {
            b.iter(|| {
                pool.install(|| {
                    let (s, z) = l.x_qp;
                    quantized_linear(&l.x_q, s, z, &l.w_q, Some(&l.bias_v), &l.out)
                        .expect("int8 linear")
                })
            })
        });
        g.bench_function("int8_full", |b| {
            b.iter(|| {
                pool.install(|| {
                    let (s, z) = l.x_qp_full;
                    quantized_linear(&l.x_q_full, s, z, &l.w_q, Some(&l.bias_v), &l.out_full)
                        .expect("int8 linear")
                })
            })
        });
        g.bench_function("int8_portable", |b| {
            b.iter(|| {
                pool.install(|| {
                    gemm_u8_i8(black_box(&x_codes), l.x_qp.1, &l.w_q, Kernel::Portable)
                        .expect("portable gemm")
                })
            })
        });
        g.bench_function("f32", |b| {
            b.iter(|| pool.install(|| linear_f32(l).expect("f32 linear")))
        });
        g.finish();
    }
}

/// Pairs of (int8, f32) runs per layer and thread count in the summary.
const PAIRS: usize = 41;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `int8` and `f32` alternately; returns (median int8, median f32, median ratio), in
/// seconds.
fn paired(
    pool: &rayon::ThreadPool,
    int8: &(dyn Fn() + Sync),
    f32: &(dyn Fn() + Sync),
) -> (f64, f64, f64) {
    let time = |f: &(dyn Fn() + Sync)| {
        let t = Instant::now();
        pool.install(f);
        t.elapsed().as_secs_f64()
    };
    for _ in 0..3 {
        time(int8);
        time(f32);
    }
    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..PAIRS {
        // Alternate which runs first, so that neither always follows the other.
        let (ti, tf) = if i % 2 == 0 {
            let ti = time(int8);
            (ti, time(f32))
        } else {
            let tf = time(f32);
            (time(int8), tf)
        };
        a.push(ti);
        b.push(tf);
        r.push(tf / ti);
    }
    (median(&mut a), median(&mut b), median(&mut r))
}

fn summary() {
    let conv = Layer::new(&[64, 32, 14, 14], &[64, 32, 3, 3]).expect("conv operands");
    let linear = Layer::new(&[64, 3136], &[128, 3136]).expect("linear operands");
    let cfg = ConvConfig {
        padding: 1,
        ..Default::default()
    };
    println!();
    println!("paired summary ({PAIRS} alternating pairs; ratio = median of f32 / int8 per pair)");
    println!(
        "{:<8} {:>3} {:>10} {:>12} {:>12} {:>7}",
        "layer", "thr", "int8 range", "int8 median", "f32 median", "ratio"
    );
    let ms = |t: f64| format!("{:.3} ms", t * 1e3);
    for (threads, pool) in pools() {
        for (range, full) in [("0..=127", false), ("0..=255", true)] {
            let l = &conv;
            let (xq, (s, z), out) = if full {
                (&l.x_q_full, l.x_qp_full, &l.out_full)
            } else {
                (&l.x_q, l.x_qp, &l.out)
            };
            let int8 = || {
                black_box(
                    quantized_conv2d(xq, s, z, &l.w_q, Some(&l.bias_v), &cfg, out)
                        .expect("int8 conv"),
                );
            };
            let f32 = || {
                black_box(conv_f32(l).expect("f32 conv"));
            };
            let (ti, tf, r) = paired(pool, &int8, &f32);
            println!(
                "{:<8} {threads:>3} {range:>10} {:>12} {:>12} {r:>6.2}x",
                "conv",
                ms(ti),
                ms(tf)
            );
            let l = &linear;
            let (xq, (s, z), out) = if full {
                (&l.x_q_full, l.x_qp_full, &l.out_full)
            } else {
                (&l.x_q, l.x_qp, &l.out)
            };
            let int8 = || {
                black_box(
                    quantized_linear(xq, s, z, &l.w_q, Some(&l.bias_v), out).expect("int8 linear"),
                );
            };
            let f32 = || {
                black_box(linear_f32(l).expect("f32 linear"));
            };
            let (ti, tf, r) = paired(pool, &int8, &f32);
            println!(
                "{:<8} {threads:>3} {range:>10} {:>12} {:>12} {r:>6.2}x",
                "linear",
                ms(ti),
                ms(tf)
            );
        }
    }
}

criterion_group!(int8, benches);

fn main() {
    // The parent runs one child per count and stops here.
    let Some(n) = threads::one_count_per_process(&THREADS) else {
        return;
    };
    assert!(POOL.set((n, threads::pin(n))).is_ok(), "pool pinned twice");
    int8();
    Criterion::default().configure_from_args().final_summary();
    // `cargo bench` passes --bench; `cargo test --benches` does not: skip the summary there.
    if std::env::args().any(|a| a == "--bench") {
        summary();
    }
}
