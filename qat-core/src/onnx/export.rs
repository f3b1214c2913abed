//! `export_onnx`: runs a converted model's forward once on an example input with the trace
//! on, names each recorded step by its module path, and writes the QDQ graph.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use prost::Message;

use super::graph::{value_info, GraphBuilder, LayerInfo};
use super::proto::{tensor_proto::DataType, ModelProto, OperatorSetIdProto};
use crate::error::{Error, Result};
use crate::model::hook as trace;
use crate::model::{ModulePath, ModuleVisitor, QuantModule, Quantizable, Stage};

/// The ONNX operator set the exporter writes (per-axis `DequantizeLinear` needs 13).
pub const OPSET: i64 = 13;
/// The ONNX IR version that goes with [`OPSET`].
const IR_VERSION: i64 = 7;

/// How to write the ONNX file.
///
/// ```
/// use qat_core::onnx::ExportOptions;
/// let opts = ExportOptions::default().per_tensor_weights(true).dynamic_batch(false);
/// assert!(opts.is_per_tensor_weights());
/// ```
#[derive(Clone, Debug)]
pub struct ExportOptions {
    per_tensor_weights: bool,
    dynamic_batch: bool,
}

impl Default for ExportOptions {
    /// Per-channel weights as trained, a symbolic batch dim.
    fn default() -> Self {
        ExportOptions {
            per_tensor_weights: false,
            dynamic_batch: true,
        }
    }
}

impl ExportOptions {
    /// Write every weight per tensor, only for runtimes that read nothing else: tract before
    /// 0.23.9 (0.23.5 loads a per-channel file without error, reads only the first scale and
    /// computes wrong results; fixed in sonos/tract#2849). onnxruntime and tract >= 0.23.9 run
    /// the default per-channel export, which agrees with the converted model to one output
    /// step. Per-channel weights are requantized with their largest channel scale, which
    /// loses precision: the file then no longer matches the converted model code for code
    /// (MnistNet on tract 0.23.9: 99.7% of predictions and 89% of output codes equal).
    pub fn per_tensor_weights(mut self, yes: bool) -> Self {
        self.per_tensor_weights = yes;
        self
    }

    /// Whether weights are written per tensor.
    pub fn is_per_tensor_weights(&self) -> bool {
        self.per_tensor_weights
    }

    /// Make the first (batch) dim of the input and output symbolic (`batch`); otherwise it is
    /// fixed to the example's.
    pub fn dynamic_batch(mut self, yes: bool) -> Self {
        self.dynamic_batch = yes;
        self
    }
}

/// What the exporter wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportReport {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Initializers (weights, biases, scales, zero points).
    pub initializers: usize,
    /// Count of each ONNX op type.
    pub op_counts: Vec<(String, usize)>,
    /// Layers whose per-channel weights were requantized per tensor
    /// ([`ExportOptions::per_tensor_weights`]).
    pub requantized: Vec<String>,
}

/// The traced layers by key, and the first layer converted to candle's GGML runtime.
struct Layers(HashMap<usize, (LayerInfo, Stage)>, Option<String>);

impl ModuleVisitor for Layers {
    fn layer(&mut self, path: &ModulePath, module: &dyn QuantModule) -> Result<()> {
        if self.1.is_none() && module.ggml_converted() {
            self.1 = Some(path.dotted());
        }
        if let Some(key) = module.trace_key() {
            let info = LayerInfo {
                path: path.dotted(),
                kind: module.kind(),
            };
            self.0.insert(key, (info, module.stage()));
        }
        Ok(())
    }
}

/// Builds the ONNX model of a converted `model` by running `forward(model, example)` once
/// with the trace on. See [`export_onnx`].
pub fn to_onnx<M, F, E>(
    model: &M,
    forward: F,
    example: &Tensor,
    options: &ExportOptions,
) -> Result<(ModelProto, ExportReport)>
where
    M: Quantizable,
    F: FnOnce(&M, &Tensor) -> std::result::Result<Tensor, E>,
    Error: From<E>,
{
    let mut layers = Layers(HashMap::new(), None);
    model.visit(&mut ModulePath::root(), &mut layers)?;
    if let Some((info, _)) = layers.0.values().find(|(_, s)| *s == Stage::Prepared) {
        return Err(Error::pass(
            format!(
                "export_onnx got a prepared (fake-quant) model: {} ({}) is not converted",
                info.path, info.kind
            ),
            "convert the model first, or export it with export_onnx_prepared (which converts a \
             clone)",
        )
        .in_module(info.path.clone()));
    }
    if let Some(path) = layers.1.clone() {
        return Err(Error::pass(
            format!("{path} is converted to candle's GGML runtime (QMatMul), which ONNX QDQ cannot express"),
            "export GGML-converted models as GGUF (qat_core::gguf); ONNX export takes models \
             converted from eager qconfigs",
        )
        .in_module(path));
    }
    if example.dtype() != DType::F32 || example.rank() == 0 {
        return Err(Error::tensor(
            format!(
                "export_onnx takes an f32 example input, got {:?} of shape {:?}",
                example.dtype(),
                example.dims()
            ),
            "pass a float batch shaped like the model's input",
        ));
    }
    let (out, events) = trace::capture(|| forward(model, example));
    let out = out?;
    let mut g = GraphBuilder::new(example.id(), "input", options.per_tensor_weights);
    for e in &events {
        let Some((info, _)) = layers.0.get(&e.key) else {
            return Err(Error::state(
                "a layer ran in the forward that the model's fields do not hold",
                "export a model whose forward calls only its own layers (not shared or \
                 captured ones)",
            ));
        };
        g.add(e, info)
            .map_err(|err| err.in_module(info.path.clone()))?;
    }
    let requantized = std::mem::take(&mut g.requantized);
    let input = value_info(
        "input",
        DataType::Float,
        example.dims(),
        options.dynamic_batch,
    );
    let graph = g.finish(input, out.id(), out.dims(), options.dynamic_batch)?;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for n in &graph.node {
        let op = n.op_type.clone().unwrap_or_default();
        match counts.iter_mut().find(|(o, _)| *o == op) {
            Some((_, c)) => *c += 1,
            None => counts.push((op, 1)),
        }
    }
    let report = ExportReport {
        nodes: graph.node.len(),
        initializers: graph.initializer.len(),
        op_counts: counts,
        requantized,
    };
    let model = ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("candle-qat".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        ..Default::default()
    };
    Ok((model, report))
}

/// Exports a prepared (fake-quant) model as it would convert now, leaving it untouched: a
/// clone gets its observers disabled (the qparams stay as trained so far), is switched to
/// eval, runs `forward` once on `example` (so each layer notes its input's fake-quant), is
/// converted and exported as [`export_onnx`] does. Mid-training checkpoints can so be
/// deployed without stopping the run.
///
/// ```no_run
/// # use candle_core::{Module, Tensor};
/// # fn demo(model: &qat_core::nn::Linear, x: &Tensor) -> qat_core::Result<()> {
/// use qat_core::onnx::{export_onnx_prepared, ExportOptions};
/// let opts = ExportOptions::default();
/// export_onnx_prepared(model, |m, x| m.forward(x), x, "epoch3.onnx", &opts)?;
/// # Ok(()) }
/// ```
pub fn export_onnx_prepared<M, F, E>(
    model: &M,
    forward: F,
    example: &Tensor,
    path: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport>
where
    M: Quantizable + Clone,
    F: Fn(&M, &Tensor) -> std::result::Result<Tensor, E>,
    Error: From<E>,
{
    let mut converted = model.clone();
    crate::passes::disable_observer(&mut converted)?;
    crate::passes::eval(&mut converted)?;
    forward(&converted, example)?;
    crate::passes::convert(&mut converted)?;
    export_onnx(&converted, forward, example, path, options)
}

/// Exports a converted model to an ONNX file in the QDQ format (opset 13): each activation
/// as uint8 codes between `QuantizeLinear` and `DequantizeLinear`, weights as int8 codes
/// (per channel on axis 0 unless [`ExportOptions::per_tensor_weights`]), biases as int32 in
/// units of input scale times weight scale, BN folded, fused ReLU and the trained activation
/// range as a `Clip`. The graph is what `forward(model, example)` runs: every step must be a
/// candle-qat layer (a bare candle op between layers is an error naming the next layer).
/// Float layers left in the model export as float ops (inference semantics: BatchNorm with
/// running statistics).
///
/// ```no_run
/// # use candle_core::{Module, Tensor};
/// # fn demo(model: &qat_core::nn::Linear, x: &Tensor) -> qat_core::Result<()> {
/// use qat_core::onnx::{export_onnx, ExportOptions};
/// // `model` was prepared, trained and converted; `x` is an example batch.
/// let opts = ExportOptions::default();
/// let report = export_onnx(model, |m, x| m.forward(x), x, "model.onnx", &opts)?;
/// println!("{} nodes", report.nodes);
/// # Ok(()) }
/// ```
pub fn export_onnx<M, F, E>(
    model: &M,
    forward: F,
    example: &Tensor,
    path: impl AsRef<Path>,
    options: &ExportOptions,
) -> Result<ExportReport>
where
    M: Quantizable,
    F: FnOnce(&M, &Tensor) -> std::result::Result<Tensor, E>,
    Error: From<E>,
{
    let (proto, report) = to_onnx(model, forward, example, options)?;
    let path = path.as_ref();
    std::fs::write(path, proto.encode_to_vec()).map_err(|e| {
        Error::write(
            format!("the ONNX file {}: {e}", path.display()),
            "check that the directory exists and is writable",
        )
    })?;
    Ok(report)
}
