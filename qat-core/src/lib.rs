//! qat-core: quantization-aware training numerics on candle.
pub mod error;
pub mod fake_quant;
pub mod fuse;
pub mod model;
pub mod nn;
mod host;
pub mod observer;
pub mod passes;
pub mod qconfig;
pub mod qconfig_mapping;
pub mod qparams;

pub use error::{Error, Result};
pub use qparams::{calculate_qparams, QDType, QParams, QScheme, QuantRange};
