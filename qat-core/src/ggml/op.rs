//! GGML block fake quantization as candle ops: the forward (`dequantize(quantize(x))`) and
//! its straight-through backward, each a fused CPU `CustomOp`, for weights
//! ([`fake_quantize_ggml`]) and for matmul inputs as candle's CPU quantized matmul sees them
//! ([`fake_quantize_vec_dot`]); the raw blocks ([`quantize_blocks`]) and candle's `QTensor`
//! ([`to_qtensor`]).
//!
//! Other devices: the tensor goes to the CPU, through the same kernels, and back
//! (`to_device` both ways, so autograd follows). A composite of candle ops would need the
//! f16 rounding of each block's scale, a first-occurrence signed argmax and saturating
//! float-to-int truncations, each an exactness risk on a device whose kernels round
//! differently; the round trip gives the CPU's bits everywhere, which is what the deployed
//! GGUF file holds.

use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::block32::{self, Kind32};
use super::block_type::{BlockType, VecDotType};
use super::kquant::{self, KindK};
use super::q8k;
use crate::error::{Error, Result};
use crate::host::{alloc_fill, cpu_f32_slice, CHUNK};

/// Which kernel runs.
#[derive(Clone, Copy, Debug)]
enum Scheme {
    B32(Kind32),
    K(KindK),
    Q8K,
}

/// The kernels of a weight type.
enum Weight {
    B32(Kind32),
    K(KindK),
}

impl From<BlockType> for Weight {
    fn from(t: BlockType) -> Self {
        match t {
            BlockType::Q8_0 => Weight::B32(Kind32::Q8_0),
            BlockType::Q4_0 => Weight::B32(Kind32::Q4_0),
            BlockType::Q4_1 => Weight::B32(Kind32::Q4_1),
            BlockType::Q5_0 => Weight::B32(Kind32::Q5_0),
            BlockType::Q5_1 => Weight::B32(Kind32::Q5_1),
            BlockType::Q4K => Weight::K(KindK::Q4K),
            BlockType::Q6K => Weight::K(KindK::Q6K),
        }
    }
}

impl From<BlockType> for Scheme {
    fn from(t: BlockType) -> Self {
        match Weight::from(t) {
            Weight::B32(k) => Scheme::B32(k),
            Weight::K(k) => Scheme::K(k),
        }
    }
}

impl From<VecDotType> for Scheme {
    fn from(t: VecDotType) -> Self {
        match t {
            // Q8_1's codes and scale are Q8_0's; only its extra block sum differs.
            VecDotType::Q8_0 | VecDotType::Q8_1 => Scheme::B32(Kind32::Q8_0),
            VecDotType::Q8K => Scheme::Q8K,
        }
    }
}

impl Scheme {
    /// Elements per block of the scheme's kernel.
    fn block(self) -> usize {
        match self {
            Scheme::B32(_) => 32,
            Scheme::Q8K | Scheme::K(_) => 256,
        }
    }

    fn forward(self, x: &[f32]) -> candle_core::Result<Vec<f32>> {
        // The block kernels write whole blocks (`chunks_exact`): the input and every chunk
        // `alloc_fill` hands out (CHUNK = 2^15) must hold whole blocks.
        assert!(x.len().is_multiple_of(self.block()) && CHUNK.is_multiple_of(self.block()));
        Ok(match self {
            // SAFETY: each chunk `y` is paired with the input slice of its length, a whole
            // number of blocks (asserted above), and the block kernel writes every element
            // of every block.
            Scheme::B32(k) => unsafe {
                alloc_fill(x.len(), |off, y| {
                    block32::forward(k, &x[off..off + y.len()], y)
                })
            },
            // SAFETY: as above, with blocks of 256.
            Scheme::Q8K => unsafe {
                alloc_fill(x.len(), |off, y| q8k::forward(&x[off..off + y.len()], y))
            },
            Scheme::K(k) => {
                let parts = x
                    .par_chunks(CHUNK)
                    .map(|c| kquant::forward(k, c))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                parts.concat()
            }
        })
    }

    fn backward(self, x: &[f32], dy: &[f32]) -> candle_core::Result<Vec<f32>> {
        // Whole blocks, as in `forward`; and one upstream gradient per input.
        assert!(x.len().is_multiple_of(self.block()) && CHUNK.is_multiple_of(self.block()));
        assert_eq!(x.len(), dy.len());
        Ok(match self {
            // SAFETY: each chunk `dx` is paired with input and gradient slices of its length,
            // whole blocks (asserted above); the block kernel writes every element.
            Scheme::B32(k) => unsafe {
                alloc_fill(x.len(), |off, dx| {
                    let r = off..off + dx.len();
                    block32::backward(k, &x[r.clone()], &dy[r], dx)
                })
            },
            // SAFETY: as above, with blocks of 256.
            Scheme::Q8K => unsafe {
                alloc_fill(x.len(), |off, dx| {
                    let r = off..off + dx.len();
                    q8k::backward(&x[r.clone()], &dy[r], dx)
                })
            },
            Scheme::K(k) => {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                    .try_for_each(|(o, (x, dy))| kquant::backward(k, x, dy, o))?;
                dx
            }
        })
    }
}

/// The fused forward on CPU (f32, contiguous); its backward is [`GgmlFakeQuantGrad`].
struct GgmlFakeQuant(Scheme);

impl CustomOp1 for GgmlFakeQuant {
    fn name(&self) -> &'static str {
        "ggml-fake-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s, l, "ggml fake quantization: input")?;
        Ok((CpuStorage::F32(self.0.forward(x)?), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&dy, &GgmlFakeQuantGrad(self.0))?))
    }
}

/// The straight-through backward: `dx = dy` where the element's code was not clamped.
struct GgmlFakeQuantGrad(Scheme);

impl CustomOp2 for GgmlFakeQuantGrad {
    fn name(&self) -> &'static str {
        "ggml-fake-quantize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s1, l1, "ggml fake quantization grad: input")?;
        let dy = cpu_f32_slice(s2, l2, "ggml fake quantization grad: grad_y")?;
        if x.len() != dy.len() {
            candle_core::bail!(
                "ggml fake quantization grad: {} inputs, {} grads",
                x.len(),
                dy.len()
            );
        }
        Ok((CpuStorage::F32(self.0.backward(x, dy)?), l1.shape().clone()))
    }
}

fn check_float(x: &Tensor, what: &str) -> Result<()> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        dt => Err(Error::tensor(
            format!("{what} got a {dt:?} tensor; GGML fake quantization takes f32, f16 or bf16"),
            "convert the input to f32 first",
        )),
    }
}

/// Runs `f` on `x` as a contiguous f32 CPU tensor and returns the result on `x`'s device
/// and in its dtype (autograd follows the conversions).
fn on_cpu_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (dev, dtype) = (x.device().clone(), x.dtype());
    let xc = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    let y = f(&xc)?;
    Ok(y.to_dtype(dtype)?.to_device(&dev)?)
}

fn fake_quant(x: &Tensor, scheme: Scheme) -> Result<Tensor> {
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    on_cpu_f32(x, |x| Ok(x.apply_op1(GgmlFakeQuant(scheme))?))
}

/// Fake-quantizes `x` in the GGML block type `ty`, blocks along the last dim:
/// `dequantize(quantize(x))` bit for bit as candle's `QTensor::quantize(x, ty.dtype())`
/// then `dequantize` (f32 arithmetic, f16 scales rounded to nearest even). Backward:
/// straight through, `grad_y` where the element's code was not clamped, 0 where the
/// quantizer clamped it (for Q4_0/Q5_0 a value of the opposite sign to the block's
/// largest-|x| element that reaches code 16 / 32); scales and minimums are constants.
///
/// f32, f16 and bf16 inputs (computed in f32, as candle quantizes, and returned in the
/// input's dtype); tensors on other devices are computed on the CPU and moved back. The
/// last dim must be a multiple of `ty.block_size()` (256 for the K-quants), else an
/// [`Error::Config`] naming the fix.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::ggml::{fake_quantize_ggml, BlockType};
/// let x = Tensor::arange(0f32, 32.0, &Device::Cpu)?.affine(0.1, -1.0)?.reshape((1, 32))?;
/// let y = fake_quantize_ggml(&x, BlockType::Q4_0)?;
/// // The largest |x| (2.1) sets d = -2.1 / 8 (rounded to f16) and is code 0, i.e. -8 * d.
/// let d = half::f16::from_f32(2.1 / -8.0).to_f32();
/// assert_eq!(y.to_vec2::<f32>()?[0][31], -8.0 * d);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn fake_quantize_ggml(x: &Tensor, ty: BlockType) -> Result<Tensor> {
    check_float(x, "fake_quantize_ggml")?;
    ty.check_dims(x.dims(), "fake_quantize_ggml")?;
    fake_quant(x, ty.into())
}

/// Fake-quantizes a matmul input (left operand, blocks along its last dim) in `ty`, the
/// type candle's CPU quantized matmul quantizes it into before its integer dot products
/// (`BlockType::vec_dot_type` of the weight): the value is `code * scale`, what the dot
/// product effectively multiplies the weight codes with. Backward: straight through,
/// masked where the code was clamped (only in overflowing blocks: the largest |x| maps to
/// ±127).
///
/// `Q8_1` gives Q8_0's values: its codes and f16 scale are Q8_0's. It also stores the block
/// sum `s = f16(f16(sum of codes) * d)`, and candle's Q4_1/Q5_1 dot product uses `m * s`
/// for the weight minimum's share, where exact arithmetic has `m * d * sum(codes)`; no
/// per-element value reproduces that rounding (relative 2^-11 of the minimum's term, about
/// 1e-4 of a matmul output), so fake quantization keeps the exact product and the
/// deployed matmul differs by that much.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::ggml::{fake_quantize_vec_dot, VecDotType};
/// let x = Tensor::new(&[[0.5f32; 32]], &Device::Cpu)?;
/// let y = fake_quantize_vec_dot(&x, VecDotType::Q8_0)?;
/// // d = f16(0.5 / 127); every code is 127.
/// assert_eq!(y.to_vec2::<f32>()?[0][0], 127.0 * half::f16::from_f32(0.5 / 127.0).to_f32());
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn fake_quantize_vec_dot(x: &Tensor, ty: VecDotType) -> Result<Tensor> {
    check_float(x, "fake_quantize_vec_dot")?;
    ty.check_dims(x.dims(), "fake_quantize_vec_dot")?;
    fake_quant(x, ty.into())
}

/// The straight-through backward of [`fake_quantize_ggml`] on its own (the kernel autograd
/// runs). Exposed for benchmarks and tests; training code gets it through `backward()`.
#[doc(hidden)]
pub fn fake_quantize_ggml_backward(x: &Tensor, grad_y: &Tensor, ty: BlockType) -> Result<Tensor> {
    check_float(x, "fake_quantize_ggml_backward")?;
    ty.check_dims(x.dims(), "fake_quantize_ggml_backward")?;
    if grad_y.dims() != x.dims() {
        return Err(Error::tensor(
            format!(
                "fake_quantize_ggml_backward: grad_y has shape {:?}, x has {:?}",
                grad_y.dims(),
                x.dims()
            ),
            "pass the gradient of the fake-quant output, which has the input's shape",
        ));
    }
    if x.elem_count() == 0 {
        return Ok(grad_y.to_dtype(x.dtype())?);
    }
    let dy = grad_y
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .contiguous()?;
    on_cpu_f32(&x.detach(), |x| {
        Ok(x.apply_op2_no_bwd(&dy, &GgmlFakeQuantGrad(ty.into()))?)
    })
}

/// The GGML blocks of `x` in `ty`, row-major as a GGUF tensor stores them (equal to the
/// bytes of candle's `QTensor::quantize(x, ty.dtype())?.data()`), computed by the same
/// kernels as [`fake_quantize_ggml`] (for the K-quants, candle's own quantizer).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::ggml::{quantize_blocks, BlockType};
/// let x = Tensor::ones((2, 64), candle_core::DType::F32, &Device::Cpu)?;
/// let b = quantize_blocks(&x, BlockType::Q8_0)?;
/// assert_eq!(b.len(), 4 * 34);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn quantize_blocks(x: &Tensor, ty: BlockType) -> Result<Vec<u8>> {
    check_float(x, "quantize_blocks")?;
    ty.check_dims(x.dims(), "quantize_blocks")?;
    let x = x
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?;
    let x = x.to_vec1::<f32>()?;
    let n_blocks = x.len() / ty.block_size();
    let mut out = vec![0u8; n_blocks * ty.bytes_per_block()];
    match Weight::from(ty) {
        Weight::B32(k) => {
            let per_chunk = CHUNK / block32::QK * block32::block_bytes(k);
            out.par_chunks_mut(per_chunk)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(o, x)| block32::quantize(k, x, o));
        }
        Weight::K(k) => {
            let per_chunk = CHUNK / kquant::QK_K * k.block_bytes();
            out.par_chunks_mut(per_chunk)
                .zip(x.par_chunks(CHUNK))
                .try_for_each(|(o, x)| kquant::quantize(k, x, o))?;
        }
    }
    Ok(out)
}

/// candle's quantized tensor of `x` in `ty` (`QTensor::quantize`, on `x`'s device), the
/// blocks a converted `QMatMul` runs on: equal, byte for byte, to [`quantize_blocks`], and
/// dequantizing to [`fake_quantize_ggml`]'s values.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::ggml::{quantize_blocks, to_qtensor, BlockType};
/// let x = Tensor::randn(0f32, 1.0, (4, 64), &Device::Cpu)?;
/// let q = to_qtensor(&x, BlockType::Q4_0)?;
/// assert_eq!(q.data()?.as_ref(), quantize_blocks(&x, BlockType::Q4_0)?.as_slice());
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn to_qtensor(x: &Tensor, ty: BlockType) -> Result<QTensor> {
    check_float(x, "to_qtensor")?;
    ty.check_dims(x.dims(), "to_qtensor")?;
    Ok(QTensor::quantize(x, ty.dtype())?)
}
