//! A Llama-architecture language model built from candle-qat layers: the graph of
//! `../shared/reference/tinyllama_qat.py` and of candle-transformers' `quantized_llama`
//! (general.architecture = "llama"), with Meta Llama's module names as variable paths
//! (`tok_embeddings`, `layers.N.attention.wq`, `layers.N.feed_forward.w1`, `norm`,
//! `output`, ...).
//!
//! tok_embeddings -> N x { x + wo(attention(rope(wq h), rope(wk h), wv h)) with h =
//! attention_norm(x); x + w2(silu(w1 h) * w3 h) with h = ffn_norm(x) } -> norm -> output
//! (untied), no biases. Attention is causal softmax(q kᵀ / sqrt(head_dim)) v, written here
//! with candle ops; rotary embeddings rotate interleaved pairs (2i, 2i+1) by position x
//! theta_i, theta_i = 1 / base^(2i / head_dim) in f32, as quantized_llama computes them.
//! The head split with the rotation and the softmax are candle-qat's `split_heads_rope_i` and
//! `causal_softmax` (scale, causal mask and softmax in one op): the values of candle's fused
//! kernels (which quantized_llama runs) and of its masking, with the backward those kernels
//! lack; the head split and merge are one op each, with the values and gradients of candle's
//! reshape/transpose composites.
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::gguf::{LlamaBlock, LlamaGguf, LlamaHparams};
use candle_qat::nn::{
    batched_matmul, batched_matmul_t, causal_softmax, merge_heads, softmax_last_dim, split_heads,
    split_heads_rope_i,
};
use candle_qat::prelude::*;

/// The model's sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TinyLlamaConfig {
    /// Vocabulary size (65 characters for tiny-shakespeare).
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Attention heads (head dim = dim / n_heads).
    pub n_heads: usize,
    /// SwiGLU hidden width.
    pub hidden: usize,
    /// Longest sequence the model takes (its rotary table's length).
    pub ctx: usize,
    /// RmsNorm epsilon.
    pub norm_eps: f64,
    /// Rotary base.
    pub rope_base: f32,
}

impl TinyLlamaConfig {
    /// The reference's model: 65 characters, width 128, 4 blocks of 4 heads x 32, SwiGLU
    /// 352, context 64, eps 1e-5, rotary base 10000.
    pub fn shakespeare() -> Self {
        TinyLlamaConfig {
            vocab: 65,
            dim: 128,
            n_layers: 4,
            n_heads: 4,
            hidden: 352,
            ctx: 64,
            norm_eps: 1e-5,
            rope_base: 10000.0,
        }
    }

    /// A small model for tests: 2 blocks of 2 heads x 16 (width 32), SwiGLU 64 (every
    /// Linear's in_features a multiple of 32, as GGML blocks need), vocabulary 17,
    /// context 16.
    pub fn tiny() -> Self {
        TinyLlamaConfig {
            vocab: 17,
            dim: 32,
            n_layers: 2,
            n_heads: 2,
            hidden: 64,
            ctx: 16,
            norm_eps: 1e-5,
            rope_base: 10000.0,
        }
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    fn check(&self) -> candle_core::Result<()> {
        let sizes = [
            self.vocab,
            self.dim,
            self.n_layers,
            self.n_heads,
            self.hidden,
            self.ctx,
        ];
        if sizes.contains(&0) {
            candle_core::bail!("TinyLlamaConfig {self:?}: every size must be >= 1");
        }
        if !self.dim.is_multiple_of(self.n_heads) || !self.head_dim().is_multiple_of(2) {
            candle_core::bail!(
                "TinyLlamaConfig: dim {} must be n_heads {} x an even head dim (rotary pairs)",
                self.dim,
                self.n_heads
            );
        }
        Ok(())
    }
}

/// Causal self-attention with rotary embeddings (Meta: `attention`).
#[derive(Clone, Quantizable)]
pub struct Attention {
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    #[qat(skip)]
    n_heads: usize,
}

/// SwiGLU feed-forward: w2(silu(w1 x) * w3 x) (Meta: `feed_forward`).
#[derive(Clone, Quantizable)]
pub struct FeedForward {
    pub w1: Linear,
    pub w2: Linear,
    pub w3: Linear,
    pub act: SiLU,
}

/// One pre-norm transformer block.
#[derive(Clone, Quantizable)]
pub struct Block {
    pub attention_norm: RmsNorm,
    pub attention: Attention,
    pub ffn_norm: RmsNorm,
    pub feed_forward: FeedForward,
}

/// The model: token ids `(batch, seq)` (u32) -> logits `(batch, seq, vocab)`.
#[derive(Clone, Quantizable)]
pub struct TinyLlama {
    pub tok_embeddings: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub output: Linear,
    #[qat(skip)]
    cfg: TinyLlamaConfig,
    /// cos and sin of position x theta_i, `(ctx, head_dim / 2)`.
    #[qat(skip)]
    cos: Tensor,
    #[qat(skip)]
    sin: Tensor,
}

/// quantized_llama's `precomput_freqs_cis` for `ctx` positions: theta_i = 1 /
/// base^(2i/head_dim) in f32, angles as the (positions x 1) @ (1 x head_dim/2) matmul.
pub fn rope_tables(
    cfg: &TinyLlamaConfig,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let theta: Vec<f32> = (0..hd)
        .step_by(2)
        .map(|i| 1f32 / cfg.rope_base.powf(i as f32 / hd as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), dev)?;
    let angles = Tensor::arange(0, cfg.ctx as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((cfg.ctx, 1))?
        .matmul(&theta.reshape((1, hd / 2))?)?;
    Ok((
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    ))
}

impl Attention {
    fn new(cfg: &TinyLlamaConfig, vb: VarBuilder) -> candle_qat::Result<Self> {
        let d = cfg.dim;
        Ok(Attention {
            wq: Linear::new(d, d, false, vb.pp("wq"))?,
            wk: Linear::new(d, d, false, vb.pp("wk"))?,
            wv: Linear::new(d, d, false, vb.pp("wv"))?,
            wo: Linear::new(d, d, false, vb.pp("wo"))?,
            n_heads: cfg.n_heads,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        causal: bool,
    ) -> candle_core::Result<Tensor> {
        let d = x.dim(2)?;
        let (h, hd) = (self.n_heads, d / self.n_heads);
        // (b, t, h * hd) -> (b, h, t, hd), rotated for q and k: one op each.
        let q = split_heads_rope_i(&self.wq.forward(x)?, h, cos, sin)?;
        let k = split_heads_rope_i(&self.wk.forward(x)?, h, cos, sin)?;
        let v = split_heads(&self.wv.forward(x)?, h)?;
        // softmax(q k^T / sqrt(hd)), each query seeing the keys up to its own position: one
        // fused op (the values and gradients of scaling, masking with -inf and softmax).
        let scores = batched_matmul_t(&q, &k)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let att = if causal {
            causal_softmax(&scores, scale)?
        } else {
            softmax_last_dim(&scores.affine(scale, 0.)?)?
        };
        let y = merge_heads(&batched_matmul(&att, &v)?)?;
        self.wo.forward(&y)
    }
}

impl FeedForward {
    fn new(cfg: &TinyLlamaConfig, vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(FeedForward {
            w1: Linear::new(cfg.dim, cfg.hidden, false, vb.pp("w1"))?,
            w2: Linear::new(cfg.hidden, cfg.dim, false, vb.pp("w2"))?,
            w3: Linear::new(cfg.dim, cfg.hidden, false, vb.pp("w3"))?,
            act: SiLU::new(),
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // silu(w1 x) * w3 x, fused where the SiLU layer computes in float.
        let gated = self
            .act
            .forward_gated(&self.w1.forward(x)?, &self.w3.forward(x)?)?;
        self.w2.forward(&gated)
    }
}

impl Block {
    pub fn new(cfg: &TinyLlamaConfig, vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(Block {
            attention_norm: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("attention_norm"))?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            ffn_norm: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("ffn_norm"))?,
            feed_forward: FeedForward::new(cfg, vb.pp("feed_forward"))?,
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        causal: bool,
    ) -> candle_core::Result<Tensor> {
        let h = self.attention_norm.forward(x)?;
        let x = (x + self.attention.forward(&h, cos, sin, causal)?)?;
        let h = self.ffn_norm.forward(&x)?;
        &x + self.feed_forward.forward(&h)?
    }
}

impl TinyLlama {
    /// Loads the model from `vb`, or initialises it as the reference does when `vb` creates
    /// variables (a `VarMap`): N(0, 0.02) for the embedding and Linears, N(0, 0.02 /
    /// sqrt(2 n_layers)) for `wo` and `w2`, RmsNorm weights 1. Draws come from candle's
    /// unseeded generator; [`TinyLlama::init_weights`] redraws them from a seeded source.
    pub fn new(cfg: TinyLlamaConfig, vb: VarBuilder) -> candle_qat::Result<Self> {
        cfg.check()?;
        // Each weight is created here with the reference's init before the layer asks for it
        // (a VarMap hands the layer the existing variable; a loading VarBuilder ignores the
        // hint), since the layers' own constructors draw with PyTorch's defaults.
        let std = 0.02;
        let std_out = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
        for (path, shape, s) in Self::weight_shapes(&cfg) {
            let s = if s { std_out } else { std };
            vb.get_with_hints(
                shape,
                &path,
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: s,
                },
            )?;
        }
        let layers = (0..cfg.n_layers)
            .map(|i| Block::new(&cfg, vb.pp(format!("layers.{i}"))))
            .collect::<candle_qat::Result<Vec<_>>>()?;
        let (cos, sin) = rope_tables(&cfg, vb.dtype(), vb.device())?;
        Ok(TinyLlama {
            tok_embeddings: Embedding::new(cfg.vocab, cfg.dim, vb.pp("tok_embeddings"))?,
            layers,
            norm: RmsNorm::new(cfg.dim, cfg.norm_eps, vb.pp("norm"))?,
            output: Linear::new(cfg.dim, cfg.vocab, false, vb.pp("output"))?,
            cfg,
            cos,
            sin,
        })
    }

    /// Every 2-D weight: its variable path, shape, and whether it takes the smaller
    /// residual-projection std (`wo`, `w2`), in module order.
    fn weight_shapes(cfg: &TinyLlamaConfig) -> Vec<(String, (usize, usize), bool)> {
        let (d, f) = (cfg.dim, cfg.hidden);
        let mut v = vec![("tok_embeddings.weight".to_string(), (cfg.vocab, d), false)];
        for i in 0..cfg.n_layers {
            for (name, shape, out) in [
                ("attention.wq", (d, d), false),
                ("attention.wk", (d, d), false),
                ("attention.wv", (d, d), false),
                ("attention.wo", (d, d), true),
                ("feed_forward.w1", (f, d), false),
                ("feed_forward.w2", (d, f), true),
                ("feed_forward.w3", (f, d), false),
            ] {
                v.push((format!("layers.{i}.{name}.weight"), shape, out));
            }
        }
        v.push(("output.weight".to_string(), (cfg.vocab, d), false));
        v
    }

    /// Every parameter with its variable path (relative to the `VarBuilder` the model was
    /// built from), in module order.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![(
            "tok_embeddings.weight".to_string(),
            self.tok_embeddings.weight().clone(),
        )];
        for (i, b) in self.layers.iter().enumerate() {
            let p = |n: &str| format!("layers.{i}.{n}.weight");
            let a = &b.attention;
            let f = &b.feed_forward;
            v.extend([
                (p("attention_norm"), b.attention_norm.weight().clone()),
                (p("attention.wq"), a.wq.weight().clone()),
                (p("attention.wk"), a.wk.weight().clone()),
                (p("attention.wv"), a.wv.weight().clone()),
                (p("attention.wo"), a.wo.weight().clone()),
                (p("ffn_norm"), b.ffn_norm.weight().clone()),
                (p("feed_forward.w1"), f.w1.weight().clone()),
                (p("feed_forward.w2"), f.w2.weight().clone()),
                (p("feed_forward.w3"), f.w3.weight().clone()),
            ]);
        }
        v.push(("norm.weight".to_string(), self.norm.weight().clone()));
        v.push(("output.weight".to_string(), self.output.weight().clone()));
        v
    }

    /// Redraws every parameter held in `vm` as [`TinyLlama::new`] initialises it, from
    /// `normal` (standard normal draws, taken in module order), so that a seed fixes the
    /// model. Errors if a parameter is not one of `vm`'s variables.
    pub fn init_weights(
        &self,
        vm: &VarMap,
        mut normal: impl FnMut() -> f64,
    ) -> candle_core::Result<()> {
        let vars = vm.all_vars();
        let std_out = 0.02 / (2.0 * self.cfg.n_layers as f64).sqrt();
        for (name, t) in self.named_parameters() {
            let Some(var) = vars.iter().find(|v| v.as_tensor().id() == t.id()) else {
                candle_core::bail!("init_weights: `{name}` is not a variable of this VarMap")
            };
            let value = if t.rank() == 1 {
                Tensor::ones(t.dims(), t.dtype(), t.device())?
            } else {
                let std = if name.ends_with("wo.weight") || name.ends_with("w2.weight") {
                    std_out
                } else {
                    0.02
                };
                let v: Vec<f32> = (0..t.elem_count())
                    .map(|_| (normal() * std) as f32)
                    .collect();
                Tensor::from_vec(v, t.dims(), t.device())?.to_dtype(t.dtype())?
            };
            var.set(&value)?;
        }
        Ok(())
    }

    /// The model's sizes.
    pub fn config(&self) -> &TinyLlamaConfig {
        &self.cfg
    }

    /// The layers by GGUF role, ready for [`LlamaGguf::write`] (float layers are written as
    /// F32).
    pub fn gguf(&self) -> LlamaGguf<'_> {
        let c = &self.cfg;
        let hparams = LlamaHparams {
            head_count: c.n_heads,
            head_count_kv: c.n_heads,
            block_count: c.n_layers,
            embedding_length: c.dim,
            context_length: c.ctx,
            rms_norm_eps: c.norm_eps,
            rope_freq_base: c.rope_base,
        };
        let mut g = LlamaGguf::new(hparams)
            .name("candle-qat tiny llama")
            .token_embd(&self.tok_embeddings);
        for (i, b) in self.layers.iter().enumerate() {
            let (a, f) = (&b.attention, &b.feed_forward);
            g = g.block(
                i,
                LlamaBlock {
                    attn_norm: &b.attention_norm,
                    attn_q: &a.wq,
                    attn_k: &a.wk,
                    attn_v: &a.wv,
                    attn_output: &a.wo,
                    ffn_norm: &b.ffn_norm,
                    ffn_gate: &f.w1,
                    ffn_down: &f.w2,
                    ffn_up: &f.w3,
                },
            );
        }
        g.output_norm(&self.norm).output(&self.output)
    }
}

impl Module for TinyLlama {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t == 0 || t > self.cfg.ctx {
            candle_core::bail!(
                "TinyLlama takes 1..={} positions (its context) but got {t}; feed shorter windows",
                self.cfg.ctx
            );
        }
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let mut x = self.tok_embeddings.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &cos, &sin, t > 1)?;
        }
        self.output.forward(&self.norm.forward(&x)?)
    }
}
