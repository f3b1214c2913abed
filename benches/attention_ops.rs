//! The differentiable attention ops (`candle_qat::nn::rope_i`, `softmax_last_dim`) against
//! candle's forms on the CPU, on one thread (a local rayon pool of 1; run with
//! `RAYON_NUM_THREADS=1` so candle's own kernels use one thread too), at the tiny-shakespeare
//! Llama's shapes for a batch of 32 windows of 64: q/k `(32, 4, 64, 32)` for the rotary
//! embedding, attention scores `(32, 4, 64, 64)` (causally masked) for the softmax.
//!
//! Benchmarks are named `<group>/t1/<variant>/<elements>`, groups `rope` and `softmax`:
//! - `copy`: `Tensor::copy` of the input (the baseline of the same run);
//! - `candle_fused_fwd`: candle's forward-only kernel (`rope_i`, `softmax_last_dim`);
//! - `ours_fwd`: ours, forward only;
//! - `ours_fwd_bwd` / `candle_slow_fwd_bwd`: forward and backward through autograd,
//!   `backward(sum(op(x) * r))`, ours and candle's differentiable composite (`rope_i_slow`,
//!   `softmax`); the product with `r` and the sum are the same in both.
//!
//! Run with `RAYON_NUM_THREADS=1 cargo bench --bench attention_ops`; compare the medians in
//! `target/criterion/<group>/t1_<variant>_<elements>/new/estimates.json`.

#[path = "common/data.rs"]
mod data;
#[path = "common/pool_timing.rs"]
mod pool_timing;

use std::time::Duration;

use candle_core::{Device, Tensor, Var, D};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use rayon::ThreadPool;

use data::lcg_data;
use pool_timing::{one_thread_pool as pool, time_in_pool};

fn tensor(dims: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    Tensor::from_vec(lcg_data(n, seed), dims, &Device::Cpu).expect("tensor")
}

type Op = fn(&Tensor) -> Tensor;

fn bench_group(c: &mut Criterion, pool: &ThreadPool, name: &str, x: &Tensor, ops: [Op; 3]) {
    let [ours, fused, slow] = ops;
    let n = x.elem_count();
    let var = Var::from_tensor(x).expect("var");
    let r = Tensor::from_vec(lcg_data(n, 7), x.dims(), &Device::Cpu).expect("r");
    let fwd_bwd = |op: Op| {
        let y = op(var.as_tensor());
        (y * &r)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward")
    };
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Elements(n as u64))
        .sampling_mode(SamplingMode::Auto)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(2000));
    g.bench_function(format!("t1/copy/{n}"), |b| {
        time_in_pool(b, pool, || x.copy().expect("copy"))
    });
    g.bench_function(format!("t1/candle_fused_fwd/{n}"), |b| {
        time_in_pool(b, pool, || fused(x))
    });
    g.bench_function(format!("t1/ours_fwd/{n}"), |b| {
        time_in_pool(b, pool, || ours(x))
    });
    g.bench_function(format!("t1/ours_fwd_bwd/{n}"), |b| {
        time_in_pool(b, pool, || fwd_bwd(ours))
    });
    g.bench_function(format!("t1/candle_slow_fwd_bwd/{n}"), |b| {
        time_in_pool(b, pool, || fwd_bwd(slow))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let pool = pool();
    // Rotary tables of 64 positions x 16 pairs.
    let angles = Tensor::from_vec(
        (0..64 * 16)
            .map(|i| (i / 16) as f32 * 10000f32.powf(-((i % 16) as f32) / 16.0))
            .collect::<Vec<_>>(),
        (64, 16),
        &Device::Cpu,
    )
    .expect("angles");
    let cos = angles.cos().expect("cos");
    let sin = angles.sin().expect("sin");
    // The ops take their tables through statics so that they fit `fn` pointers.
    TABLES.set((cos, sin)).expect("tables set once");
    bench_group(
        c,
        &pool,
        "rope",
        &tensor((32, 4, 64, 32), 1),
        [
            |x| {
                let (c, s) = TABLES.get().expect("tables");
                candle_qat::nn::rope_i(x, c, s).expect("rope_i")
            },
            |x| {
                let (c, s) = TABLES.get().expect("tables");
                candle_nn::rotary_emb::rope_i(x, c, s).expect("candle rope_i")
            },
            |x| {
                let (c, s) = TABLES.get().expect("tables");
                candle_nn::rotary_emb::rope_i_slow(x, c, s).expect("rope_i_slow")
            },
        ],
    );
    // Causally masked scores: -inf above the diagonal, as the model's attention has them.
    let mask: Vec<u8> = (0..64 * 64).map(|i| u8::from(i % 64 > i / 64)).collect();
    let mask = Tensor::from_vec(mask, (64, 64), &Device::Cpu)
        .expect("mask")
        .broadcast_as((32, 4, 64, 64))
        .expect("mask b");
    let ninf = Tensor::new(f32::NEG_INFINITY, &Device::Cpu)
        .expect("-inf")
        .broadcast_as((32, 4, 64, 64))
        .expect("-inf b");
    let scores = mask
        .where_cond(&ninf, &tensor((32, 4, 64, 64), 2))
        .expect("masked");
    bench_group(
        c,
        &pool,
        "softmax",
        &scores,
        [
            |x| candle_qat::nn::softmax_last_dim(x).expect("softmax"),
            |x| candle_nn::ops::softmax_last_dim(x).expect("candle softmax"),
            |x| candle_nn::ops::softmax(x, D::Minus1).expect("composite softmax"),
        ],
    );
}

static TABLES: std::sync::OnceLock<(Tensor, Tensor)> = std::sync::OnceLock::new();

criterion_group!(attention, benches);
criterion_main!(attention);
