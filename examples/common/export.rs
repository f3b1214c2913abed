//! Saving what the examples train: the fake-quant qparams of a prepared model, and the int8
//! weights of a converted one.
//!
//! qat-core has no save API for converted models (their int8 weights are private to each
//! layer), so the int8 export is rebuilt here from public pieces: the float weights and
//! BatchNorm parameters in the `VarMap`, folded as the library's QAT convert folds them
//! (`w * gamma / sqrt(running_var + eps)`, bias `(b - mean) * gamma / sqrt(var + eps) + beta`),
//! quantized by `QuantizedWeight::quantize` with the scales and code range of the layer's
//! weight fake-quant as `named_modules` reports them after convert. The examples check the
//! result by running it through qat-core's int8 kernels against the converted model.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use candle_qat::passes::ModuleInfo;
use candle_qat::quantized::QuantizedWeight;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use super::trainer::AnyResult;

/// Scale, zero point and code range of an activation (a layer's output).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActQParams {
    pub scale: f32,
    pub zero_point: i32,
    pub quant_min: i32,
    pub quant_max: i32,
}

/// One converted conv/linear layer as the integer engine runs it.
#[derive(Clone, Debug)]
pub struct Int8Layer {
    /// Module path (`conv1`, `blocks.0.conv2`).
    pub path: String,
    /// What the layer is (`ConvBnReLU2d`, `LinearReLU`, ...).
    pub kind: String,
    /// Symmetric weight codes and scales (BN folded).
    pub weight: QuantizedWeight,
    /// The weight code range (-128..=127 for 8 bits, -8..=7 for 4 bits).
    pub weight_range: (i32, i32),
    /// The folded float bias.
    pub bias: Vec<f32>,
    /// Output activation qparams.
    pub output: ActQParams,
}

impl Int8Layer {
    /// Bits per weight code.
    pub fn weight_bits(&self) -> u32 {
        let n = (self.weight_range.1 - self.weight_range.0 + 1) as u32;
        32 - (n - 1).leading_zeros()
    }

    /// Bytes as stored here (one byte per code) and bit-packed (`bits` per code), each plus
    /// the f32 scales and bias.
    pub fn bytes(&self) -> (usize, usize) {
        let n = self.weight.codes().len();
        let extra = 4 * (self.weight.scales().len() + self.bias.len());
        let packed = (n * self.weight_bits() as usize).div_ceil(8);
        (n + extra, packed + extra)
    }
}

/// Everything the int8 export holds.
#[derive(Clone, Debug, Default)]
pub struct Int8Export {
    pub layers: Vec<Int8Layer>,
    /// Output qparams of every layer that has an output fake-quant (QuantStub,
    /// FloatFunctional, weighted layers), by path.
    pub activations: BTreeMap<String, ActQParams>,
}

impl Int8Export {
    pub fn layer(&self, path: &str) -> AnyResult<&Int8Layer> {
        self.layers
            .iter()
            .find(|l| l.path == path)
            .ok_or_else(|| format!("the int8 export has no layer `{path}`").into())
    }

    pub fn activation(&self, path: &str) -> AnyResult<ActQParams> {
        self.activations
            .get(path)
            .copied()
            .ok_or_else(|| format!("the int8 export has no activation qparams for `{path}`").into())
    }

    /// (stored bytes, bit-packed bytes) of all int8 layers.
    pub fn weight_bytes(&self) -> (usize, usize) {
        self.layers.iter().fold((0, 0), |(a, b), l| {
            let (x, y) = l.bytes();
            (a + x, b + y)
        })
    }
}

fn var(vm: &VarMap, name: &str) -> AnyResult<Tensor> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| "the VarMap's lock is poisoned")?;
    data.get(name)
        .map(|v| v.as_tensor().detach())
        .ok_or_else(|| format!("the VarMap has no variable `{name}`").into())
}

fn act_of(m: &ModuleInfo) -> Option<ActQParams> {
    m.fake_quants
        .iter()
        .find(|f| f.role == "activation")
        .map(|f| ActQParams {
            scale: f.qparams.scales()[0],
            zero_point: f.qparams.zero_points()[0],
            quant_min: f.quant_range.0,
            quant_max: f.quant_range.1,
        })
}

/// Rebuilds the int8 layers of a converted model. `modules` is `named_modules(&model)` after
/// `convert`; `vm` holds the QAT weights, named as the module paths (`conv1.weight`,
/// `bn1.running_var`); `bn_of(path)` names the BatchNorm fused into the weighted layer at
/// `path`, if any; `bn_eps` is that BatchNorm's eps.
pub fn int8_export(
    modules: &[ModuleInfo],
    vm: &VarMap,
    bn_of: impl Fn(&str) -> Option<String>,
    bn_eps: f64,
) -> AnyResult<Int8Export> {
    let mut out = Int8Export::default();
    for m in modules {
        if let Some(a) = act_of(m) {
            out.activations.insert(m.path.clone(), a);
        }
        let weighted = matches!(m.type_name, "Conv2d" | "Linear");
        if !weighted || m.stage != candle_qat::model::Stage::Converted {
            continue;
        }
        let wfq = m
            .fake_quants
            .iter()
            .find(|f| f.role == "weight")
            .ok_or_else(|| format!("converted layer `{}` has no weight fake-quant", m.path))?;
        if wfq.qparams.zero_points().iter().any(|&z| z != 0) {
            return Err(format!("layer `{}` has affine weight qparams", m.path).into());
        }
        let w = var(vm, &format!("{}.weight", m.path))?;
        let o = w.dims()[0];
        let b = match var(vm, &format!("{}.bias", m.path)) {
            Ok(b) => b,
            Err(_) => Tensor::zeros(o, w.dtype(), w.device())?,
        };
        let (w, b) = match bn_of(&m.path) {
            Some(bn) => {
                let gamma = var(vm, &format!("{bn}.weight"))?;
                let beta = var(vm, &format!("{bn}.bias"))?;
                let rm = var(vm, &format!("{bn}.running_mean"))?;
                let rv = var(vm, &format!("{bn}.running_var"))?;
                // As qat-core: scale_factor = gamma / sqrt(rv + eps), then w * sf.
                let sf = gamma.broadcast_div(&(&rv + bn_eps)?.sqrt()?)?;
                let mut shape = vec![1; w.rank()];
                shape[0] = o;
                let w = w.broadcast_mul(&sf.reshape(shape)?)?;
                let rsqrt = (rv + bn_eps)?.sqrt()?.recip()?;
                let b = (((b - rm)? * rsqrt)? * gamma)?.add(&beta)?;
                (w, b)
            }
            None => (w, b),
        };
        let weight = QuantizedWeight::quantize(
            &w,
            wfq.qparams.scales(),
            wfq.quant_range.0,
            wfq.quant_range.1,
        )?;
        let output = act_of(m)
            .ok_or_else(|| format!("converted layer `{}` has no output qparams", m.path))?;
        out.layers.push(Int8Layer {
            path: m.path.clone(),
            kind: m.kind.clone(),
            weight,
            weight_range: wfq.quant_range,
            bias: b.to_vec1::<f32>()?,
            output,
        });
    }
    Ok(out)
}

/// A tensor to write: dtype, shape, little-endian bytes.
struct Raw(Dtype, Vec<usize>, Vec<u8>);

fn f32s(v: &[f32]) -> Raw {
    Raw(
        Dtype::F32,
        vec![v.len()],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn i32s(v: &[i32]) -> Raw {
    Raw(
        Dtype::I32,
        vec![v.len()],
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn write(
    tensors: &BTreeMap<String, Raw>,
    meta: HashMap<String, String>,
    path: &Path,
) -> AnyResult<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, Raw(d, s, b))| Ok((k.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<AnyResult<_>>()?;
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Writes the int8 export as safetensors: per weighted layer `{path}.weight` (I8 codes, the
/// layer's weight shape), `{path}.weight_scale` (F32, one or one per output channel),
/// `{path}.bias` (F32, folded); per activation `{path}.scale` (F32 [1]),
/// `{path}.zero_point` (I32 [1]) and `{path}.quant_range` (I32 [2]). `meta` goes in the
/// header next to a description of the format.
pub fn save_int8(export: &Int8Export, meta: &[(&str, String)], path: &Path) -> AnyResult<()> {
    let mut t = BTreeMap::new();
    for l in &export.layers {
        let codes: Vec<u8> = l.weight.codes().iter().map(|&c| c as u8).collect();
        t.insert(
            format!("{}.weight", l.path),
            Raw(Dtype::I8, l.weight.shape().to_vec(), codes),
        );
        t.insert(format!("{}.weight_scale", l.path), f32s(l.weight.scales()));
        t.insert(
            format!("{}.weight_range", l.path),
            i32s(&[l.weight_range.0, l.weight_range.1]),
        );
        t.insert(format!("{}.bias", l.path), f32s(&l.bias));
    }
    for (p, a) in &export.activations {
        t.insert(format!("{p}.scale"), f32s(&[a.scale]));
        t.insert(format!("{p}.zero_point"), i32s(&[a.zero_point]));
        t.insert(
            format!("{p}.quant_range"),
            i32s(&[a.quant_min, a.quant_max]),
        );
    }
    let mut m: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    m.insert(
        "format".into(),
        "candle-qat int8 export: symmetric weight codes (I8, zero point 0, BN folded) with \
         per-channel or per-tensor F32 scales and F32 folded bias; u8 activations with scale, \
         zero point and code range per producing module"
            .into(),
    );
    write(&t, m, path)
}

/// Writes every fake-quant's qparams of a prepared model (`named_modules`): per fake-quant
/// `{path}.{role}.scale` (F32) and `{path}.{role}.zero_point` (I32) and
/// `{path}.{role}.quant_range` (I32 [2]). Together with the `VarMap` checkpoint this is the
/// QAT model's state (the observers' running min/max are not included).
pub fn save_qparams(modules: &[ModuleInfo], path: &Path) -> AnyResult<()> {
    let mut t = BTreeMap::new();
    let mut meta = HashMap::new();
    for m in modules {
        for f in &m.fake_quants {
            let key = format!("{}.{}", m.path, f.role);
            t.insert(format!("{key}.scale"), f32s(f.qparams.scales()));
            t.insert(format!("{key}.zero_point"), i32s(f.qparams.zero_points()));
            t.insert(
                format!("{key}.quant_range"),
                i32s(&[f.quant_range.0, f.quant_range.1]),
            );
            meta.insert(
                key,
                format!(
                    "{} kind={} observer={} observer_enabled={} fake_quant_enabled={}",
                    m.path, m.kind, f.observer, f.observer_enabled, f.fake_quant_enabled
                ),
            );
        }
    }
    write(&t, meta, path)
}

/// Reads an int8 export back (the inverse of [`save_int8`]).
pub fn load_int8(path: &Path) -> AnyResult<Int8Export> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let get = |name: &str| -> AnyResult<TensorView> {
        st.tensor(name)
            .map_err(|e| format!("{}: tensor `{name}`: {e}", path.display()).into())
    };
    let f32v = |name: &str| -> AnyResult<Vec<f32>> {
        let t = get(name)?;
        if t.dtype() != Dtype::F32 {
            return Err(format!("{}: `{name}` is not F32", path.display()).into());
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let i32v = |name: &str| -> AnyResult<Vec<i32>> {
        let t = get(name)?;
        if t.dtype() != Dtype::I32 {
            return Err(format!("{}: `{name}` is not I32", path.display()).into());
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let mut out = Int8Export::default();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for n in &names {
        if let Some(p) = n.strip_suffix(".zero_point") {
            let r = i32v(&format!("{p}.quant_range"))?;
            out.activations.insert(
                p.to_string(),
                ActQParams {
                    scale: f32v(&format!("{p}.scale"))?[0],
                    zero_point: i32v(n)?[0],
                    quant_min: r[0],
                    quant_max: r[1],
                },
            );
        }
    }
    for n in &names {
        let Some(p) = n.strip_suffix(".weight_scale") else {
            continue;
        };
        let w = get(&format!("{p}.weight"))?;
        if w.dtype() != Dtype::I8 {
            return Err(format!("{}: `{p}.weight` is not I8", path.display()).into());
        }
        let codes: Vec<i8> = w.data().iter().map(|&b| b as i8).collect();
        let weight = QuantizedWeight::from_codes(codes, w.shape(), &f32v(n)?)?;
        let r = i32v(&format!("{p}.weight_range"))?;
        out.layers.push(Int8Layer {
            path: p.to_string(),
            kind: String::new(),
            weight,
            weight_range: (r[0], r[1]),
            bias: f32v(&format!("{p}.bias"))?,
            output: out.activation(p)?,
        });
    }
    Ok(out)
}

/// The dequantized weights of a layer, for inspection.
pub fn dequantized(layer: &Int8Layer) -> AnyResult<Tensor> {
    Ok(layer.weight.dequantize(&Device::Cpu)?)
}
