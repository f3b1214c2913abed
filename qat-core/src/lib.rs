//! qat-core: quantization-aware training numerics on candle.
//!
//! The modules form layers (leaf data, numerics and kernels, model, layers, consumers); each
//! imports only its own layer or those below, without cycles. ARCHITECTURE.md at the
//! repository root maps them, and `tests/layering.rs` checks it from the `use` lines.
pub mod checkpoint;
pub mod error;
pub mod fake_quant;
pub mod fuse;
pub mod geometry;
pub mod ggml;
pub mod gguf;
mod host;
pub(crate) mod kernels;
pub mod model;
pub mod nn;
pub mod observer;
pub mod onnx;
pub mod passes;
pub mod provenance;
pub mod qconfig;
pub mod qconfig_mapping;
pub mod qparams;
pub mod quantized;
mod recent;
mod record;
mod sync;
#[cfg(target_arch = "x86_64")]
mod x86_lanes;

pub use error::{Error, Result};
pub use qparams::{calculate_qparams, QDType, QParams, QScheme, QuantRange};
