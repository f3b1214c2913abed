//! The tiny-shakespeare corpus as the PyTorch reference (`tinyllama_qat.py`) uses it: a
//! character vocabulary (the sorted set of the text's characters, 65 for the embedded
//! corpus), the first 90% of characters for training and the last 10% for validation, and
//! windows of `CONTEXT + 1` characters (64 inputs, the next 64 as targets):
//! - training batches: `BATCH_SIZE` windows at starts drawn uniformly from
//!   `0..len - CONTEXT` (torch's `randint(0, len - CONTEXT)`), from a seeded [`Rng`] stream;
//! - progress evaluation: `EVAL_WINDOWS` fixed windows drawn the same way from a generator
//!   seeded with `EVAL_SEED` (validation) or `EVAL_SEED + 1` (training), the same for every
//!   training seed;
//! - the final figures: every non-overlapping window of the validation split,
//!   `(len - 1) / CONTEXT` of them (1,742) at starts `0, 64, 128, ...`.
//!
//! Needs `trainer.rs` (for [`Rng`] and the error type) as a sibling module.
//! The corpus is embedded in the binary ([`EMBEDDED`], `data/tinyshakespeare/input.txt`,
//! char-rnn's copy, MIT; the plays are in the public domain).
#![allow(dead_code)]

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::trainer::{AnyResult, Rng};

/// The embedded corpus (1,115,394 characters).
pub const EMBEDDED: &str = include_str!("../../data/tinyshakespeare/input.txt");
/// Tokens a model sees at once; a window holds one more (the last target).
pub const CONTEXT: usize = 64;
/// Size of the embedded corpus' vocabulary.
pub const VOCAB_SIZE: usize = 65;
/// Share of the characters, from the start, that form the training split.
pub const TRAIN_FRACTION: f64 = 0.9;
/// Training windows per step.
pub const BATCH_SIZE: usize = 32;
/// Fixed windows of each split evaluated for progress.
pub const EVAL_WINDOWS: usize = 200;
/// Seed of the validation progress windows (the training ones use `EVAL_SEED + 1`); the
/// reference's `--eval-seed` default.
pub const EVAL_SEED: u64 = 1234;
/// [`Rng::stream`] index of the float phase's batches (the reference seeds them with
/// `seed * 1000 + 1`). Stream 0 is left to weight initialisation.
pub const FLOAT_BATCH_STREAM: u64 = 1;
/// [`Rng::stream`] index of the batches of the fine-tuning phases (QAT and the float
/// control draw the same batches, as in the reference's `seed * 1000 + 2`).
pub const FINETUNE_BATCH_STREAM: u64 = 2;

/// A character vocabulary: the sorted set of a text's characters, id = rank.
#[derive(Clone, Debug)]
pub struct Vocab {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl Vocab {
    /// The sorted set of the characters of `text` (Python's `sorted(set(text))`: by code
    /// point).
    pub fn from_text(text: &str) -> AnyResult<Self> {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        if chars.is_empty() {
            return Err("shakespeare::Vocab::from_text: the text is empty; give a corpus".into());
        }
        let ids = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as u32))
            .collect();
        Ok(Vocab { chars, ids })
    }

    /// Number of distinct characters.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The characters, in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// Ids of the characters of `text`; a character outside the vocabulary is an error that
    /// names it and its position.
    pub fn encode(&self, text: &str) -> AnyResult<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.ids.get(&c).copied().ok_or_else(|| {
                    format!(
                        "shakespeare::Vocab::encode: character {c:?} at position {i} is not in \
                         the corpus' vocabulary of {} characters; use only characters of the \
                         corpus",
                        self.len()
                    )
                    .into()
                })
            })
            .collect()
    }

    /// The text of `ids`; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> AnyResult<String> {
        ids.iter()
            .enumerate()
            .map(|(i, &id)| {
                self.chars.get(id as usize).copied().ok_or_else(|| {
                    format!(
                        "shakespeare::Vocab::decode: id {id} at position {i} is outside the \
                         vocabulary (0..{})",
                        self.len()
                    )
                    .into()
                })
            })
            .collect()
    }
}

/// A corpus encoded and split: `train` is the first `floor(0.9 * n)` characters (Python's
/// `int(0.9 * n)`), `val` the rest.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub vocab: Vocab,
    pub train: Vec<u32>,
    pub val: Vec<u32>,
    /// Where the text came from, for the report.
    pub source: String,
}

impl Corpus {
    /// The embedded tiny-shakespeare (65 characters; 1,003,854 train, 111,540 validation).
    pub fn embedded() -> AnyResult<Self> {
        Self::from_text(
            EMBEDDED,
            "embedded data/tinyshakespeare/input.txt (char-rnn's tiny-shakespeare)",
        )
    }

    /// A UTF-8 text file.
    pub fn from_file(path: &Path) -> AnyResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "shakespeare::Corpus::from_file: reading {}: {e}",
                path.display()
            )
        })?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Any text; each split needs at least one window (`CONTEXT + 1` characters).
    pub fn from_text(text: &str, source: &str) -> AnyResult<Self> {
        let vocab = Vocab::from_text(text)?;
        let mut ids = vocab.encode(text)?;
        let n_train = split_point(ids.len());
        let val = ids.split_off(n_train);
        let train = ids;
        for (name, split) in [("training", &train), ("validation", &val)] {
            if split.len() < CONTEXT + 1 {
                return Err(format!(
                    "shakespeare::Corpus::from_text: {source}: the {name} split has {} \
                     characters, fewer than one window of {}; give a longer text",
                    split.len(),
                    CONTEXT + 1
                )
                .into());
            }
        }
        Ok(Corpus {
            vocab,
            train,
            val,
            source: source.to_string(),
        })
    }
}

/// Characters in the training split of an `n`-character text: `int(0.9 * n)` as Python
/// computes it (the product in f64, truncated).
pub fn split_point(n: usize) -> usize {
    (TRAIN_FRACTION * n as f64) as usize
}

/// Windows of one split, materialised: window `i` is `tokens[starts[i]..starts[i] + CONTEXT
/// + 1]`, its inputs the first `CONTEXT` tokens and its targets the last `CONTEXT`.
#[derive(Clone, Debug)]
pub struct WindowSet {
    starts: Vec<usize>,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    max_token: u32,
}

impl WindowSet {
    /// The windows of `tokens` at `starts`; a start whose window does not fit is an error.
    pub fn at(tokens: &[u32], starts: Vec<usize>) -> AnyResult<Self> {
        let mut inputs = Vec::with_capacity(starts.len() * CONTEXT);
        let mut targets = Vec::with_capacity(starts.len() * CONTEXT);
        let mut max_token = 0;
        for &s in &starts {
            let w = s
                .checked_add(CONTEXT + 1)
                .and_then(|end| tokens.get(s..end))
                .ok_or_else(|| {
                    format!(
                        "shakespeare::WindowSet::at: a window at {s} needs {} tokens but the \
                         split has {}; starts must be below {}",
                        CONTEXT + 1,
                        tokens.len(),
                        tokens.len().saturating_sub(CONTEXT)
                    )
                })?;
            inputs.extend_from_slice(&w[..CONTEXT]);
            targets.extend_from_slice(&w[1..]);
            max_token = w.iter().copied().fold(max_token, u32::max);
        }
        Ok(WindowSet {
            starts,
            inputs,
            targets,
            max_token,
        })
    }

    /// `n` windows at starts drawn uniformly from `0..tokens.len() - CONTEXT` by `rng`.
    pub fn random(tokens: &[u32], n: usize, rng: &mut Rng) -> AnyResult<Self> {
        let Some(range) = tokens.len().checked_sub(CONTEXT).filter(|&r| r > 0) else {
            return Err(format!(
                "shakespeare::WindowSet::random: the split has {} tokens, fewer than one \
                 window of {}",
                tokens.len(),
                CONTEXT + 1
            )
            .into());
        };
        let starts = (0..n).map(|_| rng.below(range)).collect();
        Self::at(tokens, starts)
    }

    /// The fixed evaluation windows: `n` random windows from a generator seeded with `seed`
    /// ([`EVAL_SEED`] for validation, `EVAL_SEED + 1` for training), whatever the training
    /// seed.
    pub fn eval(tokens: &[u32], n: usize, seed: u64) -> AnyResult<Self> {
        Self::random(tokens, n, &mut Rng::new(seed))
    }

    /// Every non-overlapping window: `(len - 1) / CONTEXT` windows at `0, CONTEXT, ...`
    /// (1,742 on the validation split).
    pub fn non_overlapping(tokens: &[u32]) -> AnyResult<Self> {
        let n = tokens.len().saturating_sub(1) / CONTEXT;
        Self::at(tokens, (0..n).map(|i| i * CONTEXT).collect())
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Where each window starts in its split.
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// The largest token id in the windows (to check a model's vocabulary covers them).
    pub fn max_token(&self) -> u32 {
        self.max_token
    }

    /// Inputs and targets of windows `range`, each `(range.len(), CONTEXT)` u32.
    pub fn batch(&self, range: Range<usize>, dev: &Device) -> AnyResult<(Tensor, Tensor)> {
        if range.start > range.end || range.end > self.len() {
            return Err(format!(
                "shakespeare::WindowSet::batch: windows {range:?} of a set of {}",
                self.len()
            )
            .into());
        }
        let (lo, hi) = (range.start * CONTEXT, range.end * CONTEXT);
        let shape = (range.len(), CONTEXT);
        Ok((
            Tensor::from_slice(&self.inputs[lo..hi], shape, dev)?,
            Tensor::from_slice(&self.targets[lo..hi], shape, dev)?,
        ))
    }

    /// Inputs and targets of all windows.
    pub fn all(&self, dev: &Device) -> AnyResult<(Tensor, Tensor)> {
        self.batch(0..self.len(), dev)
    }
}

/// The training batches of one phase: `batch` random windows per call, from its own
/// [`Rng`] stream, so that phases given the same stream see the same batches.
#[derive(Clone, Debug)]
pub struct BatchSampler {
    rng: Rng,
    batch: usize,
}

impl BatchSampler {
    /// Batches of `batch` windows drawn from stream `stream` of `seed` ([`FLOAT_BATCH_STREAM`],
    /// [`FINETUNE_BATCH_STREAM`]).
    pub fn new(seed: u64, stream: u64, batch: usize) -> AnyResult<Self> {
        if batch == 0 {
            return Err("shakespeare::BatchSampler::new: the batch size must be at least 1".into());
        }
        Ok(BatchSampler {
            rng: Rng::stream(seed, stream),
            batch,
        })
    }

    /// The next batch of `tokens` (a training split): inputs and targets, each
    /// `(batch, CONTEXT)` u32.
    pub fn next_batch(&mut self, tokens: &[u32], dev: &Device) -> AnyResult<(Tensor, Tensor)> {
        WindowSet::random(tokens, self.batch, &mut self.rng)?.all(dev)
    }
}
