//! Int8 inference kernels: the integer arithmetic of a converted (quantized) model.
//!
//! - Activations are unsigned 8-bit codes (`quint8`) held in candle `U8` tensors:
//!   [`quantize`] turns f32 into codes, [`dequantize`] turns codes back into f32.
//! - Weights are symmetric signed 8-bit codes (`qint8`, zero point 0), per tensor or per
//!   output channel, held in a [`QuantizedWeight`]. candle has no `i8` dtype (its integer
//!   dtypes are `U8`, `U32`, `I16`, `I32` and `I64`), so the weight codes live in a plain
//!   `Vec<i8>` next to a copy laid out for the kernels; activations, which flow between
//!   layers as tensors, use `U8` (their codes are unsigned).
//! - [`quantized_linear`], [`quantized_conv2d`] and [`quantized_conv1d`] multiply u8 activation codes by i8 weight
//!   codes into exact i32 sums, `acc = sum_k (x_q - x_zero_point) * w_q`, then
//!   [`Requant`] turns each sum into an output code with the output scale, zero point, clamp
//!   range and optional fused ReLU, rounding half to even as PyTorch does.
//!   [`linear_prerequant`] and [`conv2d_prerequant`] stop before the rounding and return
//!   the f32 values (what a fake-quant model's output fake-quant sees).
//!
//! The i32 products run on an AVX-512 VNNI kernel or an AVX2 one when the CPU has it
//! (checked at run time) and on a portable one otherwise; all give the same integers
//! ([`Kernel`], [`gemm_u8_i8`]). Convolutions on the VNNI and saturating AVX2 kernels
//! requantize inside the kernel, from registers, with the same f32 operations as
//! [`Requant`].
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qat_core::quantized::{dequantize, quantize, quantized_linear, QuantizedWeight, Requant};
//!
//! // Activations: x86/fbgemm presets train them in 0..=127.
//! let x = Tensor::new(&[[0.5f32, -0.25, 1.0]], &Device::Cpu)?;
//! let (x_scale, x_zp) = (0.0125f32, 20);
//! let x_q = quantize(&x, x_scale, x_zp, 0, 127)?;
//! // Weights: symmetric int8, one scale per output channel.
//! let w = Tensor::new(&[[0.1f32, 0.2, -0.3], [0.4, -0.5, 0.6]], &Device::Cpu)?;
//! let w_q = QuantizedWeight::quantize(&w, &[0.3 / 127.0, 0.6 / 127.0], -128, 127)?;
//! let out = Requant::new(0.01, 64, 0, 127)?;
//! let y_q = quantized_linear(&x_q, x_scale, x_zp, &w_q, Some(&[0.0, 0.1]), &out)?;
//! let y = dequantize(&y_q, 0.01, 64)?.to_vec2::<f32>()?;
//! // 0.5*0.1 - 0.25*0.2 - 0.3 = -0.3 and 0.2 + 0.125 + 0.6 + 0.1 = 1.025 -> clamped at 0.63.
//! assert!((y[0][0] + 0.3).abs() < 0.02 && (y[0][1] - 0.63).abs() < 1e-6);
//! # Ok::<(), qat_core::Error>(())
//! ```

mod avg_pool;
mod conv;
mod conv1d;
mod conv_transpose;
mod gemm;
mod linear;
mod pool;
mod qtensor;
mod requant;
mod weight;

pub use avg_pool::{avg_pool2d_codes, PoolBin, PoolRounding};
pub(crate) use conv::conv2d_int;
pub use conv::{conv2d_prerequant, quantized_conv2d};
pub(crate) use conv1d::conv1d_int;
pub use conv1d::quantized_conv1d;
pub(crate) use conv_transpose::{
    conv_transpose_int, quantize_transposed, to_transposed, transposed_codes, transposed_from_codes,
};
pub use gemm::{gemm_u8_i8, Kernel, MAX_ROW_LEN};
pub(crate) use linear::linear_int;
pub use linear::{linear_prerequant, quantized_linear};
pub(crate) use pool::max_pool2d_codes;
pub use qtensor::{dequantize, quantize};
pub use requant::Requant;
pub use weight::QuantizedWeight;
