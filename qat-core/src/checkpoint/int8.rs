//! The int8 file: a converted model whole. Per converted layer its int8 state (weight codes,
//! scales, biases, input and output qparams); per layer that computes in float its float
//! tensors (weights, biases, BatchNorm statistics); the structure, the producer of each
//! input, and a checksum in the metadata. Loading validates everything, then applies it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::file::{self, Entry, Format, Reader, STRUCTURE_KEY};
use super::structure::{self, shown, Layer, ModelLayer};
use crate::error::{Error, Result};
use crate::model::transaction::Plan;
use crate::model::{Quantizable, Stage, Staged};
use crate::record::{Int8State, IoQParams};

pub(super) const FORMAT: Format = Format {
    tag: "candle-qat/int8/2",
    old: &["candle-qat/int8/1"],
    what: "an int8 model saved by save_int8",
    saver: "save_int8",
    why_old: "it holds no float layers' parameters, no structure record and no checksum, so \
              a model loaded from it could compute wrong outputs without an error",
};

fn io_entries(out: &mut Vec<(String, Entry)>, key: &str, q: &[IoQParams]) {
    let scales: Vec<f32> = q.iter().map(|q| q.scale).collect();
    let ranges: Vec<i32> = q
        .iter()
        .flat_map(|q| [q.zero_point, q.quant_min, q.quant_max])
        .collect();
    out.push((format!("{key}_scale"), Entry::f32(&scales, &[q.len()])));
    out.push((format!("{key}_qrange"), Entry::i32(&ranges, &[q.len(), 3])));
}

pub(super) fn save<M: Quantizable>(model: &M, path: &Path) -> Result<()> {
    let layers = structure::walk(model)?;
    if let Some(l) = layers.iter().find(|l| l.stage == Stage::Prepared) {
        return Err(Error::pass(
            format!("`{}` is prepared but not converted", shown(&l.path)),
            "convert the model first (passes::convert)",
        ));
    }
    if let Some(l) = layers.iter().find(|l| l.ggml) {
        return Err(Error::pass(
            format!(
                "`{}` is converted to candle's GGML runtime (QMatMul), which an int8 file \
                 cannot hold",
                shown(&l.path)
            ),
            "write GGML-converted models as GGUF (qat_core::gguf); save_int8 takes models \
             converted from eager qconfigs",
        ));
    }
    if layers.iter().all(|l| l.int8.is_none()) {
        return Err(Error::pass(
            "save_int8 found no converted layer",
            "convert the model first (passes::convert)",
        ));
    }
    let producer_of: HashMap<usize, &str> = layers
        .iter()
        .filter_map(|l| l.keys.0.map(|k| (k, l.path.as_str())))
        .collect();
    let mut entries = Vec::new();
    let mut meta = HashMap::new();
    let mut records = Vec::new();
    for l in &layers {
        let key = |k: &str| {
            if l.path.is_empty() {
                k.to_string()
            } else {
                format!("{}.{k}", l.path)
            }
        };
        let mut producers = Vec::new();
        if let Some(s) = &l.int8 {
            if !s.weight_codes.is_empty() {
                let o = [s.bias.len()];
                entries.push((key("weight"), Entry::i8(&s.weight_codes, &s.weight_shape)));
                entries.push((
                    key("weight_scale"),
                    Entry::f32(&s.weight_scales, &[s.weight_scales.len()]),
                ));
                entries.push((key("bias"), Entry::f32(&s.bias, &o)));
                entries.push((
                    key("bias_int32"),
                    Entry::i32(&s.bias_int32, &[s.bias_int32.len()]),
                ));
                let scheme = if s.weight_scales.len() > 1 {
                    "per_channel_symmetric"
                } else {
                    "per_tensor_symmetric"
                };
                meta.insert(key("weight.qscheme"), scheme.to_string());
            }
            io_entries(&mut entries, &key("input"), &s.inputs);
            io_entries(&mut entries, &key("output"), s.output.as_slice());
            producers = (0..s.inputs.len())
                .map(|i| {
                    l.keys
                        .1
                        .get(i)
                        .copied()
                        .flatten()
                        .and_then(|k| producer_of.get(&k))
                        .map(|p| p.to_string())
                })
                .collect();
        }
        for (name, t) in &l.float {
            let t = t.detach().to_dtype(candle_core::DType::F32)?;
            let v = t.flatten_all()?.to_vec1::<f32>()?;
            entries.push((key(name), Entry::f32(&v, t.dims())));
        }
        records.push(Layer {
            path: l.path.clone(),
            kind: l.kind.clone(),
            stage: l.stage,
            int8: l.int8.is_some(),
            params: l.float.iter().map(|(n, _)| n.to_string()).collect(),
            producers,
        });
    }
    meta.insert(STRUCTURE_KEY.to_string(), structure::encode(&records)?);
    file::write(path, &FORMAT, entries, meta)
}

/// What loading does to one layer, read, checked and staged before any layer changes.
struct LayerLoad {
    /// The saved int8 layer's input and output qparams (checked against the producers).
    io: Option<(Vec<IoQParams>, Option<IoQParams>)>,
    /// The int8 state as the layer staged it ([`crate::model::QuantModule::stage_int8_state`]).
    int8: Option<Staged>,
    float: Vec<(String, Tensor)>,
}

fn invalid(what: String) -> Error {
    Error::state(
        what,
        "the file holds values no converted model produces: save the model again from a \
         good copy",
    )
}

fn read_io(r: &Reader, key: &str) -> Result<Vec<IoQParams>> {
    let (s_shape, scales) = r.f32s(&format!("{key}_scale"))?;
    let (r_shape, ranges) = r.i32s(&format!("{key}_qrange"))?;
    let n = scales.len();
    if s_shape != [n] || r_shape != [n, 3] || ranges.len() != 3 * n {
        return Err(invalid(format!(
            "`{key}` qparams of shapes {s_shape:?} and {r_shape:?}"
        )));
    }
    scales
        .iter()
        .zip(ranges.chunks_exact(3))
        .map(|(&scale, r)| {
            let q = IoQParams {
                scale,
                zero_point: r[0],
                quant_min: r[1],
                quant_max: r[2],
            };
            let ok = scale.is_finite()
                && scale > 0.0
                && 0 <= q.quant_min
                && q.quant_min <= q.zero_point
                && q.zero_point <= q.quant_max
                && q.quant_max <= 255;
            if !ok {
                return Err(invalid(format!(
                    "`{key}` has scale {scale}, zero point {} and code range {}..={} (a \
                     finite positive scale and 0 <= min <= zero point <= max <= 255 expected)",
                    q.zero_point, q.quant_min, q.quant_max
                )));
            }
            Ok(q)
        })
        .collect()
}

fn finite(key: &str, v: &[f32]) -> Result<()> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(invalid(format!("`{key}` holds {} at index {i}", v[i]))),
        None => Ok(()),
    }
}

/// Reads and validates one layer's int8 state; `m` is the model's layer.
fn read_int8(r: &Reader, key: &dyn Fn(&str) -> String, m: &ModelLayer) -> Result<Int8State> {
    let mut s = Int8State {
        inputs: read_io(r, &key("input"))?,
        ..Default::default()
    };
    let outputs = read_io(r, &key("output"))?;
    if outputs.len() > 1 {
        return Err(invalid(format!(
            "`{}` has {} outputs",
            key("output"),
            outputs.len()
        )));
    }
    s.output = outputs.first().copied();
    // Int8 weights come with their scales; a converted layer that computes in float
    // (BatchNorm, RmsNorm, LayerNorm) keeps an f32 `weight` among its float tensors.
    if r.has(&key("weight_scale")) {
        let (shape, codes) = r.i8s(&key("weight"))?;
        let Some(theirs) = m.float_shape("weight") else {
            return Err(Error::state(
                format!(
                    "the file has int8 weights for `{}`, which has no weight",
                    shown(&m.path)
                ),
                "load into a model of the same struct as the saved one",
            ));
        };
        if shape != theirs {
            return Err(Error::state(
                format!(
                    "`{}` has an int8 weight of shape {shape:?} in the file, {theirs:?} in the \
                     model",
                    key("weight")
                ),
                "load into a model built with the same layer sizes as the saved one",
            ));
        }
        // One scale, or one per channel of the weight's channel axis: 0, or 1 for a transposed
        // convolution's `(in, out / groups, k...)` weight (the layer checks which, and the
        // bias against its output channels, when it stages the state).
        let o = shape.first().copied().unwrap_or(0);
        let cols = shape.get(1).copied().unwrap_or(0);
        let (_, scales) = r.f32s(&key("weight_scale"))?;
        let (_, bias) = r.f32s(&key("bias"))?;
        let (_, bias_int32) = r.i32s(&key("bias_int32"))?;
        let n = scales.len();
        if !(n == 1 || n == o || (shape.len() > 2 && n == cols)) || bias_int32.len() != bias.len() {
            return Err(invalid(format!(
                "`{}`: {} weight scales, {} biases and {} int32 biases for a weight of shape \
                 {shape:?}",
                shown(&m.path),
                scales.len(),
                bias.len(),
                bias_int32.len()
            )));
        }
        if let Some(&bad) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(invalid(format!(
                "`{}` holds the weight scale {bad} (finite and positive expected)",
                key("weight_scale")
            )));
        }
        finite(&key("bias"), &bias)?;
        if s.inputs.len() != 1 || s.output.is_none() {
            return Err(invalid(format!(
                "the weighted layer `{}` has {} inputs and {} outputs",
                shown(&m.path),
                s.inputs.len(),
                outputs.len()
            )));
        }
        s.weight_codes = codes;
        s.weight_shape = shape;
        s.weight_scales = scales;
        s.bias = bias;
        s.bias_int32 = bias_int32;
    }
    Ok(s)
}

/// Reads and validates one layer's float tensors against the model's.
fn read_float(
    r: &Reader,
    key: &dyn Fn(&str) -> String,
    f: &Layer,
    m: &ModelLayer,
) -> Result<Vec<(String, Tensor)>> {
    let mine: Vec<&str> = m.float.iter().map(|(n, _)| *n).collect();
    let theirs: Vec<&str> = f.params.iter().map(String::as_str).collect();
    // A converted conv or linear layer is saved without float tensors; the float model it
    // loads into has them, unused once converted.
    if theirs.is_empty() && f.int8 {
        return Ok(Vec::new());
    }
    if mine != theirs {
        return Err(Error::state(
            format!(
                "`{}` holds the float tensors [{}] in the file, [{}] in the model",
                shown(&f.path),
                theirs.join(", "),
                mine.join(", ")
            ),
            "load into a model of the same struct, built with the same options (bias, ...) \
             and fused the same way",
        ));
    }
    let mut out = Vec::new();
    for (name, t) in &m.float {
        let k = key(name);
        let (shape, v) = r.f32s(&k)?;
        if shape != t.dims() {
            return Err(Error::state(
                format!(
                    "`{k}` has shape {shape:?} in the file, {:?} in the model",
                    t.dims()
                ),
                "load into a model built with the same layer sizes as the saved one",
            ));
        }
        finite(&k, &v)?;
        if name.ends_with("running_var") {
            if let Some(x) = v.iter().find(|x| **x < 0.0) {
                return Err(invalid(format!("`{k}` holds the negative variance {x}")));
            }
        }
        out.push((name.to_string(), Tensor::from_vec(v, shape, &Device::Cpu)?));
    }
    Ok(out)
}

/// Each int8 input's qparams must equal the output qparams of the layer the file says
/// produced it.
fn check_producers(file: &[Layer], loads: &[&LayerLoad]) -> Result<()> {
    let outputs: HashMap<&str, Option<IoQParams>> = file
        .iter()
        .zip(loads)
        .map(|(f, l)| (f.path.as_str(), l.io.as_ref().and_then(|(_, o)| *o)))
        .collect();
    for (f, l) in file.iter().zip(loads) {
        let Some((inputs, _)) = &l.io else { continue };
        for (i, (q, producer)) in inputs.iter().zip(&f.producers).enumerate() {
            let Some(producer) = producer else { continue };
            let Some(Some(out)) = outputs.get(producer.as_str()) else {
                return Err(invalid(format!(
                    "input {i} of `{}` is recorded as produced by `{}`, which has no int8 output",
                    shown(&f.path),
                    shown(producer)
                )));
            };
            if out != q {
                return Err(invalid(format!(
                    "input {i} of `{}` has qparams {q:?}, but its producer `{}` outputs {out:?}",
                    shown(&f.path),
                    shown(producer)
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn load<M: Quantizable>(model: &mut M, path: &Path) -> Result<()> {
    let bytes = file::read_bytes(path)?;
    let r = Reader::open(path, &bytes, &FORMAT)?;
    let file = structure::decode(r.meta(STRUCTURE_KEY)?)?;
    let layers = structure::walk(model)?;
    structure::compare(&file, &layers, |saved, now| match (saved, now) {
        (_, Stage::Prepared) => Some(
            "load an int8 model into a float model built and fused as the saved one, not \
             prepared"
                .into(),
        ),
        (_, Stage::Converted) => Some(
            "the model is already converted: load int8 checkpoints into a float (fused) model"
                .into(),
        ),
        (Stage::Converted, _) => None,
        (saved, now) if saved == now => None,
        _ => Some("build and fuse the model as the saved one was".into()),
    })?;
    // Read and validate everything, and let every layer check and stage its int8 state,
    // before any layer changes.
    let mut saved = file.iter().zip(&layers);
    let plan = Plan::stage(model, |p, m| {
        let (f, ml) = match saved.next() {
            Some((f, ml)) if f.path == p.dotted() => (f, ml),
            _ => {
                return Err(Error::state(
                    "the model's layers changed while loading",
                    "report this as a bug (a Quantizable impl that walks different layers \
                     each time)",
                ))
            }
        };
        let key = |k: &str| p.join(k);
        let (io, int8) = if f.int8 {
            let s = read_int8(&r, &key, ml)?;
            let io = (s.inputs.clone(), s.output);
            (Some(io), Some(m.stage_int8_state(s)?))
        } else {
            (None, None)
        };
        let float = read_float(&r, &key, f, ml)?;
        Ok(LayerLoad { io, int8, float })
    })?;
    check_producers(&file, &plan.changes().collect::<Vec<_>>())?;
    drop(layers);
    plan.apply(model, |m, load| {
        m.set_training(false);
        if !load.float.is_empty() {
            m.load_float_params(load.float)?;
        }
        match load.int8 {
            Some(change) => m.apply_staged(change),
            None => Ok(()),
        }
    })
}
