//! What the examples share for training and measuring: a seeded RNG, SGD with momentum over
//! a `VarMap`'s variables, the cosine schedule, one epoch with a progress bar, evaluation,
//! latency and a few formatting helpers.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::loss;
use indicatif::{ProgressBar, ProgressStyle};

use super::idx::Split;

/// The error type of the examples.
pub type AnyError = Box<dyn std::error::Error + Send + Sync>;
pub type AnyResult<T> = std::result::Result<T, AnyError>;

/// The pool the examples run inside (`pool.install(|| run(args))`): `threads` workers
/// (default: one per core) for rayon and candle's CPU kernels, which size their work by
/// `RAYON_NUM_THREADS`. Running the whole program on one of the pool's workers keeps the
/// thread that drives training from being a third thread beside two busy workers on a
/// 2-core machine, and candle's own pool for elementwise ops is told not to spin between ops
/// (`CANDLE_BARRIER_POOL_SPIN_LIMIT=0`, unless set): both together took about 15% off a
/// float training step of MnistNet at 2 threads.
pub fn thread_pool(threads: Option<usize>) -> AnyResult<rayon::ThreadPool> {
    // Set before anything runs: candle reads these when its pools start.
    if let Some(n) = threads {
        if n == 0 {
            return Err("--threads must be at least 1".into());
        }
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let mut b = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        b = b.num_threads(n);
    }
    Ok(b.build()
        .map_err(|e| format!("building the rayon pool: {e}"))?)
}

/// Checks the batch size every example takes.
pub fn check_batch_size(batch_size: usize) -> AnyResult<()> {
    if batch_size < 2 {
        return Err(
            "--batch-size must be at least 2 (BatchNorm trains on batch statistics)".into(),
        );
    }
    Ok(())
}

/// The `--preset` option: PyTorch's QAT qconfig presets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    Fbgemm,
    X86,
    Qnnpack,
}

impl Preset {
    pub fn backend(self) -> candle_qat::qconfig::Backend {
        use candle_qat::qconfig::Backend;
        match self {
            Preset::Fbgemm => Backend::Fbgemm,
            Preset::X86 => Backend::X86,
            Preset::Qnnpack => Backend::Qnnpack,
        }
    }
}

/// SplitMix64: a tiny deterministic generator (same seed, same sequence, on every platform).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// Stream `k` of `seed`: the phases of a run draw from separate streams, so that
    /// skipping one (`--resume` skips float training) leaves the others' numbers unchanged.
    pub fn stream(seed: u64, k: u64) -> Self {
        let mut r = Rng::new(seed);
        for _ in 0..=k {
            r.next_u64();
        }
        Rng::new(r.next_u64() ^ k)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-32 for our sizes).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }

    /// `0..n` in a random order.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        self.shuffle(&mut v);
        v
    }
}

/// Re-draws a freshly built model's weights from `rng`: candle's CPU generator cannot be
/// seeded, so the examples initialise from their own, as PyTorch's `Conv2d`/`Linear` do:
/// weights (`*.weight` of rank >= 2; `kaiming_uniform_(a=sqrt(5))`) and their biases
/// (`*.bias` next to such a weight) uniform in +-1/sqrt(fan_in); everything else (BatchNorm
/// parameters and statistics) keeps its constant initial value. Names are visited sorted.
pub fn init_weights(vm: &candle_nn::VarMap, rng: &mut Rng) -> AnyResult<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| "the VarMap's lock is poisoned")?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let fan_in = |name: &str| -> Option<usize> {
        let w = data.get(name)?;
        (w.rank() >= 2).then(|| w.dims()[1..].iter().product())
    };
    for name in names {
        let var = &data[name];
        let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
        let weight_name = if prefix.is_empty() {
            "weight".to_string()
        } else {
            format!("{prefix}.weight")
        };
        let values: Option<Vec<f32>> = match (leaf, fan_in(&weight_name)) {
            ("weight" | "bias", Some(fi)) => {
                let bound = 1.0 / (fi as f64).sqrt();
                Some(
                    (0..var.elem_count())
                        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                        .collect(),
                )
            }
            _ => None,
        };
        if let Some(v) = values {
            var.set(&Tensor::from_vec(v, var.shape(), var.device())?)?;
        }
    }
    Ok(())
}

/// SGD with momentum, PyTorch's `torch.optim.SGD(momentum=m)` (dampening 0, no Nesterov, no
/// weight decay): `buf = m * buf + grad` (`buf = grad` on the first step), `p -= lr * buf`.
/// Variables that get no gradient (BatchNorm running statistics, which also live in the
/// `VarMap`) are left alone.
pub struct MomentumSgd {
    vars: Vec<Var>,
    bufs: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
}

impl MomentumSgd {
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64) -> Self {
        let bufs = vec![None; vars.len()];
        MomentumSgd {
            vars,
            bufs,
            lr,
            momentum,
        }
    }

    /// Backpropagates `loss` and updates every variable that has a gradient.
    pub fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        let grads = loss.backward()?;
        for (var, buf) in self.vars.iter().zip(self.bufs.iter_mut()) {
            let Some(g) = grads.get(var) else { continue };
            let b = match buf.take() {
                Some(b) => ((b * self.momentum)? + g)?,
                None => g.clone(),
            };
            var.set(&(var.as_tensor() - (&b * self.lr)?)?)?;
            *buf = Some(b);
        }
        Ok(())
    }
}

/// Cosine decay from `base` to 0 over `total` steps, evaluated at `step` (PyTorch's
/// `CosineAnnealingLR(T_max=total, eta_min=0)` stepped every batch).
pub fn cosine_lr(base: f64, step: usize, total: usize) -> f64 {
    if total == 0 {
        return base;
    }
    base * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total as f64).cos())
}

/// A bar over `len` items with a message slot (loss, accuracy).
pub fn bar(len: u64, prefix: impl Into<String>) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{prefix:>14} [{elapsed_precise}] {bar:30.cyan/blue} {pos:>5}/{len:5} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    pb.set_style(style);
    pb.set_prefix(prefix.into());
    pb
}

/// Running totals of an epoch.
#[derive(Clone, Copy, Debug, Default)]
pub struct EpochStats {
    pub loss: f64,
    pub correct: usize,
    pub seen: usize,
    pub steps: usize,
}

impl EpochStats {
    pub fn mean_loss(&self) -> f64 {
        self.loss / self.steps.max(1) as f64
    }
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// How to run one training epoch.
pub struct EpochPlan<'a> {
    pub split: &'a Split,
    pub batch_size: usize,
    pub base_lr: f64,
    /// Step index of the first batch of this epoch in the whole schedule.
    pub first_step: usize,
    /// Steps in the whole schedule.
    pub total_steps: usize,
    pub label: String,
}

/// Steps per epoch (the last, partial batch is kept unless it has a single image: BatchNorm
/// in training needs more than one value per channel).
pub fn steps_per_epoch(n: usize, batch_size: usize) -> usize {
    let full = n / batch_size;
    if n % batch_size > 1 {
        full + 1
    } else {
        full
    }
}

/// One epoch over `plan.split` in the order `perm`: forward, cross-entropy, momentum SGD with
/// the cosine learning rate of each step. The bar shows the running loss and accuracy.
pub fn train_epoch<M: Module>(
    model: &M,
    opt: &mut MomentumSgd,
    plan: &EpochPlan,
    perm: &[usize],
    dev: &Device,
) -> AnyResult<EpochStats> {
    let steps = steps_per_epoch(perm.len(), plan.batch_size);
    let pb = bar(perm.len() as u64, plan.label.clone());
    let mut st = EpochStats::default();
    for s in 0..steps {
        let lo = s * plan.batch_size;
        let idx = &perm[lo..(lo + plan.batch_size).min(perm.len())];
        let (x, y) = plan.split.batch(idx, dev)?;
        opt.lr = cosine_lr(plan.base_lr, plan.first_step + s, plan.total_steps);
        let logits = model.forward(&x)?;
        let l = loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&l)?;
        let correct = logits
            .argmax(D::Minus1)?
            .eq(&y)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize;
        st.loss += l.to_scalar::<f32>()? as f64;
        st.correct += correct;
        st.seen += idx.len();
        st.steps += 1;
        pb.inc(idx.len() as u64);
        pb.set_message(format!(
            "loss {:.4} acc {:.2}% lr {:.5}",
            st.mean_loss(),
            100.0 * st.accuracy(),
            opt.lr
        ));
    }
    pb.finish_and_clear();
    Ok(st)
}

/// Predicted classes of the whole split, in order, `batch_size` images at a time.
pub fn predict<M: Module>(
    model: &M,
    split: &Split,
    batch_size: usize,
    label: &str,
    dev: &Device,
) -> AnyResult<Vec<u32>> {
    let pb = bar(split.n as u64, label.to_string());
    let mut preds = Vec::with_capacity(split.n);
    let mut correct = 0usize;
    let idx: Vec<usize> = (0..split.n).collect();
    for chunk in idx.chunks(batch_size) {
        let (x, _) = split.batch(chunk, dev)?;
        let p = model.forward(&x)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
        correct += p
            .iter()
            .zip(chunk)
            .filter(|(p, &i)| **p == split.labels[i] as u32)
            .count();
        preds.extend(p);
        pb.inc(chunk.len() as u64);
        pb.set_message(format!(
            "acc {:.2}%",
            100.0 * correct as f64 / preds.len() as f64
        ));
    }
    pb.finish_and_clear();
    Ok(preds)
}

/// Fraction of predictions equal to the labels.
pub fn accuracy(preds: &[u32], split: &Split) -> f64 {
    let ok = preds
        .iter()
        .zip(&split.labels)
        .filter(|(p, &l)| **p == l as u32)
        .count();
    ok as f64 / preds.len().max(1) as f64
}

/// Fraction of positions where two prediction lists agree.
pub fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().max(1) as f64
}

/// Median wall time of `runs` calls of the model on `x` (after two warm-up calls).
pub fn median_latency<M: Module>(model: &M, x: &Tensor, runs: usize) -> AnyResult<Duration> {
    for _ in 0..2 {
        model.forward(x)?;
    }
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        let y = model.forward(x)?;
        // Make sure the result exists (candle's CPU ops are eager, this is cheap).
        let _ = y.dims();
        t.push(start.elapsed());
    }
    t.sort();
    Ok(t[t.len() / 2])
}

/// `1.234 s`, `56.7 ms`, `890 us`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} us", s * 1e6)
    }
}

/// `12.3 KiB`.
pub fn fmt_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// Copies every variable of `from` into the variable of the same name in `to` (both built by
/// the same model constructor): a fresh, independent copy of a model's weights and BN
/// statistics.
pub fn copy_varmap(from: &candle_nn::VarMap, to: &mut candle_nn::VarMap) -> AnyResult<()> {
    let src = from
        .data()
        .lock()
        .map_err(|_| "the source VarMap's lock is poisoned")?;
    let pairs: Vec<(String, Tensor)> = src
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    drop(src);
    to.set(pairs.iter().map(|(k, v)| (k, v)))?;
    Ok(())
}

/// Total bytes of the `VarMap`'s f32 variables (weights, biases, BN parameters and
/// statistics): the float model's weight bytes.
pub fn varmap_bytes(vm: &candle_nn::VarMap) -> usize {
    vm.all_vars()
        .iter()
        .map(|v| v.elem_count() * v.dtype().size_in_bytes())
        .sum()
}
