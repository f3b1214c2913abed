//! Throughput of GGML block fake quantization on the CPU, beside a plain copy of the same
//! tensor in the same run.
//!
//! Benchmarks are named `ggml_fwd/t1/<variant>/1048576`: `copy` (`Tensor::copy`, which
//! allocates its output as the ops do), `Q8_0`, `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q4_K`,
//! `Q6_K` (`fake_quantize_ggml`, forward only), the inputs `in_Q8_0` and `in_Q8_K`
//! (`fake_quantize_vec_dot`); `ggml_bwd/t1/<type>/1048576` times the straight-through
//! backward kernel (`fake_quantize_ggml_backward`). Every batch runs inside a one-thread
//! rayon pool. Report `time(copy) / time(op)` from the medians in
//! `target/criterion/ggml_fwd/...`. Run with `cargo bench --bench ggml_fake_quant`.

#[path = "common/data.rs"]
mod data;
#[path = "common/pool_timing.rs"]
mod pool_timing;

use std::time::Duration;

use candle_core::{Device, Tensor};
use candle_qat::ggml::{
    fake_quantize_ggml, fake_quantize_ggml_backward, fake_quantize_vec_dot, BlockType, VecDotType,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use data::lcg_data;
use pool_timing::{one_thread_pool as pool, time_in_pool};

const N: usize = 1 << 20;
/// Rows of 4096 (a multiple of 256, so every type applies).
const COLS: usize = 4096;

/// Deterministic data in [-1.5, 3.0) (`common/data.rs`).
fn input() -> Tensor {
    let v = lcg_data(N, 0);
    Tensor::from_vec(v, (N / COLS, COLS), &Device::Cpu).expect("input")
}

fn ggml_fwd(c: &mut Criterion) {
    let (x, pool) = (input(), pool());
    let mut g = c.benchmark_group("ggml_fwd");
    g.throughput(Throughput::Elements(N as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    g.bench_function(format!("t1/copy/{N}"), |b| {
        time_in_pool(b, &pool, || x.copy().expect("copy"))
    });
    for ty in BlockType::ALL {
        g.bench_function(format!("t1/{}/{N}", ty.name()), |b| {
            time_in_pool(b, &pool, || fake_quantize_ggml(&x, ty).expect("fake quant"))
        });
    }
    for ty in [VecDotType::Q8_0, VecDotType::Q8K] {
        g.bench_function(format!("t1/in_{}/{N}", ty.name()), |b| {
            time_in_pool(b, &pool, || {
                fake_quantize_vec_dot(&x, ty).expect("fake quant")
            })
        });
    }
    g.finish();
}

fn ggml_bwd(c: &mut Criterion) {
    let (x, pool) = (input(), pool());
    let dy = x.affine(0.5, 0.25).expect("grad");
    let mut g = c.benchmark_group("ggml_bwd");
    g.throughput(Throughput::Elements(N as u64))
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    g.bench_function(format!("t1/copy/{N}"), |b| {
        time_in_pool(b, &pool, || x.copy().expect("copy"))
    });
    for ty in [BlockType::Q8_0, BlockType::Q4_0, BlockType::Q4_1] {
        g.bench_function(format!("t1/{}/{N}", ty.name()), |b| {
            time_in_pool(b, &pool, || {
                fake_quantize_ggml_backward(&x, &dy, ty).expect("backward")
            })
        });
    }
    g.finish();
}

criterion_group!(benches, ggml_fwd, ggml_bwd);
criterion_main!(benches);
