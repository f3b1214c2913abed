//! Procedural macros for candle-qat.
//!
//! `#[derive(Quantizable)]` lands with the quantizable-models work; until then this crate
//! only reserves its place in the workspace so the facade's `derive` feature is stable.
