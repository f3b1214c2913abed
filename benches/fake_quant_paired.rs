//! The fake-quant kernels of `intx_fake_quant.rs` and `ggml_fake_quant.rs` timed in pairs with
//! their baseline: each repetition times `Tensor::copy` of the input, then the kernel, so that
//! both see the same load on a shared machine (criterion measures one benchmark after the
//! other, seconds apart; with other processes competing for the cores, the load drifts between
//! the two and their ratio with it). 1 thread (`common/threads.rs`), 2^20 f32 elements, the
//! same data and shapes as the criterion benches: intx on 1024 x 1024 (int4 per-group g32,
//! int8 per-token), GGML on rows of 4096.
//!
//! Prints, per kernel, the median copy time, the median kernel time and their ratio
//! `time(copy) / time(kernel)`, and the median of the per-repetition ratios. The copy runs
//! right after the previous kernel, so in the backward and forward + backward rows (which
//! touch 12-16 MiB) it is slower than a copy in a loop; read those against the forward rows'
//! copy. The `_mask` rows are the autograd path: the forward also writes the 1-bit
//! straight-through mask, the backward reads the gradient and the mask instead of the input.
//! Run with `cargo bench --bench fake_quant_paired [-- FILTER...]` (names containing
//! any FILTER).
//!
//! The allocator is the one the examples and the training-step benches run with: mimalloc
//! keeping freed memory (examples/common/alloc.rs). With glibc's malloc, the forward +
//! backward rows (two 4 MiB outputs freed together) hand memory back to the OS every
//! repetition and page-fault it in again, which times the allocator, not the kernels.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../examples/common/alloc.rs"]
mod alloc;
#[path = "common/threads.rs"]
mod threads;

use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_qat::fake_quant::{
    intx_fake_quantize, intx_fake_quantize_backward, intx_fake_quantize_backward_masked,
    intx_fake_quantize_masked, IntxSpec,
};
use candle_qat::ggml::{fake_quantize_ggml, fake_quantize_ggml_backward, BlockType};

const N: usize = 1 << 20;
/// Repetitions per kernel (the K-quants, 100x slower, take `REPS / 40`).
const REPS: usize = 400;

/// Deterministic data in [-1.5, 3.0) (the criterion benches' LCG).
fn data(n: usize) -> Vec<f32> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            -1.5 + 4.5 * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

type Case<'a> = (String, Box<dyn Fn() + Sync + 'a>);

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    alloc::keep_freed_memory();
    let pool = threads::pin(1);
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let x = Tensor::from_vec(data(N), (1024, 1024), &Device::Cpu).expect("x");
    let dy = Tensor::from_vec(
        data(N).into_iter().rev().collect::<Vec<_>>(),
        (1024, 1024),
        &Device::Cpu,
    )
    .expect("dy");
    let (xg, dyg) = (
        x.reshape((N / 4096, 4096)).expect("x"),
        dy.reshape((N / 4096, 4096)).expect("dy"),
    );
    let g32 = IntxSpec::int4_per_group(32).expect("spec");
    let tok = IntxSpec::int8_per_token_asym();
    let mut cases: Vec<Case> = Vec::new();
    for (name, spec) in [("int4_g32", &g32), ("int8_token", &tok)] {
        let (_, qp) = intx_fake_quantize(&x, spec).expect("forward");
        let (x, dy) = (&x, &dy);
        cases.push((
            format!("intx_fwd/{name}"),
            Box::new(move || {
                black_box(intx_fake_quantize(x, spec).expect("fwd"));
            }),
        ));
        cases.push((
            format!("intx_bwd_kernel/{name}"),
            Box::new(move || {
                black_box(intx_fake_quantize_backward(x, dy, &qp, spec).expect("bwd"));
            }),
        ));
        let (_, _, mask) = intx_fake_quantize_masked(x, spec).expect("forward");
        let mask = mask.expect("f32 groups of 32 / rows of 1024 get a mask");
        cases.push((
            format!("intx_fwd_mask/{name}"),
            Box::new(move || {
                black_box(intx_fake_quantize_masked(x, spec).expect("fwd"));
            }),
        ));
        cases.push((
            format!("intx_bwd_mask_kernel/{name}"),
            Box::new(move || {
                black_box(intx_fake_quantize_backward_masked(dy, &mask).expect("bwd"));
            }),
        ));
        cases.push((
            format!("intx_fwd_bwd_mask/{name}"),
            Box::new(move || {
                let (y, qp, m) = intx_fake_quantize_masked(x, spec).expect("fwd");
                let m = m.expect("mask");
                let dx = intx_fake_quantize_backward_masked(dy, &m).expect("bwd");
                black_box((y, qp, dx));
            }),
        ));
        cases.push((
            format!("intx_fwd_bwd/{name}"),
            Box::new(move || {
                let (y, qp) = intx_fake_quantize(x, spec).expect("fwd");
                let dx = intx_fake_quantize_backward(x, dy, &qp, spec).expect("bwd");
                black_box((y, dx));
            }),
        ));
    }
    for ty in BlockType::ALL {
        let xg = &xg;
        cases.push((
            format!("ggml_fwd/{}", ty.name()),
            Box::new(move || {
                black_box(fake_quantize_ggml(xg, ty).expect("fwd"));
            }),
        ));
    }
    for ty in [BlockType::Q8_0, BlockType::Q4_0, BlockType::Q4_1] {
        let (xg, dyg) = (&xg, &dyg);
        cases.push((
            format!("ggml_bwd/{}", ty.name()),
            Box::new(move || {
                black_box(fake_quantize_ggml_backward(xg, dyg, ty).expect("bwd"));
            }),
        ));
    }
    pool.install(|| {
        for (name, f) in &cases {
            if !filters.is_empty() && !filters.iter().any(|p| name.contains(p.as_str())) {
                continue;
            }
            let reps = if name.ends_with("_K") {
                REPS / 40
            } else {
                REPS
            };
            let (mut copy, mut kernel, mut ratio) = (vec![], vec![], vec![]);
            for _ in 0..reps {
                let t = Instant::now();
                black_box(x.copy().expect("copy"));
                let c = t.elapsed().as_secs_f64() * 1e6;
                let t = Instant::now();
                f();
                let k = t.elapsed().as_secs_f64() * 1e6;
                copy.push(c);
                kernel.push(k);
                ratio.push(c / k);
            }
            let (c, k, r) = (median(&mut copy), median(&mut kernel), median(&mut ratio));
            println!(
                "{name:26} copy {c:8.1} us  kernel {k:9.1} us  copy/kernel {:.3}  paired {r:.3}",
                c / k
            );
        }
    });
}
