//! The second main job, as a library the example (`examples/shakespeare_qat.rs`) and its
//! shortened test (`tests/shakespeare_job.rs`) both run: the PyTorch reference's recipe
//! (`../shared/reference/tinyllama_qat.py`) on the tiny Llama of `tiny_llama.rs`.
//!
//! 1. float training (AdamW, warm-up + cosine, `float_steps` batches of 32 x 64);
//! 2. a float control of `qat_steps` more steps at the fine-tuning rate (the extra training
//!    QAT gets must not be counted as recovery);
//! 3. PTQ: the control model prepared with the scheme, evaluated without training;
//! 4. QAT: the float model prepared with the scheme, `qat_steps` steps on the control's
//!    batches and schedule;
//! 5. GGML schemes: convert, export GGUF (token_embd F32), load it in candle-transformers'
//!    `quantized_llama` and evaluate the same windows there, one token at a time through
//!    its KV cache; tokens/s against the same model exported as F32; intx schemes have no
//!    GGUF type and stay in fake-quant form;
//! 6. greedy samples (a sliding window of the last `CONTEXT` characters).
//!
//! Needs `idx.rs`, `fused_adamw.rs`, `trainer.rs`, `shakespeare.rs`, `lm_training.rs` and `tiny_llama.rs` as
//! sibling modules.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_qat::checkpoint;
use candle_qat::prelude::*;
use candle_transformers::models::quantized_llama::ModelWeights;
use indicatif::ProgressBar;

use super::fused_adamw::FusedAdamW;
use super::lm_training::{self, LrSchedule, EVAL_BATCH};
use super::shakespeare::{
    BatchSampler, Corpus, WindowSet, BATCH_SIZE, CONTEXT, EVAL_SEED, EVAL_WINDOWS,
    FINETUNE_BATCH_STREAM, FLOAT_BATCH_STREAM,
};
use super::tiny_llama::{TinyLlama, TinyLlamaConfig};
use super::trainer::{self, AnyResult, Rng};

/// The quantization scheme of every Linear (the blocks' and the output); the embedding and
/// the norms stay float.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SchemeArg {
    /// GGML Q4_0 weights, Q8_0 inputs (candle's quantized runtime): exported to GGUF.
    #[value(name = "q4_0")]
    Q4_0,
    /// GGML Q8_0 weights and inputs: exported to GGUF.
    #[value(name = "q8_0")]
    Q8_0,
    /// torchao's 8da4w: int8 per-token dynamic inputs, int4 weights in groups of 32
    /// (fake-quant only: GGUF has no matching type).
    #[value(name = "8da4w")]
    Int8DynInt4W,
    /// int3 weights in groups of 32, inputs float (fake-quant only).
    #[value(name = "int3-g32")]
    Int3G32,
}

impl SchemeArg {
    pub fn name(self) -> &'static str {
        match self {
            SchemeArg::Q4_0 => "q4_0",
            SchemeArg::Q8_0 => "q8_0",
            SchemeArg::Int8DynInt4W => "8da4w",
            SchemeArg::Int3G32 => "int3-g32",
        }
    }

    /// The qconfig given to every layer (prepare_qat leaves Embedding and RmsNorm float
    /// under these schemes).
    pub fn qconfig(self) -> candle_qat::Result<QConfig> {
        Ok(match self {
            SchemeArg::Q4_0 => QConfig::ggml(BlockType::Q4_0),
            SchemeArg::Q8_0 => QConfig::ggml(BlockType::Q8_0),
            SchemeArg::Int8DynInt4W => QConfig::int8_dynamic_activation_int4_weight(32)?,
            SchemeArg::Int3G32 => QConfig::intx(None, IntxSpec::builder(3).per_group(32).build()?),
        })
    }

    /// Whether the scheme converts to candle `QMatMul`s and exports to GGUF.
    pub fn deploys(self) -> bool {
        matches!(self, SchemeArg::Q4_0 | SchemeArg::Q8_0)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct JobConfig {
    pub scheme: SchemeArg,
    pub seed: u64,
    pub float_steps: usize,
    pub qat_steps: usize,
    /// Training windows per step (the reference's 32; tests take fewer).
    pub batch_size: usize,
    /// Checkpoints and model.gguf go here (else the GGUF files go to a temporary directory
    /// that is removed).
    pub out: Option<PathBuf>,
    /// Load `out/float.safetensors` instead of training in float.
    pub resume: bool,
    /// Fixed validation windows for progress (the reference's 200).
    pub progress_windows: usize,
    /// Progress evaluation every this many steps (0: only at the end of a phase).
    pub eval_every: usize,
    /// Limit on the final figures' windows (`None`: the full validation split, 1,742).
    pub final_windows: Option<usize>,
    /// Greedy sample length after the prompt.
    pub sample_chars: usize,
    /// Windows of `CONTEXT` tokens decoded one at a time for the tokens/s figure.
    pub speed_windows: usize,
    /// Show indicatif bars and progress lines.
    pub verbose: bool,
    /// Train with candle's `AdamW` instead of [`FusedAdamW`] (the same values, slower).
    pub candle_adamw: bool,
}

impl JobConfig {
    /// The defaults for `scheme` and `seed`.
    pub fn default_for(scheme: SchemeArg, seed: u64) -> Self {
        JobConfig {
            scheme,
            seed,
            float_steps: 1500,
            qat_steps: 300,
            batch_size: BATCH_SIZE,
            out: None,
            resume: false,
            progress_windows: EVAL_WINDOWS,
            eval_every: 250,
            final_windows: None,
            sample_chars: 200,
            speed_windows: 8,
            verbose: true,
            candle_adamw: false,
        }
    }
}

/// Validation loss of one model: on the progress windows and on the final windows.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    pub progress: f64,
    pub full: f64,
}

/// Median step times of one training phase.
#[derive(Clone, Debug, Default)]
pub struct PhaseSteps {
    pub steps: usize,
    pub median: Duration,
    pub wall: Duration,
}

/// Everything the job measured.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub scheme: SchemeArg,
    pub seed: u64,
    pub threads: usize,
    pub batch_size: usize,
    pub final_windows: usize,
    pub progress_windows: usize,
    pub float: Losses,
    pub control: Losses,
    pub ptq: Losses,
    pub qat: Losses,
    /// The GGUF in quantized_llama (GGML schemes).
    pub deployed: Option<Losses>,
    pub f32_bytes: usize,
    /// Bytes of the GGUF's tensors, and the file's size.
    pub gguf_bytes: Option<(usize, u64)>,
    /// Tokens/s of (deployed GGUF, F32 GGUF of the same model) in quantized_llama, one token
    /// per call through the KV cache, batch 1.
    pub tokens_per_s: Option<(f64, f64)>,
    pub float_steps: Option<PhaseSteps>,
    pub control_steps: PhaseSteps,
    pub qat_steps: PhaseSteps,
    pub phases: Vec<(String, Duration)>,
    pub total: Duration,
    /// (label, text) greedy samples.
    pub samples: Vec<(String, String)>,
    /// Generated character at which the deployed model's greedy sample parts from the QAT
    /// fake-quant model's (None: identical over the whole sample).
    pub deployed_parts_at: Option<Option<usize>>,
    /// Top-1 minus top-2 logit of (QAT fake-quant, deployed GGUF) where they part.
    pub parting_margins: Option<(f32, f32)>,
    pub sample_chars: usize,
    pub files: Vec<PathBuf>,
}

/// (PTQ - QAT) / (PTQ - control), `None` when the PTQ gap is under 0.001.
pub fn recovery(ptq: f64, qat: f64, control: f64) -> Option<f64> {
    let gap = ptq - control;
    (gap >= 0.001).then(|| (ptq - qat) / gap)
}

fn fmt_recovery(r: Option<f64>) -> String {
    r.map(|r| format!("{:.1}%", 100.0 * r))
        .unwrap_or_else(|| "n/a".to_string())
}

impl JobReport {
    /// Equal-budget recovery on the final windows.
    pub fn recovery(&self) -> Option<f64> {
        recovery(self.ptq.full, self.qat.full, self.control.full)
    }

    /// The one line for scripts.
    pub fn summary_line(&self) -> String {
        let deployed = self
            .deployed
            .map(|d| format!("{:.4}", d.full))
            .unwrap_or_else(|| "n/a".to_string());
        format!(
            "summary: scheme={} float={:.4} control={:.4} ptq={:.4} qat={:.4} deployed={} \
             recovery={}",
            self.scheme.name(),
            self.float.full,
            self.control.full,
            self.ptq.full,
            self.qat.full,
            deployed,
            fmt_recovery(self.recovery())
        )
    }

    /// The final table, the samples, and last the summary line.
    pub fn print(&self) {
        let s = self.scheme.name();
        println!(
            "\n=== tiny Llama on tiny-shakespeare, scheme {s}, seed {}, {} threads ===",
            self.seed, self.threads
        );
        println!(
            "validation loss (nats/char): full = {} non-overlapping windows of {CONTEXT}, \
             progress = {} fixed windows",
            self.final_windows, self.progress_windows
        );
        println!("{:<34} {:>8} {:>9}", "model", "full", "progress");
        let row = |name: &str, l: Option<Losses>| match l {
            Some(l) => println!("{name:<34} {:>8.4} {:>9.4}", l.full, l.progress),
            None => println!("{name:<34} {:>8} {:>9}", "n/a", "n/a"),
        };
        row("float", Some(self.float));
        row("float control (+QAT's steps)", Some(self.control));
        row(&format!("PTQ {s} of the control"), Some(self.ptq));
        row(&format!("QAT {s} (fake-quant)"), Some(self.qat));
        row("deployed GGUF (quantized_llama)", self.deployed);
        if !self.scheme.deploys() {
            println!(
                "  ({s} has no GGUF type: the model stays in fake-quant form, nothing is \
                 converted or exported)"
            );
        }
        println!(
            "equal-budget recovery (PTQ - QAT) / (PTQ - control): full {}, progress {}",
            fmt_recovery(self.recovery()),
            fmt_recovery(recovery(
                self.ptq.progress,
                self.qat.progress,
                self.control.progress
            ))
        );
        println!(
            "QAT - control: full {:+.4}, progress {:+.4}",
            self.qat.full - self.control.full,
            self.qat.progress - self.control.progress
        );
        if let Some(d) = self.deployed {
            println!(
                "deployed vs QAT: {:+.3}% relative (full)",
                100.0 * (d.full - self.qat.full) / self.qat.full
            );
        }
        match self.gguf_bytes {
            Some((tensors, file)) => println!(
                "weights: f32 {} | GGUF {} tensors ({:.2}x smaller), file {}",
                trainer::fmt_bytes(self.f32_bytes),
                trainer::fmt_bytes(tensors),
                self.f32_bytes as f64 / tensors as f64,
                trainer::fmt_bytes(file as usize)
            ),
            None => println!(
                "weights: f32 {} | GGUF n/a ({s} stays fake-quant)",
                trainer::fmt_bytes(self.f32_bytes)
            ),
        }
        if let Some((q, f)) = self.tokens_per_s {
            println!(
                "candle-transformers quantized_llama, batch 1, one token per call: deployed {s} \
                 {q:.0} tokens/s vs F32 export {f:.0} tokens/s ({:.2}x)",
                q / f
            );
        }
        println!(
            "training steps (median, batch {}x{CONTEXT}, incl. batch sampling):",
            self.batch_size
        );
        let step_row = |name: &str, p: &PhaseSteps| {
            println!(
                "  {name:<18} {:>5} steps  median {:>9}  wall {:>9}",
                p.steps,
                trainer::fmt_duration(p.median),
                trainer::fmt_duration(p.wall)
            )
        };
        if let Some(p) = &self.float_steps {
            step_row("float", p);
        }
        step_row("float control", &self.control_steps);
        step_row(&format!("QAT {s}"), &self.qat_steps);
        println!("wall time per phase:");
        for (name, d) in &self.phases {
            println!("  {name:<30} {:>9}", trainer::fmt_duration(*d));
        }
        println!("  {:<30} {:>9}", "total", trainer::fmt_duration(self.total));
        for p in &self.files {
            println!("wrote {}", p.display());
        }
        for (label, text) in &self.samples {
            println!("\n-- greedy sample, {label}:\n{text}");
        }
        match self.deployed_parts_at {
            Some(None) => println!(
                "\ngreedy decoding: the deployed GGUF and the QAT fake-quant model agree on all \
                 {} generated characters",
                self.sample_chars
            ),
            Some(Some(i)) => {
                println!(
                    "\ngreedy decoding: the deployed GGUF parts from the QAT fake-quant model \
                     at generated character {i} of {}",
                    self.sample_chars
                );
                if let Some((q, d)) = self.parting_margins {
                    let note = if q.max(d) < 1e-2 {
                        " (a near tie, flipped by rounding)"
                    } else {
                        ""
                    };
                    println!(
                        "  there, top-1 minus top-2 logit: QAT fake-quant {q:.2e}, deployed \
                         {d:.2e}{note}"
                    );
                }
            }
            None => {}
        }
        println!("{}", self.summary_line());
    }
}

/// Wall time per phase, in order.
#[derive(Default)]
struct Phases(Vec<(String, Duration)>);

impl Phases {
    fn time<T>(&mut self, name: &str, f: impl FnOnce() -> AnyResult<T>) -> AnyResult<T> {
        let t = Instant::now();
        let r = f()?;
        self.0.push((name.to_string(), t.elapsed()));
        Ok(r)
    }
}

/// A fresh tiny Llama on its own VarMap.
fn new_model(dev: &Device) -> AnyResult<(VarMap, TinyLlama)> {
    let vm = VarMap::new();
    let m = TinyLlama::new(
        TinyLlamaConfig::shakespeare(),
        VarBuilder::from_varmap(&vm, DType::F32, dev),
    )?;
    Ok((vm, m))
}

/// A fresh model holding a copy of `from`'s weights.
fn copy_model(from: &VarMap, dev: &Device) -> AnyResult<(VarMap, TinyLlama)> {
    let (mut vm, m) = new_model(dev)?;
    trainer::copy_varmap(from, &mut vm)?;
    Ok((vm, m))
}

fn bar(len: usize, label: &str, verbose: bool) -> ProgressBar {
    if verbose {
        trainer::bar(len as u64, label.to_string())
    } else {
        ProgressBar::hidden()
    }
}

/// Mean cross-entropy of `model` over `set`.
fn eval_model<M: Module>(model: &M, set: &WindowSet, dev: &Device) -> AnyResult<f64> {
    lm_training::mean_loss(set, EVAL_BATCH, dev, |x| model.forward(x))
}

fn eval_both<M: Module>(
    model: &M,
    progress: &WindowSet,
    full: &WindowSet,
    dev: &Device,
) -> AnyResult<Losses> {
    Ok(Losses {
        progress: eval_model(model, progress, dev)?,
        full: eval_model(model, full, dev)?,
    })
}

/// Either optimizer, behind one object.
trait Step {
    fn lr(&mut self, lr: f64);
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()>;
}

impl<O: Optimizer> Step for O {
    fn lr(&mut self, lr: f64) {
        self.set_learning_rate(lr)
    }
    fn backward_step(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        Optimizer::backward_step(self, loss)
    }
}

/// What one training phase needs.
struct Phase<'a> {
    label: &'a str,
    schedule: LrSchedule,
    steps: usize,
    stream: u64,
}

/// Trains `model` (whose parameters are `vm`'s variables) for `phase.steps` AdamW steps on
/// batches of the training split; progress evaluations on `progress` every `eval_every`.
fn train_phase(
    model: &TinyLlama,
    vm: &VarMap,
    phase: &Phase,
    cfg: &JobConfig,
    corpus: &Corpus,
    progress: &WindowSet,
    dev: &Device,
) -> AnyResult<PhaseSteps> {
    let mut sampler = BatchSampler::new(cfg.seed, phase.stream, cfg.batch_size)?;
    let mut opt: Box<dyn Step> = if cfg.candle_adamw {
        Box::new(lm_training::adamw(vm.all_vars(), phase.schedule.at(0))?)
    } else {
        Box::new(FusedAdamW::new(
            vm.all_vars(),
            lm_training::adamw_params(phase.schedule.at(0)),
        )?)
    };
    let pb = bar(phase.steps, phase.label, cfg.verbose);
    let mut times = Vec::with_capacity(phase.steps);
    let mut ema: Option<f64> = None;
    let start = Instant::now();
    let mut evals = Duration::ZERO;
    for s in 0..phase.steps {
        let t = Instant::now();
        let (x, y) = sampler.next_batch(&corpus.train, dev)?;
        let logits = model.forward(&x)?;
        let (b, t_len, v) = logits.dims3()?;
        let loss =
            candle_nn::loss::cross_entropy(&logits.reshape((b * t_len, v))?, &y.flatten_all()?)?;
        opt.lr(phase.schedule.at(s));
        opt.backward_step(&loss)?;
        times.push(t.elapsed());
        let l = f64::from(loss.to_scalar::<f32>()?);
        if !l.is_finite() {
            return Err(format!("{}: the loss is {l} at step {s}", phase.label).into());
        }
        let e = ema.map_or(l, |e| 0.98 * e + 0.02 * l);
        ema = Some(e);
        pb.inc(1);
        pb.set_message(format!("loss(ema) {e:.4} lr {:.2e}", phase.schedule.at(s)));
        let done = s + 1;
        if cfg.verbose && cfg.eval_every > 0 && done % cfg.eval_every == 0 {
            let te = Instant::now();
            let val = eval_model(model, progress, dev)?;
            evals += te.elapsed();
            let line = format!(
                "  [{}] step {done:>5}  lr {:.2e}  train(ema) {e:.4}  val {val:.4}  {:>7.1}s",
                phase.label,
                phase.schedule.at(s),
                start.elapsed().as_secs_f64()
            );
            // A hidden bar (output not a terminal) prints nothing.
            if pb.is_hidden() {
                println!("{line}");
            } else {
                pb.println(line);
            }
        }
    }
    pb.finish_and_clear();
    let wall = start.elapsed() - evals;
    times.sort();
    Ok(PhaseSteps {
        steps: phase.steps,
        median: times.get(times.len() / 2).copied().unwrap_or_default(),
        wall,
    })
}

fn load_gguf(path: &Path, dev: &Device) -> AnyResult<ModelWeights> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let content =
        gguf_file::Content::read(&mut f).map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(ModelWeights::from_gguf(content, &mut f, dev)?)
}

/// Logits `(b, CONTEXT, vocab)` of a GGUF model for inputs `(b, CONTEXT)`, teacher-forced
/// one token at a time through a fresh KV cache.
fn gguf_logits(weights: &ModelWeights, x: &Tensor) -> candle_core::Result<Tensor> {
    let (_, t) = x.dims2()?;
    let mut q = weights.clone();
    let mut pos = Vec::with_capacity(t);
    for p in 0..t {
        pos.push(q.forward(&x.i((.., p..p + 1))?.contiguous()?, p)?);
    }
    Tensor::stack(&pos, 1)
}

/// Windows per teacher-forced pass through quantized_llama: each of the `CONTEXT` calls
/// costs about the same whatever the batch, so the fewer passes the better (the KV cache of
/// 512 windows is 32 MiB).
const GGUF_EVAL_BATCH: usize = 512;

fn eval_gguf(
    weights: &ModelWeights,
    set: &WindowSet,
    dev: &Device,
    label: &str,
    verbose: bool,
) -> AnyResult<f64> {
    let pb = bar(set.len().div_ceil(GGUF_EVAL_BATCH), label, verbose);
    let r = lm_training::mean_loss(set, GGUF_EVAL_BATCH, dev, |x| {
        let l = gguf_logits(weights, x);
        pb.inc(1);
        l
    });
    pb.finish_and_clear();
    r
}

/// Tokens/s of `weights` decoding `set`'s first `n` windows one token per call (batch 1).
fn tokens_per_s(weights: &ModelWeights, set: &WindowSet, n: usize, dev: &Device) -> AnyResult<f64> {
    let n = n.min(set.len()).max(1);
    let (x, _) = set.batch(0..n, dev)?;
    let t = Instant::now();
    for w in 0..n {
        let mut q = weights.clone();
        for p in 0..CONTEXT {
            q.forward(&x.i((w..w + 1, p..p + 1))?.contiguous()?, p)?;
        }
    }
    Ok((n * CONTEXT) as f64 / t.elapsed().as_secs_f64())
}

/// Greedy decoding of `n` characters after `prompt`, `next` giving the logits `(vocab,)` of
/// the token after a window of at most `CONTEXT` ids.
fn greedy(
    prompt: &[u32],
    n: usize,
    mut next: impl FnMut(&[u32]) -> AnyResult<Tensor>,
) -> AnyResult<Vec<u32>> {
    let mut ids = prompt.to_vec();
    for _ in 0..n {
        let lo = ids.len().saturating_sub(CONTEXT);
        let logits = next(&ids[lo..])?;
        ids.push(logits.argmax(0)?.to_scalar::<u32>()?);
    }
    Ok(ids)
}

fn greedy_model<M: Module>(m: &M, prompt: &[u32], n: usize, dev: &Device) -> AnyResult<Vec<u32>> {
    greedy(prompt, n, |w| {
        let x = Tensor::new(w, dev)?.unsqueeze(0)?;
        Ok(m.forward(&x)?.i((0, w.len() - 1))?)
    })
}

fn greedy_gguf(
    weights: &ModelWeights,
    prompt: &[u32],
    n: usize,
    dev: &Device,
) -> AnyResult<Vec<u32>> {
    greedy(prompt, n, |w| {
        let x = Tensor::new(w, dev)?.unsqueeze(0)?;
        // The whole window from position 0 (its causal-mask path) returns the last position.
        Ok(weights.clone().forward(&x, 0)?.squeeze(0)?)
    })
}

/// Top-1 minus top-2 of a `(vocab,)` logit vector.
fn top2_margin(l: &Tensor) -> AnyResult<f32> {
    let mut v = l.to_vec1::<f32>()?;
    v.sort_by(|a, b| b.total_cmp(a));
    Ok(v.first().copied().unwrap_or(0.0) - v.get(1).copied().unwrap_or(0.0))
}

/// Bytes of the tensors of a GGUF writer.
fn gguf_tensor_bytes(model: &TinyLlama) -> AnyResult<usize> {
    Ok(model
        .gguf()
        .tensors()?
        .iter()
        .map(|(_, t)| t.storage_size_in_bytes())
        .sum())
}

/// Runs the job on `dev` with rayon's current pool.
pub fn run(cfg: &JobConfig, dev: &Device) -> AnyResult<JobReport> {
    let total = Instant::now();
    let mut phases = Phases::default();
    let s = cfg.scheme.name();
    let qconfig = cfg.scheme.qconfig()?;
    let mapping = QConfigMapping::global(qconfig);

    let corpus = Corpus::embedded()?;
    let progress = WindowSet::eval(&corpus.val, cfg.progress_windows, EVAL_SEED)?;
    let mut full = WindowSet::non_overlapping(&corpus.val)?;
    if let Some(n) = cfg.final_windows {
        let starts: Vec<usize> = full.starts().iter().copied().take(n).collect();
        full = WindowSet::at(&corpus.val, starts)?;
    }
    if cfg.verbose {
        println!(
            "data: {} ({} chars, vocab {}, train {}, val {}); scheme {s}, seed {}, {} threads",
            corpus.source,
            corpus.train.len() + corpus.val.len(),
            corpus.vocab.len(),
            corpus.train.len(),
            corpus.val.len(),
            cfg.seed,
            rayon::current_num_threads()
        );
    }
    let mut files = Vec::new();
    let (out_dir, keep_files) = match &cfg.out {
        Some(o) => (o.clone(), true),
        None => (
            std::env::temp_dir().join(format!("shakespeare_qat_{}_{}", std::process::id(), s)),
            false,
        ),
    };
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("creating {}: {e}", out_dir.display()))?;

    // ---- 1. float --------------------------------------------------------------------
    let (float_vm, float_model) = new_model(dev)?;
    let float_ckpt = out_dir.join("float.safetensors");
    let mut float_steps = None;
    if cfg.resume {
        if cfg.out.is_none() {
            return Err("--resume needs --out (the directory holding float.safetensors)".into());
        }
        let mut vm = float_vm.clone();
        phases.time("float (resumed)", || {
            vm.load(&float_ckpt).map_err(|e| {
                format!(
                    "loading the float checkpoint {}: {e}; run once without --resume to \
                     write it",
                    float_ckpt.display()
                )
                .into()
            })
        })?;
        if cfg.verbose {
            println!("float: loaded {}", float_ckpt.display());
        }
    } else {
        let mut rng = Rng::stream(cfg.seed, 0);
        float_model.init_weights(&float_vm, || rng.normal())?;
        let steps = phases.time("float train", || {
            train_phase(
                &float_model,
                &float_vm,
                &Phase {
                    label: "float",
                    schedule: LrSchedule::float(cfg.float_steps),
                    steps: cfg.float_steps,
                    stream: FLOAT_BATCH_STREAM,
                },
                cfg,
                &corpus,
                &progress,
                dev,
            )
        })?;
        float_steps = Some(steps);
        if keep_files {
            float_vm.save(&float_ckpt)?;
            files.push(float_ckpt.clone());
        }
    }
    let float = phases.time("float eval", || {
        eval_both(&float_model, &progress, &full, dev)
    })?;
    if cfg.verbose {
        println!(
            "float: val {:.4} (full) {:.4} (progress)",
            float.full, float.progress
        );
    }
    let finetune = LrSchedule::finetune(cfg.qat_steps);

    // ---- 2. float control --------------------------------------------------------------
    let (control_vm, control_model) = copy_model(&float_vm, dev)?;
    let control_steps = phases.time("float control train", || {
        train_phase(
            &control_model,
            &control_vm,
            &Phase {
                label: "float+",
                schedule: finetune,
                steps: cfg.qat_steps,
                stream: FINETUNE_BATCH_STREAM,
            },
            cfg,
            &corpus,
            &progress,
            dev,
        )
    })?;
    let control = phases.time("float control eval", || {
        eval_both(&control_model, &progress, &full, dev)
    })?;
    if cfg.verbose {
        println!(
            "float control: val {:.4} (full) {:.4} (progress)",
            control.full, control.progress
        );
    }

    // ---- 3. PTQ of the control -----------------------------------------------------------
    let (ptq_model, ptq) = phases.time("PTQ eval", || {
        let (_vm, mut m) = copy_model(&control_vm, dev)?;
        prepare_qat(&mut m, &mapping)?;
        let l = eval_both(&m, &progress, &full, dev)?;
        Ok((m, l))
    })?;
    if cfg.verbose {
        println!(
            "PTQ {s} of the control: val {:.4} (full) {:.4} (progress)",
            ptq.full, ptq.progress
        );
    }

    // ---- 4. QAT -----------------------------------------------------------------------------
    let (qat_vm, mut qat_model) = copy_model(&float_vm, dev)?;
    prepare_qat(&mut qat_model, &mapping)?;
    let qat_steps = phases.time("QAT train", || {
        train_phase(
            &qat_model,
            &qat_vm,
            &Phase {
                label: &format!("QAT {s}"),
                schedule: finetune,
                steps: cfg.qat_steps,
                stream: FINETUNE_BATCH_STREAM,
            },
            cfg,
            &corpus,
            &progress,
            dev,
        )
    })?;
    let qat = phases.time("QAT eval", || eval_both(&qat_model, &progress, &full, dev))?;
    if cfg.verbose {
        println!(
            "QAT {s}: val {:.4} (full) {:.4} (progress)",
            qat.full, qat.progress
        );
    }
    if keep_files {
        let p = out_dir.join(format!("qat_{s}.safetensors"));
        checkpoint::save_qat_checkpoint(&mut qat_model, &qat_vm, &p)?;
        files.push(p);
    }

    // ---- 5. convert, GGUF, quantized_llama ----------------------------------------------------
    let f32_bytes = trainer::varmap_bytes(&float_vm);
    let (mut deployed, mut gguf_bytes, mut tps, mut deployed_weights) = (None, None, None, None);
    if cfg.scheme.deploys() {
        let gguf_path = out_dir.join("model.gguf");
        let f32_path = out_dir.join("model_f32.gguf");
        let weights = phases.time("convert + GGUF export", || {
            let mut conv = qat_model.clone();
            // A clone notes its inputs afresh: one forward before convert.
            conv.forward(&progress.batch(0..1, dev)?.0)?;
            candle_qat::passes::convert(&mut conv)?;
            conv.gguf().write(&gguf_path)?;
            let tensors = gguf_tensor_bytes(&conv)?;
            let file = std::fs::metadata(&gguf_path)
                .map_err(|e| format!("{}: {e}", gguf_path.display()))?
                .len();
            gguf_bytes = Some((tensors, file));
            // The same model in float (the QAT model's latent weights) as F32 GGUF.
            let (_vm, f) = copy_model(&qat_vm, dev)?;
            f.gguf().write(&f32_path)?;
            load_gguf(&gguf_path, dev)
        })?;
        let l = phases.time("deployed GGUF eval", || {
            Ok(Losses {
                progress: eval_gguf(&weights, &progress, dev, "GGUF progress", cfg.verbose)?,
                full: eval_gguf(&weights, &full, dev, "GGUF full", cfg.verbose)?,
            })
        })?;
        if cfg.verbose {
            println!(
                "deployed GGUF in quantized_llama: val {:.4} (full) {:.4} (progress)",
                l.full, l.progress
            );
        }
        deployed = Some(l);
        let f32_weights = load_gguf(&f32_path, dev)?;
        tps = Some(phases.time("tokens/s", || {
            // Alternate the two, twice, and keep each one's better run.
            let (mut q, mut f) = (0f64, 0f64);
            for _ in 0..2 {
                q = q.max(tokens_per_s(&weights, &full, cfg.speed_windows, dev)?);
                f = f.max(tokens_per_s(&f32_weights, &full, cfg.speed_windows, dev)?);
            }
            Ok((q, f))
        })?);
        if keep_files {
            files.push(gguf_path);
            files.push(f32_path);
        }
        deployed_weights = Some(weights);
    }

    // ---- 6. greedy samples ------------------------------------------------------------------
    let prompt = corpus.vocab.encode("ROMEO:")?;
    let n = cfg.sample_chars;
    let (samples, parts, margins) = phases.time("greedy samples", || {
        let mut samples = Vec::new();
        let f = greedy_model(&float_model, &prompt, n, dev)?;
        samples.push(("float".to_string(), corpus.vocab.decode(&f)?));
        let p = greedy_model(&ptq_model, &prompt, n, dev)?;
        samples.push((format!("PTQ {s} of the control"), corpus.vocab.decode(&p)?));
        let q = greedy_model(&qat_model, &prompt, n, dev)?;
        let mut parts = None;
        let mut margins = None;
        match &deployed_weights {
            Some(w) => {
                let d = greedy_gguf(w, &prompt, n, dev)?;
                samples.push((
                    format!("deployed {s} GGUF in quantized_llama"),
                    corpus.vocab.decode(&d)?,
                ));
                let at = q
                    .iter()
                    .zip(&d)
                    .skip(prompt.len())
                    .position(|(a, b)| a != b);
                // Where they part: each model's top-1 minus top-2 logit on the shared prefix
                // (a near tie is a rounding flip, not a different model).
                if let Some(i) = at {
                    let prefix = &q[..prompt.len() + i];
                    let win = &prefix[prefix.len().saturating_sub(CONTEXT)..];
                    let x = Tensor::new(win, dev)?.unsqueeze(0)?;
                    let lq = qat_model.forward(&x)?.i((0, win.len() - 1))?;
                    let ld = w.clone().forward(&x, 0)?.squeeze(0)?;
                    margins = Some((top2_margin(&lq)?, top2_margin(&ld)?));
                }
                parts = Some(at);
            }
            None => samples.push((
                format!("QAT {s} (fake-quant; no GGUF for this scheme)"),
                corpus.vocab.decode(&q)?,
            )),
        }
        Ok((samples, parts, margins))
    })?;

    if !keep_files {
        let _ = std::fs::remove_dir_all(&out_dir);
    }
    Ok(JobReport {
        scheme: cfg.scheme,
        seed: cfg.seed,
        threads: rayon::current_num_threads(),
        batch_size: cfg.batch_size,
        final_windows: full.len(),
        progress_windows: progress.len(),
        float,
        control,
        ptq,
        qat,
        deployed,
        f32_bytes,
        gguf_bytes,
        tokens_per_s: tps,
        float_steps,
        control_steps,
        qat_steps,
        phases: phases.0,
        total: total.elapsed(),
        samples,
        deployed_parts_at: parts,
        parting_margins: margins,
        sample_chars: n,
        files,
    })
}
