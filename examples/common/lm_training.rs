//! What the language-model example trains and evaluates with, as the PyTorch reference
//! (`tinyllama_qat.py`) does: its learning-rate schedule, AdamW with its settings, and the
//! mean cross-entropy of a model over a [`WindowSet`].
//!
//! `candle_nn::AdamW` is `torch.optim.AdamW` (decoupled weight decay): each step,
//! `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, then
//! `p = p (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`, the decay applied
//! to the weights before the update and scaled by the current learning rate, `eps` added after
//! the bias correction of `sqrt(v)`. The one difference: candle counts steps once per
//! optimizer, PyTorch once per parameter that had a gradient; the two agree when every
//! parameter gets a gradient every step, as here (the test `adamw_matches_torch` checks three
//! steps against torch 2.15's values).
//! Needs `shakespeare.rs` and `trainer.rs` as sibling modules.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use super::shakespeare::{WindowSet, CONTEXT};
use super::trainer::AnyResult;

/// AdamW's weight decay, on every parameter (norm weights and embedding included).
pub const WEIGHT_DECAY: f64 = 0.1;
/// Windows per forward when evaluating (the reference's chunk).
pub const EVAL_BATCH: usize = 100;

/// The learning rate of each step: a linear warm-up `max * (s + 1) / warmup` for the first
/// `warmup` steps, then a cosine from `max` down towards `min` over the remaining steps:
/// `min + (max - min) (1 + cos(pi p)) / 2` with `p = (s - warmup) / max(1, total - warmup)`
/// (the reference's `lr_at`; the last step, `p = (total - 1 - warmup) / (total - warmup)`,
/// is just above `min`). Past `total`, `min`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub max: f64,
    pub min: f64,
    pub warmup: usize,
    pub total: usize,
}

impl LrSchedule {
    /// The float phase: 3e-3, 100 warm-up steps, cosine to 3e-4 over `total` steps.
    pub fn float(total: usize) -> Self {
        LrSchedule {
            max: 3e-3,
            min: 3e-4,
            warmup: 100,
            total,
        }
    }

    /// QAT and its float control: 3e-4 cosine to 3e-5 over `total` steps, no warm-up.
    pub fn finetune(total: usize) -> Self {
        LrSchedule {
            max: 3e-4,
            min: 3e-5,
            warmup: 0,
            total,
        }
    }

    /// The rate of step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.max * (step + 1) as f64 / self.warmup as f64;
        }
        if step >= self.total {
            return self.min;
        }
        let p = (step - self.warmup) as f64 / self.total.saturating_sub(self.warmup).max(1) as f64;
        self.min + 0.5 * (self.max - self.min) * (1.0 + (std::f64::consts::PI * p).cos())
    }
}

/// AdamW as the reference makes it: betas 0.9 / 0.999, eps 1e-8, weight decay
/// [`WEIGHT_DECAY`] on all of `vars`, learning rate `lr` (set each step from an
/// [`LrSchedule`] with `set_learning_rate`).
pub fn adamw(vars: Vec<Var>, lr: f64) -> candle_core::Result<AdamW> {
    AdamW::new(vars, adamw_params(lr))
}

/// The reference's AdamW settings at learning rate `lr`.
pub fn adamw_params(lr: f64) -> ParamsAdamW {
    ParamsAdamW {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: WEIGHT_DECAY,
    }
}

/// The mean cross-entropy of each window of `set` (over its `CONTEXT` positions), `batch`
/// windows per call of `logits`, which maps inputs `(b, CONTEXT)` u32 to logits
/// `(b, CONTEXT, vocab)` (any float dtype; the loss is taken in f32).
pub fn window_losses<F>(
    set: &WindowSet,
    batch: usize,
    dev: &Device,
    mut logits: F,
) -> AnyResult<Vec<f64>>
where
    F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
{
    if batch == 0 {
        return Err("lm_training::window_losses: the batch must be at least 1 window".into());
    }
    let mut out = Vec::with_capacity(set.len());
    let mut lo = 0;
    while lo < set.len() {
        let hi = (lo + batch).min(set.len());
        let (x, y) = set.batch(lo..hi, dev)?;
        let z = logits(&x)?;
        let (b, t, v) = z.dims3().map_err(|_| {
            format!(
                "lm_training::window_losses: the model gave logits of shape {:?}; expected \
                 (batch, {CONTEXT}, vocab)",
                z.dims()
            )
        })?;
        if (b, t) != (hi - lo, CONTEXT) {
            return Err(format!(
                "lm_training::window_losses: the model gave logits {:?} for inputs {:?}; \
                 expected ({}, {CONTEXT}, vocab)",
                z.dims(),
                x.dims(),
                hi - lo
            )
            .into());
        }
        if set.max_token() as usize >= v {
            return Err(format!(
                "lm_training::window_losses: the windows hold token {} but the logits have a \
                 vocabulary of {v}",
                set.max_token()
            )
            .into());
        }
        let logp = candle_nn::ops::log_softmax(&z.to_dtype(DType::F32)?, D::Minus1)?;
        let nll = logp
            .gather(&y.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?
            .neg()?
            .mean(D::Minus1)?;
        out.extend(nll.to_vec1::<f32>()?.into_iter().map(f64::from));
        lo = hi;
    }
    Ok(out)
}

/// The mean cross-entropy over all positions of all windows of `set` (every window has
/// `CONTEXT` positions, so the mean of [`window_losses`]).
pub fn mean_loss<F>(set: &WindowSet, batch: usize, dev: &Device, logits: F) -> AnyResult<f64>
where
    F: FnMut(&Tensor) -> candle_core::Result<Tensor>,
{
    if set.is_empty() {
        return Err("lm_training::mean_loss: the window set is empty".into());
    }
    let l = window_losses(set, batch, dev, logits)?;
    Ok(l.iter().sum::<f64>() / l.len() as f64)
}

/// One optimizer step at the schedule's rate for `step`: backpropagates `loss` and updates.
pub fn adamw_step(
    opt: &mut AdamW,
    schedule: &LrSchedule,
    step: usize,
    loss: &Tensor,
) -> candle_core::Result<()> {
    opt.set_learning_rate(schedule.at(step));
    opt.backward_step(loss)
}
