//! Throughput of torchao-style intx fake quantization on the CPU, beside a plain copy of the
//! same tensor in the same run, on one thread (a local rayon pool of 1).
//!
//! Benchmarks are named `<group>/t1/<variant>/1048576` on a 1024 x 1024 f32 tensor:
//! - `intx_fwd`: variant `copy` (`Tensor::copy`, which allocates its output as the ops
//!   do), `int4_g32` (`intx_fake_quantize` with `IntxSpec::int4_per_group(32)`: each
//!   group's scale, then its codes) and `int8_token` (`IntxSpec::int8_per_token_asym()`).
//! - `intx_bwd_kernel`: the straight-through backward kernel alone
//!   (`intx_fake_quantize_backward`, with the forward's qparams).
//! - `intx_fwd_bwd`: the forward then the backward kernel (no autograd), and `copy`.
//!
//! Run with `cargo bench --bench intx_fake_quant`; report `time(copy) / time(op)` from the
//! medians in `target/criterion/<group>/t1_<variant>_1048576/new/estimates.json`.

#[path = "common/data.rs"]
mod data;
#[path = "common/pool_timing.rs"]
mod pool_timing;

use std::time::Duration;

use candle_core::{Device, Tensor};
use candle_qat::fake_quant::{
    intx_fake_quantize, intx_fake_quantize_backward, IntxQParams, IntxSpec,
};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

use data::lcg_data;
use pool_timing::{one_thread_pool as pool, time_in_pool};

const ROWS: usize = 1024;
const COLS: usize = 1024;

struct State {
    x: Tensor,
    dy: Tensor,
    specs: Vec<(&'static str, IntxSpec, IntxQParams)>,
}

fn state() -> State {
    let n = ROWS * COLS;
    let x = Tensor::from_vec(lcg_data(n, 0), (ROWS, COLS), &Device::Cpu).expect("x");
    let dy = Tensor::from_vec(
        lcg_data(n, 0).into_iter().rev().collect::<Vec<_>>(),
        (ROWS, COLS),
        &Device::Cpu,
    )
    .expect("dy");
    let specs = [
        ("int4_g32", IntxSpec::int4_per_group(32).expect("spec")),
        ("int8_token", IntxSpec::int8_per_token_asym()),
    ]
    .into_iter()
    .map(|(name, spec)| {
        let (_, qp) = intx_fake_quantize(&x, &spec).expect("forward");
        (name, spec, qp)
    })
    .collect();
    State { x, dy, specs }
}

fn benches(c: &mut Criterion) {
    let pool = pool();
    let st = state();
    let n = ROWS * COLS;
    for group in ["intx_fwd", "intx_bwd_kernel", "intx_fwd_bwd"] {
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Elements(n as u64))
            .sampling_mode(SamplingMode::Auto)
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500));
        g.bench_function(format!("t1/copy/{n}"), |b| {
            time_in_pool(b, &pool, || st.x.copy().expect("copy"))
        });
        for (name, spec, qp) in &st.specs {
            g.bench_function(format!("t1/{name}/{n}"), |b| match group {
                "intx_fwd" => {
                    time_in_pool(b, &pool, || intx_fake_quantize(&st.x, spec).expect("fwd"))
                }
                "intx_bwd_kernel" => time_in_pool(b, &pool, || {
                    intx_fake_quantize_backward(&st.x, &st.dy, qp, spec).expect("bwd")
                }),
                _ => time_in_pool(b, &pool, || {
                    let (y, qp) = intx_fake_quantize(&st.x, spec).expect("fwd");
                    let dx = intx_fake_quantize_backward(&st.x, &st.dy, &qp, spec).expect("bwd");
                    (y, dx)
                }),
            });
        }
        g.finish();
    }
}

criterion_group!(intx, benches);
criterion_main!(intx);
