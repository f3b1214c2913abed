//! candle-qat facade.
pub use qat_core::*;
