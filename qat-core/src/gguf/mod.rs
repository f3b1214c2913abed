//! GGUF export: the file format candle's quantized runtime (`candle_transformers`'
//! `quantized_*` models) and llama.cpp load, written with candle's own
//! `candle_core::quantized::gguf_file::write`.
//!
//! [`LlamaGguf`] names a Llama-architecture model's layers by their GGUF roles and writes
//! the keys and tensor names `candle_transformers::models::quantized_llama::ModelWeights::
//! from_gguf` reads, with the value types it accepts. Every layer gives its tensor in the
//! form it runs in (a float layer as F32); everything is checked before a byte is written.

mod llama;

pub use llama::{LlamaBlock, LlamaGguf, LlamaHparams};
