//! Export of converted models to ONNX in the QDQ format, the form onnxruntime and
//! tract quantize from: see [`export_onnx`].
//!
//! The graph comes from running the model's forward once on an example input: every
//! candle-qat layer notes what it computed while the exporter traces, so the file holds
//! exactly the ops the converted model runs, in its order, with its integers.

mod export;
mod graph;

/// The ONNX protobuf messages, generated with prost from the schema of the `onnx` package
/// (`qat-core/proto/onnx.proto`), for reading an exported file back.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto;

pub use export::{export_onnx, export_onnx_prepared, to_onnx, ExportOptions, ExportReport, OPSET};
