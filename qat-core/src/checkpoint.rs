//! Saving and loading with safetensors: the QAT state of a prepared model (resume training
//! exactly) and the converted int8 model (weights as int8 codes, scales, biases and the
//! activation qparams of every layer).
//!
//! Float parameters and BatchNorm statistics live in the user's candle `VarMap` under
//! PyTorch's names; [`save_qat_checkpoint`] writes them and the fake-quant state into one
//! file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantizeState;
use crate::model::{ModulePath, Quantizable, Stage};
use crate::observer::ObserverState;
use crate::passes::for_each_layer;
use crate::record::IoQParams;

pub use crate::record::Int8State;

const FORMAT_KEY: &str = "format";
const QAT_FORMAT: &str = "candle-qat/qat-state/1";
const INT8_FORMAT: &str = "candle-qat/int8/1";

/// An owned tensor to write.
struct Entry {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Entry {
    fn f32(v: &[f32]) -> Self {
        Entry {
            dtype: Dtype::F32,
            shape: vec![v.len()],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn i32(v: &[i32]) -> Self {
        Entry {
            dtype: Dtype::I32,
            shape: vec![v.len()],
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    fn i8(v: &[i8], shape: &[usize]) -> Self {
        Entry {
            dtype: Dtype::I8,
            shape: shape.to_vec(),
            bytes: v.iter().map(|&x| x as u8).collect(),
        }
    }
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::state(
        format!("{}: {e}", path.display()),
        "check the file is a safetensors file written by candle-qat",
    )
}

fn st_write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::write(
        format!("{}: {e}", path.display()),
        "check that the directory exists and is writable and that the disk has room",
    )
}

fn write(path: &Path, entries: &[(String, Entry)], meta: HashMap<String, String>) -> Result<()> {
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(k, e)| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (k.clone(), v))
                .map_err(|err| st_write_err(path, err))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| st_write_err(path, e))
}

/// A safetensors file read into memory.
struct File {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl File {
    fn open(path: &Path, format: &str) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| st_err(path, e))?;
        let f = File {
            path: path.to_path_buf(),
            bytes,
        };
        let st = f.st()?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&f.bytes).map_err(|e| st_err(path, e))?;
        let found = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(FORMAT_KEY))
            .cloned();
        drop(st);
        if found.as_deref() != Some(format) {
            return Err(Error::state(
                format!(
                    "{} holds {:?}, not a {format} checkpoint",
                    path.display(),
                    found.unwrap_or_else(|| "no candle-qat format tag".into())
                ),
                "load QAT checkpoints with load_qat_checkpoint and int8 models with load_int8",
            ));
        }
        Ok(f)
    }

    fn st(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.bytes).map_err(|e| st_err(&self.path, e))
    }

    fn has(&self, key: &str) -> Result<bool> {
        Ok(self.st()?.names().contains(&key))
    }

    fn get(&self, key: &str, dtype: Dtype) -> Result<(Vec<usize>, Vec<u8>)> {
        let st = self.st()?;
        let t = st.tensor(key).map_err(|_| {
            Error::state(
                format!("{} has no entry `{key}`", self.path.display()),
                "load a checkpoint saved from a model of the same architecture and stage",
            )
        })?;
        if t.dtype() != dtype {
            return Err(Error::state(
                format!("`{key}` is {:?}, expected {dtype:?}", t.dtype()),
                "load a checkpoint written by candle-qat",
            ));
        }
        Ok((t.shape().to_vec(), t.data().to_vec()))
    }

    fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        let (_, b) = self.get(key, Dtype::F32)?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn i32s(&self, key: &str) -> Result<Vec<i32>> {
        let (_, b) = self.get(key, Dtype::I32)?;
        Ok(b.chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn fq_prefix(path: &ModulePath, role: &str) -> String {
    let name = if role == "weight" {
        "weight_fake_quant"
    } else {
        "activation_post_process"
    };
    path.join(name)
}

fn flags(s: &FakeQuantizeState) -> Vec<f32> {
    [s.observer_enabled, s.fake_quant_enabled, s.learning_enabled]
        .iter()
        .map(|&b| if b { 1.0 } else { 0.0 })
        .collect()
}

/// The fake-quant state of every prepared layer, as safetensors entries (PyTorch-like names:
/// `conv1.weight_fake_quant.scale`, `conv1.activation_post_process.min_val`, ...).
fn qat_entries<M: Quantizable>(model: &mut M) -> Result<Vec<(String, Entry)>> {
    let mut out = Vec::new();
    for_each_layer(model, |path, m| {
        m.for_each_fake_quant(&mut |role, fq| {
            let s = fq.state();
            let p = fq_prefix(path, role);
            out.push((format!("{p}.scale"), Entry::f32(&s.scale)));
            out.push((format!("{p}.zero_point"), Entry::f32(&s.zero_point)));
            out.push((format!("{p}.flags"), Entry::f32(&flags(&s))));
            out.push((format!("{p}.min_val"), Entry::f32(&s.observer.min_val)));
            out.push((format!("{p}.max_val"), Entry::f32(&s.observer.max_val)));
            out.push((format!("{p}.histogram"), Entry::f32(&s.observer.histogram)));
        });
        Ok(())
    })?;
    Ok(out)
}

/// Writes the model's float parameters and BN statistics (from `varmap`) and the state of
/// every fake-quant (qparams, observer statistics, toggles, LSQ parameters) to `path`.
///
/// ```no_run
/// # fn demo<M: qat_core::model::Quantizable>(model: &mut M, varmap: &candle_nn::VarMap) -> qat_core::Result<()> {
/// qat_core::checkpoint::save_qat_checkpoint(model, varmap, "qat.safetensors")?;
/// // later, into a model fused and prepared the same way:
/// qat_core::checkpoint::load_qat_checkpoint(model, varmap, "qat.safetensors")?;
/// # Ok(()) }
/// ```
pub fn save_qat_checkpoint<M: Quantizable>(
    model: &mut M,
    varmap: &VarMap,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let mut entries = qat_entries(model)?;
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::state("the VarMap lock is poisoned", "rebuild the VarMap"))?;
    for (name, var) in vars.iter() {
        let v = var.as_tensor().to_dtype(DType::F32)?;
        let shape = v.dims().to_vec();
        let data = v.flatten_all()?.to_vec1::<f32>()?;
        let mut e = Entry::f32(&data);
        e.shape = shape;
        entries.push((name.clone(), e));
    }
    let meta = HashMap::from([(FORMAT_KEY.to_string(), QAT_FORMAT.to_string())]);
    write(path, &entries, meta)
}

/// Restores what [`save_qat_checkpoint`] wrote into a model built, fused and prepared the
/// same way, and its `varmap`. A missing entry or a shape that does not match is an error.
pub fn load_qat_checkpoint<M: Quantizable>(
    model: &mut M,
    varmap: &VarMap,
    path: impl AsRef<Path>,
) -> Result<()> {
    let path = path.as_ref();
    let file = File::open(path, QAT_FORMAT)?;
    {
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| Error::state("the VarMap lock is poisoned", "rebuild the VarMap"))?;
        for (name, var) in vars.iter() {
            let (shape, _) = file.get(name, Dtype::F32)?;
            if shape != var.dims() {
                return Err(Error::state(
                    format!(
                        "`{name}` has shape {shape:?} in the file, {:?} in the model",
                        var.dims()
                    ),
                    "load a checkpoint saved from a model of the same architecture",
                ));
            }
            let t = Tensor::from_vec(file.f32s(name)?, shape, &Device::Cpu)?;
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
    }
    let mut failure: Option<Error> = None;
    for_each_layer(model, |path, m| {
        m.for_each_fake_quant(&mut |role, fq| {
            if failure.is_some() {
                return;
            }
            let p = fq_prefix(path, role);
            let r = (|| -> Result<()> {
                let f = file.f32s(&format!("{p}.flags"))?;
                let state = FakeQuantizeState {
                    scale: file.f32s(&format!("{p}.scale"))?,
                    zero_point: file.f32s(&format!("{p}.zero_point"))?,
                    observer_enabled: f.first() == Some(&1.0),
                    fake_quant_enabled: f.get(1) == Some(&1.0),
                    learning_enabled: f.get(2) == Some(&1.0),
                    observer: ObserverState {
                        min_val: file.f32s(&format!("{p}.min_val"))?,
                        max_val: file.f32s(&format!("{p}.max_val"))?,
                        histogram: file.f32s(&format!("{p}.histogram"))?,
                    },
                };
                fq.load_state(&state)
            })();
            if let Err(e) = r {
                failure = Some(e.in_module(p));
            }
        });
        Ok(())
    })?;
    failure.map_or(Ok(()), Err)
}

fn io_entry(q: &[IoQParams]) -> Entry {
    let v: Vec<f32> = q
        .iter()
        .flat_map(|q| {
            [
                q.scale,
                q.zero_point as f32,
                q.quant_min as f32,
                q.quant_max as f32,
            ]
        })
        .collect();
    let mut e = Entry::f32(&v);
    e.shape = vec![q.len(), 4];
    e
}

fn io_from(v: &[f32]) -> Vec<IoQParams> {
    v.chunks_exact(4)
        .map(|c| IoQParams {
            scale: c[0],
            zero_point: c[1] as i32,
            quant_min: c[2] as i32,
            quant_max: c[3] as i32,
        })
        .collect()
}

/// Writes a converted model: per layer its int8 weight codes (safetensors `I8`), weight
/// scales, biases, and input and output qparams; metadata names the format and each
/// weight's scheme.
pub fn save_int8<M: Quantizable>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let mut entries = Vec::new();
    let mut meta = HashMap::from([(FORMAT_KEY.to_string(), INT8_FORMAT.to_string())]);
    for_each_layer(model, |p, m| {
        let Some(s) = m.int8_state() else {
            return Ok(());
        };
        let key = |k: &str| p.join(k);
        if !s.weight_codes.is_empty() {
            entries.push((key("weight"), Entry::i8(&s.weight_codes, &s.weight_shape)));
            entries.push((key("weight_scale"), Entry::f32(&s.weight_scales)));
            entries.push((key("bias"), Entry::f32(&s.bias)));
            entries.push((key("bias_int32"), Entry::i32(&s.bias_int32)));
            let scheme = if s.weight_scales.len() > 1 {
                "per_channel_symmetric"
            } else {
                "per_tensor_symmetric"
            };
            meta.insert(key("weight.qscheme"), scheme.to_string());
        }
        entries.push((key("input_qparams"), io_entry(&s.inputs)));
        entries.push((key("output_qparams"), io_entry(s.output.as_slice())));
        Ok(())
    })?;
    if entries.is_empty() {
        return Err(Error::pass(
            "save_int8 found no converted layer",
            "convert the model first (passes::convert)",
        ));
    }
    write(path, &entries, meta)
}

/// Loads a model written by [`save_int8`] into a model of the same struct, fused the same
/// way (the float weights are not needed: build it from `VarBuilder::zeros`). Layers the file
/// has become converted; the model is left in eval mode.
pub fn load_int8<M: Quantizable>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let file = File::open(path, INT8_FORMAT)?;
    let mut loaded = 0;
    for_each_layer(model, |p, m| {
        m.set_training(false);
        let key = |k: &str| p.join(k);
        if !file.has(&key("output_qparams"))? {
            return Ok(());
        }
        let mut s = Int8State {
            inputs: io_from(&file.f32s(&key("input_qparams"))?),
            output: io_from(&file.f32s(&key("output_qparams"))?)
                .first()
                .copied(),
            ..Default::default()
        };
        if file.has(&key("weight"))? {
            let (shape, bytes) = file.get(&key("weight"), Dtype::I8)?;
            s.weight_codes = bytes.into_iter().map(|b| b as i8).collect();
            s.weight_shape = shape;
            s.weight_scales = file.f32s(&key("weight_scale"))?;
            s.bias = file.f32s(&key("bias"))?;
            s.bias_int32 = file.i32s(&key("bias_int32"))?;
        }
        if m.stage() == Stage::Converted {
            return Err(Error::pass(
                "the model is already converted",
                "load int8 checkpoints into a float (fused) model",
            ));
        }
        m.load_int8_state(s)?;
        loaded += 1;
        Ok(())
    })?;
    if loaded == 0 {
        return Err(Error::state(
            format!("{} matched no layer of the model", path.display()),
            "load a checkpoint saved from a model of the same architecture",
        ));
    }
    Ok(())
}
