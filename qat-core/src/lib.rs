//! qat-core: quantization-aware training numerics on candle.
pub mod error;
pub mod fake_quant;
mod host;
pub mod observer;
pub mod qconfig;
pub mod qparams;

pub use error::{Error, Result};
pub use qparams::{calculate_qparams, QDType, QParams, QScheme, QuantRange};
