//! The ops of attention that candle has only as forward kernels, with a backward: Llama's
//! interleaved rotary embedding and the last-dim softmax (also fused with the score scale and
//! the causal mask); and the head split (with the rotary embedding) and merge as one op each; the batched
//! products of attention with the batch split over threads. Attention itself stays user code
//! with candle ops (see examples/common/tiny_llama.rs); these make it trainable at the speed
//! of candle's fused kernels.

use candle_core::Tensor;

use crate::error::Result;

/// Rotary embedding of interleaved pairs `(2i, 2i + 1)` (Meta's Llama convention, GGUF's
/// `llama` architecture): `x` `(batch, heads, seq, head_dim)`, `cos` and `sin` `(>= seq,
/// head_dim / 2)` (their first `seq` rows are used). The values of
/// `candle_nn::rotary_emb::rope_i`, bit for bit on CPU f32, but differentiable in `x`:
/// `rope_i` is a forward-only kernel whose output is cut from the graph, so q's and k's
/// projections would get no gradient. A fused kernel on CPU f32; candle's `rope_i_slow`
/// elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let x = Var::from_tensor(&Tensor::randn(0f32, 1., (1, 2, 4, 8), &Device::Cpu)?)?;
/// let angles = Tensor::randn(0f32, 1., (4, 4), &Device::Cpu)?;
/// let y = qat_core::nn::rope_i(&x, &angles.cos()?, &angles.sin()?)?;
/// let grads = y.sum_all()?.backward()?;
/// assert!(grads.get(&x).is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::rope::rope_i(x, cos, sin)?)
}

/// Softmax over the last dim: the values of `candle_nn::ops::softmax_last_dim` (bit for bit
/// on x86-64 CPUs in f32, where this sums each row in candle's order; `-inf` entries, masked
/// positions, give 0), but differentiable (that kernel has no backward). A fused kernel on
/// CPU f32; candle's composite `softmax` elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let x = Tensor::new(&[[0f32, f32::NEG_INFINITY], [1.0, 1.0]], &Device::Cpu)?;
/// let y = qat_core::nn::softmax_last_dim(&x)?;
/// assert_eq!(y.to_vec2::<f32>()?, [[1.0, 0.0], [0.5, 0.5]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::softmax::softmax_last_dim(x)?)
}

/// Attention's masked softmax in one op: `softmax(causal_mask(scores * scale))` over the last
/// dim of `(..., queries, keys)` scores, `keys >= queries`: query `i` sees the keys up to
/// `i + keys - queries`, the others get probability 0. The values and gradients of the
/// composite `scores.affine(scale, 0.)`, `where_cond` with a causal mask of `-inf`, then
/// [`softmax_last_dim`], bit for bit on CPU f32, without the composite's two extra
/// score-sized tensors forward and their gradient buffers backward; candle's composite
/// elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let scores = Tensor::new(&[[[2f32, 5.0], [1.0, 1.0]]], &Device::Cpu)?;
/// let p = qat_core::nn::causal_softmax(&scores, 1.0)?;
/// assert_eq!(p.to_vec3::<f32>()?, [[[1.0, 0.0], [0.5, 0.5]]]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(crate::kernels::softmax::causal_softmax_last_dim(
        scores, scale,
    )?)
}

/// Splits a projection `(batch, seq, heads * head_dim)` into heads `(batch, heads, seq,
/// head_dim)`, contiguous: the values and gradients of `y.reshape((b, t, h, d))?.transpose(1,
/// 2)?.contiguous()` as one op on CPU f32 (the composite's three graph nodes each get a
/// gradient buffer that candle's backward zero-fills); candle's ops elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let y = Tensor::arange(0f32, 8., &Device::Cpu)?.reshape((1, 2, 4))?; // 2 positions, 2 heads of 2
/// let heads = qat_core::nn::split_heads(&y, 2)?;
/// assert_eq!(heads.dims(), &[1, 2, 2, 2]);
/// assert_eq!(heads.flatten_all()?.to_vec1::<f32>()?, [0., 1., 4., 5., 2., 3., 6., 7.]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn split_heads(y: &Tensor, heads: usize) -> Result<Tensor> {
    Ok(crate::kernels::heads::split_heads(y, heads)?)
}

/// [`split_heads`] then [`rope_i`] with `cos`, `sin` `(>= seq, head_dim / 2)`, as one op on
/// CPU f32: the values and gradients of the two, bit for bit (queries and keys take this;
/// values take [`split_heads`]).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// let q = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 5, 16), &Device::Cpu)?)?;
/// let angles = Tensor::randn(0f32, 1., (8, 4), &Device::Cpu)?;
/// let (cos, sin) = (angles.cos()?, angles.sin()?);
/// let fused = qat_core::nn::split_heads_rope_i(&q, 2, &cos, &sin)?;
/// let apart = qat_core::nn::rope_i(&qat_core::nn::split_heads(&q, 2)?, &cos, &sin)?;
/// assert_eq!(fused.flatten_all()?.to_vec1::<f32>()?, apart.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn split_heads_rope_i(y: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::heads::split_heads_rope_i(
        y, heads, cos, sin,
    )?)
}

/// Merges heads `(batch, heads, seq, head_dim)` back into `(batch, seq, heads * head_dim)`,
/// contiguous: the values and gradients of `y.transpose(1, 2)?.reshape((b, t, h * d))` as one
/// op on CPU f32; candle's ops elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let y = Tensor::arange(0f32, 8., &Device::Cpu)?.reshape((1, 2, 4))?;
/// let back = qat_core::nn::merge_heads(&qat_core::nn::split_heads(&y, 2)?)?;
/// assert_eq!(back.to_vec3::<f32>()?, y.to_vec3::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn merge_heads(y: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::heads::merge_heads(y)?)
}

/// `a · b` over `(batch.., m, k)` and `(batch.., k, n)` (attention's `p · v`): the values and
/// gradients of candle's `a.matmul(&b)` (bit for bit for contiguous operands; a strided one is
/// copied contiguous first, where candle's GEMM reads the strides, which can change the last
/// bit of a sum), with the batch of small products split
/// over threads on CPU f32 (candle runs them one after another, and products as small as one
/// head's are below its GEMM's threading threshold); candle's `matmul` elsewhere.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let p = Tensor::randn(0f32, 1., (2, 4, 8, 8), &Device::Cpu)?;
/// let v = Tensor::randn(0f32, 1., (2, 4, 8, 16), &Device::Cpu)?;
/// let y = qat_core::nn::batched_matmul(&p, &v)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, p.matmul(&v)?.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::batched_matmul::batched_matmul(a, b)?)
}

/// `a · bᵀ` over `(batch.., m, k)` and `(batch.., n, k)` (attention's scores `q · kᵀ`): the
/// values and gradients of candle's `a.matmul(&b.t()?)`, as [`batched_matmul`]
/// (and without the transpose node, whose gradient candle adds strided into a zero-filled
/// buffer).
///
/// ```
/// use candle_core::{Device, Tensor};
/// let q = Tensor::randn(0f32, 1., (2, 4, 8, 16), &Device::Cpu)?;
/// let k = Tensor::randn(0f32, 1., (2, 4, 8, 16), &Device::Cpu)?;
/// let s = qat_core::nn::batched_matmul_t(&q, &k)?;
/// assert_eq!(s.flatten_all()?.to_vec1::<f32>()?, q.matmul(&k.t()?)?.flatten_all()?.to_vec1::<f32>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn batched_matmul_t(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(crate::kernels::batched_matmul::batched_matmul_t(a, b)?)
}
