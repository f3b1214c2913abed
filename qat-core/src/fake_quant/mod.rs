//! Fake quantization: quantize-dequantize in float with a straight-through gradient, the
//! learnable (LSQ) variant, the `FakeQuantize` module that pairs an op with an observer, and
//! torchao's integer (intx) fake quantization for LLMs (per token, per axis, per group).

mod intx;
#[cfg(target_arch = "x86_64")]
mod intx_avx2;
mod intx_kernel;
mod intx_op;
mod intx_quantizer;
mod kernel;
mod learnable;
mod module;
mod op;
pub(crate) mod spec;

pub use intx::{IntxGranularity, IntxSpec, IntxSpecBuilder};
pub use intx_op::{
    intx_fake_quantize, intx_fake_quantize_composite, intx_fake_quantize_learnable,
    intx_fake_quantize_with, intx_qparams, IntxQParams,
};
#[doc(hidden)]
pub use intx_op::{
    intx_fake_quantize_backward, intx_fake_quantize_backward_masked, intx_fake_quantize_masked,
    IntxGradMask,
};
pub use intx_quantizer::IntxFakeQuantizer;
pub use learnable::fake_quantize_learnable;
pub use module::{FakeQuantize, FakeQuantizeState};
pub use op::fake_quantize_backward;
pub use op::{
    fake_quantize, fake_quantize_composite, fake_quantize_per_channel, fake_quantize_per_tensor,
};
