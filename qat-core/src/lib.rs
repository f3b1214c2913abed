//! qat-core: quantization-aware training numerics on candle.
pub mod error;
mod host;
pub mod observer;
pub mod qparams;

pub use error::{Error, Result};
pub use qparams::{calculate_qparams, QDType, QParams, QScheme, QuantRange};
