//! Throughput of the fake-quant CPU paths, each beside a plain copy of the same tensor.
//!
//! Every benchmark is named `<group>/t<threads>/<variant>/<elements>`, e.g.
//! `fq_fwd/t1/op/1048576` and `fq_fwd/t1/copy/1048576`, so that medians can be tabulated as
//! a fraction of the copy measured in the same run (`time(copy) / time(op)`). `copy` is
//! `Tensor::copy`, which allocates its output as our ops do.
//!
//! Threads: each count (1 and 2) runs in its own process (the binary runs itself once per
//! count, `common/threads.rs`), with every pool pinned to it: each measurement batch runs
//! inside a rayon pool of that many threads (`ThreadPool::install`; our kernels split their
//! work on it), and candle's elementwise pool (autograd's gradient sums, the candle-op
//! references) is sized to the same count. A setup or op that fails panics (once before
//! timing: every op is run and checked before its first measurement).
//!
//! Groups (variant `op` unless said otherwise):
//! - `fq_fwd`: `fake_quantize_per_tensor`.
//! - `fq_bwd_kernel`: the straight-through backward kernel alone (`fake_quantize_backward`);
//!   variant `fwd_bwd`: the forward then the backward kernel, no autograd.
//! - `fq_fwd_bwd`: forward + backward through candle's autograd
//!   (`fq(x_var).sum_all().backward()`); variant `candle_ref`: the same graph with candle's
//!   `affine` in place of fake quantization, i.e. what candle's autograd costs by itself.
//! - `fq_pc_fwd`: `fake_quantize_per_channel`, axis 0, 64 channels.
//! - `lsq_fwd_bwd`: `fake_quantize_learnable` (per tensor, scale and zero point as `Var`s),
//!   forward + backward through autograd; variant `candle_ref`: `x * scale + zero_point` in
//!   candle ops (the same three gradients).
//! - `obs_update`: `MinMaxObserver::moving_average` (per tensor), `observe`.
//! - `fq_module_fwd`: `FakeQuantize` from `QConfig::default_qat(Backend::X86).activation`,
//!   `forward` with observer and fake quant on.
//!
//! Run with `cargo bench --bench fake_quant`; add a filter such as `fq_fwd/t1` to run a part
//! (state is built lazily, so a filtered run sets up only what it times). Medians are in
//! `target/criterion/<group>/<t>_<variant>_<elements>/new/estimates.json`.

use std::hint::black_box;
use std::time::Duration;

use candle_core::{Device, Tensor, Var};
use candle_qat::fake_quant::{
    fake_quantize, fake_quantize_backward, fake_quantize_learnable, fake_quantize_per_channel,
    fake_quantize_per_tensor, FakeQuantize,
};
use candle_qat::observer::{MinMaxObserver, Observer, ObserverConfig};
use candle_qat::qconfig::{Backend, QConfig};
use candle_qat::{QDType, QParams, QScheme, QuantRange};
use criterion::{criterion_group, BenchmarkGroup, Criterion, SamplingMode};
use criterion::{measurement::WallTime, Throughput};
use rayon::ThreadPool;

#[path = "common/data.rs"]
mod data;
#[path = "common/pool_timing.rs"]
mod pool_timing;
#[path = "common/threads.rs"]
mod threads;

use data::lcg_data;
use pool_timing::time_in_pool;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SIZES: [usize; 3] = [1 << 16, 1 << 20, 1 << 24];
const THREADS: [usize; 2] = [1, 2];
const CHANNELS: usize = 64;

/// Per-tensor qparams of the bench: the x86 activation range 0..=127, covering about
/// [-1.2, 2.6]; the data spans [-1.5, 3.0], so about a sixth of it clamps.
const SCALE: f32 = 0.03;
const ZERO_POINT: i32 = 40;
const QMIN: i32 = 0;
const QMAX: i32 = 127;

/// This process's thread count and its pinned pool (set first in `main`).
static POOL: std::sync::OnceLock<(usize, ThreadPool)> = std::sync::OnceLock::new();

/// The pools the groups measure in: this process's one (one count per process).
fn pools() -> Vec<(usize, &'static ThreadPool)> {
    let (n, pool) = POOL.get().expect("main pins the pool first");
    vec![(*n, pool)]
}

/// Short runs: the whole bench stays within a few minutes. The largest size samples flat
/// (the same iteration count per sample) so that slow ops still finish 10 samples quickly.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    group.throughput(Throughput::Elements(n as u64));
    if n >= 1 << 24 {
        group
            .sampling_mode(SamplingMode::Flat)
            .sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500));
    } else if n >= 1 << 20 {
        group
            .sampling_mode(SamplingMode::Auto)
            .sample_size(15)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1000));
    } else {
        group
            .sampling_mode(SamplingMode::Auto)
            .sample_size(20)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(700));
    }
}

/// The backward kernel benchmark's state: input, output gradient, qparams, range.
type BwdState = (Tensor, Tensor, QParams, QuantRange);

/// The LSQ benchmark's state: input, scale, zero point, range, gradient factor.
type LsqState = (Var, Var, Var, QuantRange, f32);

/// A benchmark of a group: how one iteration runs on the state built by the group's `make`.
type Step<S> = fn(&mut S) -> Res<()>;

/// One group: for each size and thread count, `make(n)` builds the op's state and the input
/// tensor that the copy baseline copies; `op` runs one iteration (its outputs are dropped
/// inside, as the copy's are). `extra` benchmarks run beside them under their own names
/// (references such as a native candle op through the same autograd). The state is built
/// lazily, so that a filtered run sets up only what it times.
fn group<S, M>(c: &mut Criterion, name: &str, make: M, op: Step<S>, extra: &[(&str, Step<S>)])
where
    M: Fn(usize) -> Res<(S, Tensor)>,
    S: Send,
{
    let pools = pools();
    let mut g = c.benchmark_group(name);
    for &n in &SIZES {
        configure(&mut g, n);
        for (t, pool) in &pools {
            let mut setup: Option<(S, Tensor)> = None;
            let init = |setup: &mut Option<(S, Tensor)>| {
                if setup.is_none() {
                    let (mut state, x) = make(n).expect("bench setup");
                    // Check once that the op runs before timing anything.
                    pool.install(|| op(&mut state)).expect("bench op");
                    *setup = Some((state, x));
                }
            };
            g.bench_function(format!("t{t}/copy/{n}"), |b| {
                init(&mut setup);
                let x = &setup.as_ref().expect("set up").1;
                time_in_pool(b, pool, || x.copy().expect("copy"))
            });
            g.bench_function(format!("t{t}/op/{n}"), |b| {
                init(&mut setup);
                let state = &mut setup.as_mut().expect("set up").0;
                time_in_pool(b, pool, || op(state).expect("bench op"))
            });
            for &(label, step) in extra {
                g.bench_function(format!("t{t}/{label}/{n}"), |b| {
                    init(&mut setup);
                    let state = &mut setup.as_mut().expect("set up").0;
                    time_in_pool(b, pool, || step(state).expect(label))
                });
            }
        }
    }
    g.finish();
}

fn input(n: usize) -> Res<Tensor> {
    Ok(Tensor::from_vec(lcg_data(n, 0), n, &Device::Cpu)?)
}

fn per_tensor_qparams() -> QParams {
    QParams::PerTensor {
        scale: SCALE,
        zero_point: ZERO_POINT,
    }
}

fn range() -> QuantRange {
    QuantRange::explicit(QMIN, QMAX).expect("range")
}

fn fq_fwd(c: &mut Criterion) {
    group(
        c,
        "fq_fwd",
        |n| {
            let x = input(n)?;
            Ok((x.clone(), x))
        },
        |x| {
            black_box(fake_quantize_per_tensor(x, SCALE, ZERO_POINT, QMIN, QMAX)?);
            Ok(())
        },
        &[],
    );
}

fn fq_bwd_kernel(c: &mut Criterion) {
    group(
        c,
        "fq_bwd_kernel",
        |n| {
            let x = input(n)?;
            // A gradient that is not all ones.
            let dy = input(n)?.affine(0.5, 0.25)?;
            Ok(((x.clone(), dy, per_tensor_qparams(), range()), x))
        },
        |(x, dy, qp, r)| {
            black_box(fake_quantize_backward(x, dy, qp, r)?);
            Ok(())
        },
        // Both kernels, forward then backward, without autograd around them.
        &[("fwd_bwd", |(x, dy, qp, r): &mut BwdState| {
            let y = fake_quantize(x, qp, r)?;
            black_box((y, fake_quantize_backward(x, dy, qp, r)?));
            Ok(())
        })],
    );
}

fn fq_fwd_bwd(c: &mut Criterion) {
    group(
        c,
        "fq_fwd_bwd",
        |n| {
            let x = Var::from_tensor(&input(n)?)?;
            let t = x.as_tensor().clone();
            Ok((x, t))
        },
        |x| {
            let y = fake_quantize_per_tensor(x.as_tensor(), SCALE, ZERO_POINT, QMIN, QMAX)?;
            black_box(y.sum_all()?.backward()?);
            Ok(())
        },
        // The same graph with candle's own elementwise op in place of fake quantization:
        // what autograd itself costs (gradient accumulation, the sum's broadcast).
        &[("candle_ref", |x: &mut Var| {
            let y = x.as_tensor().affine(0.5, 0.25)?;
            black_box(y.sum_all()?.backward()?);
            Ok(())
        })],
    );
}

fn fq_pc_fwd(c: &mut Criterion) {
    group(
        c,
        "fq_pc_fwd",
        |n| {
            let x = input(n)?.reshape((CHANNELS, n / CHANNELS))?;
            let scales: Vec<f32> = (0..CHANNELS).map(|i| 0.02 + 0.0005 * i as f32).collect();
            let zero_points: Vec<i32> = (0..CHANNELS as i32).map(|i| 30 + i % 20).collect();
            Ok(((x.clone(), scales, zero_points), x))
        },
        |(x, scales, zero_points)| {
            black_box(fake_quantize_per_channel(
                x,
                scales,
                zero_points,
                0,
                QMIN,
                QMAX,
            )?);
            Ok(())
        },
        &[],
    );
}

fn lsq_fwd_bwd(c: &mut Criterion) {
    group(
        c,
        "lsq_fwd_bwd",
        |n| {
            let x = Var::from_tensor(&input(n)?)?;
            let scale = Var::new(&[SCALE], &Device::Cpu)?;
            let zp = Var::new(&[ZERO_POINT as f32 + 0.3], &Device::Cpu)?;
            let grad_factor = (1.0 / ((n as f64) * QMAX as f64).sqrt()) as f32;
            let t = x.as_tensor().clone();
            Ok(((x, scale, zp, range(), grad_factor), t))
        },
        |(x, scale, zp, r, gf)| {
            let y = fake_quantize_learnable(
                x.as_tensor(),
                scale.as_tensor(),
                zp.as_tensor(),
                None,
                r,
                *gf,
            )?;
            black_box(y.sum_all()?.backward()?);
            Ok(())
        },
        // `x * scale + zero_point` in candle ops: the same three gradients (one elementwise,
        // two reductions) through the same autograd.
        &[("candle_ref", |(x, scale, zp, _, _): &mut LsqState| {
            let y = x
                .as_tensor()
                .broadcast_mul(scale.as_tensor())?
                .broadcast_add(zp.as_tensor())?;
            black_box(y.sum_all()?.backward()?);
            Ok(())
        })],
    );
}

fn obs_update(c: &mut Criterion) {
    group(
        c,
        "obs_update",
        |n| {
            let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
            let obs = MinMaxObserver::moving_average(cfg, 0.01)?;
            let x = input(n)?;
            Ok(((obs, x.clone()), x))
        },
        |(obs, x)| {
            obs.observe(x)?;
            black_box(obs.min_max());
            Ok(())
        },
        &[],
    );
}

fn fq_module_fwd(c: &mut Criterion) {
    group(
        c,
        "fq_module_fwd",
        |n| {
            let fq: FakeQuantize = QConfig::default_qat(Backend::X86).activation.build()?;
            let x = input(n)?;
            Ok(((fq, x.clone()), x))
        },
        |(fq, x)| {
            black_box(fq.forward(x)?);
            Ok(())
        },
        &[],
    );
}

criterion_group!(
    benches,
    fq_fwd,
    fq_bwd_kernel,
    fq_fwd_bwd,
    fq_pc_fwd,
    lsq_fwd_bwd,
    obs_update,
    fq_module_fwd
);
fn main() {
    // The parent runs one child per count and stops here.
    let Some(n) = threads::one_count_per_process(&THREADS) else {
        return;
    };
    assert!(POOL.set((n, threads::pin(n))).is_ok(), "pool pinned twice");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
