//! Fake quantization: quantize-dequantize in float with a straight-through gradient, the
//! learnable (LSQ) variant, and the `FakeQuantize` module that pairs an op with an observer.

mod kernel;
mod learnable;
mod module;
mod op;
pub(crate) mod spec;

pub use learnable::fake_quantize_learnable;
pub use module::{FakeQuantize, FakeQuantizeState};
pub use op::fake_quantize_backward;
pub use op::{
    fake_quantize, fake_quantize_composite, fake_quantize_per_channel, fake_quantize_per_tensor,
};
