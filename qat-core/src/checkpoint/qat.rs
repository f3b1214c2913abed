//! The QAT file: a prepared model mid-training. The user's `VarMap` (float parameters and
//! BatchNorm statistics under PyTorch's names), every fake-quant's state, the structure and a
//! checksum in the metadata. Loading validates everything, then applies it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::file::{self, Entry, Format, Reader, STRUCTURE_KEY};
use super::structure::{self, Layer};
use crate::error::{Error, Result};
use crate::fake_quant::{FakeQuantize, FakeQuantizeState};
use crate::model::transaction::Plan;
use crate::model::Quantizable;
use crate::observer::ObserverState;
use crate::passes::{fake_quant_name, fake_quant_path, for_each_layer};

pub(super) const FORMAT: Format = Format {
    tag: "candle-qat/qat-state/2",
    old: &["candle-qat/qat-state/1"],
    what: "a prepared model saved by save_qat_checkpoint",
    saver: "save_qat_checkpoint",
    why_old: "it has no structure record and no checksum to check it against the model",
};

fn flags(s: &FakeQuantizeState) -> Vec<f32> {
    [s.observer_enabled, s.fake_quant_enabled, s.learning_enabled]
        .iter()
        .map(|&b| if b { 1.0 } else { 0.0 })
        .collect()
}

fn vec_entry(v: &[f32]) -> Entry {
    Entry::f32(v, &[v.len()])
}

fn lock_err() -> Error {
    Error::state("the VarMap lock is poisoned", "rebuild the VarMap")
}

/// The fake-quants of every layer with their entry prefixes, read without changing them.
fn fake_quants<M: Quantizable>(model: &mut M) -> Result<Vec<(String, FakeQuantize)>> {
    let mut out = Vec::new();
    for_each_layer(model, |path, m| {
        for (role, fq) in m.fake_quants() {
            out.push((fake_quant_path(path, &role), fq));
        }
        Ok(())
    })?;
    Ok(out)
}

pub(super) fn save<M: Quantizable>(model: &mut M, varmap: &VarMap, path: &Path) -> Result<()> {
    let records: Vec<Layer> = structure::walk(model)?
        .into_iter()
        .map(|l| Layer {
            path: l.path,
            kind: l.kind,
            stage: l.stage,
            int8: false,
            params: Vec::new(),
            producers: Vec::new(),
        })
        .collect();
    let mut entries = Vec::new();
    for (p, fq) in fake_quants(model)? {
        let s = fq.state();
        entries.push((format!("{p}.scale"), vec_entry(&s.scale)));
        entries.push((format!("{p}.zero_point"), vec_entry(&s.zero_point)));
        entries.push((format!("{p}.flags"), vec_entry(&flags(&s))));
        entries.push((format!("{p}.min_val"), vec_entry(&s.observer.min_val)));
        entries.push((format!("{p}.max_val"), vec_entry(&s.observer.max_val)));
        entries.push((format!("{p}.histogram"), vec_entry(&s.observer.histogram)));
    }
    // torchao intx quantizers that keep qparams (static, or range learning: their trained
    // scale and zero point); dynamic ones recompute them every forward and hold no state.
    for_each_layer(model, |path, m| {
        m.for_each_intx_quantizer(&mut |role, q, _| {
            if let (false, Some(qp)) = (q.spec().is_dynamic(), q.qparams()?) {
                let p = path.join(role);
                for (k, t) in [("scale", qp.scale()), ("zero_point", qp.zero_point())] {
                    let data = t.flatten_all()?.to_vec1::<f32>()?;
                    entries.push((format!("{p}.{k}"), Entry::f32(&data, t.dims())));
                }
            }
            Ok(())
        })
    })?;
    let vars = varmap.data().lock().map_err(|_| lock_err())?;
    for (name, var) in vars.iter() {
        let v = var.as_tensor().to_dtype(DType::F32)?;
        let data = v.flatten_all()?.to_vec1::<f32>()?;
        entries.push((name.clone(), Entry::f32(&data, v.dims())));
    }
    drop(vars);
    let meta = HashMap::from([(STRUCTURE_KEY.to_string(), structure::encode(&records)?)]);
    file::write(path, &FORMAT, entries, meta)
}

/// A fake-quant's saved state.
fn read_state(r: &Reader, p: &str) -> Result<FakeQuantizeState> {
    let v = |k: &str| r.f32s(&format!("{p}.{k}")).map(|(_, v)| v);
    let f = v("flags")?;
    if f.len() != 3 {
        return Err(Error::state(
            format!("`{p}.flags` holds {} values, 3 expected", f.len()),
            "load a checkpoint written by candle-qat",
        ));
    }
    Ok(FakeQuantizeState {
        scale: v("scale")?,
        zero_point: v("zero_point")?,
        observer_enabled: f[0] == 1.0,
        fake_quant_enabled: f[1] == 1.0,
        learning_enabled: f[2] == 1.0,
        observer: ObserverState {
            min_val: v("min_val")?,
            max_val: v("max_val")?,
            histogram: v("histogram")?,
        },
    })
}

pub(super) fn load<M: Quantizable>(model: &mut M, varmap: &VarMap, path: &Path) -> Result<()> {
    let bytes = file::read_bytes(path)?;
    let r = Reader::open(path, &bytes, &FORMAT)?;
    let file = structure::decode(r.meta(STRUCTURE_KEY)?)?;
    let layers = structure::walk(model)?;
    structure::compare(&file, &layers, |saved, now| {
        (saved != now).then(|| {
            "fuse and prepare_qat the model as the saved one was (the same fusion, the same \
             qconfig mapping) before loading"
                .to_string()
        })
    })?;
    drop(layers);
    // Read and validate everything before anything changes: every layer's fake-quant states
    // (checked by the layer against its fake-quants), then every parameter.
    let plan = Plan::stage(model, |path, m| {
        let states = m
            .fake_quants()
            .into_iter()
            .map(|(role, _)| {
                // Named under the layer: the plan adds the layer's path to an error.
                let state = read_state(&r, &fake_quant_path(path, &role))
                    .map_err(|e| e.in_module(fake_quant_name(&role)))?;
                Ok((role, state))
            })
            .collect::<Result<Vec<_>>>()?;
        m.check_fake_quant_states(&states)?;
        Ok(states)
    })?;
    // Kept intx qparams: read and checked now, set after everything else was validated.
    let mut intx = Vec::new();
    for_each_layer(model, |path, m| {
        m.for_each_intx_quantizer(&mut |role, q, _| {
            let p = path.join(role);
            let key = |k: &str| format!("{p}.{k}");
            if q.spec().is_dynamic() {
                return Ok(());
            }
            if !r.has(&key("scale")) {
                if q.qparams()?.is_some() {
                    return Err(Error::state(
                        format!(
                            "`{p}` holds static qparams but the file has none for it (saved                              before its first forward, or from a model with another scheme)"
                        ),
                        "load a checkpoint saved from a model prepared with the same qconfig                          mapping",
                    ));
                }
                return Ok(());
            }
            let (ss, sv) = r.f32s(&key("scale"))?;
            let (zs, zv) = r.f32s(&key("zero_point"))?;
            if ss != zs || sv.iter().chain(&zv).any(|x| !x.is_finite()) {
                return Err(Error::state(
                    format!("`{p}`: saved scale {ss:?} / zero point {zs:?} do not pair, or hold a non-finite value"),
                    "load a checkpoint written by save_qat_checkpoint",
                ));
            }
            if let Some(now) = q.qparams()? {
                if now.scale().dims() != ss.as_slice() {
                    return Err(Error::state(
                        format!(
                            "`{p}`: saved qparams of shape {ss:?}, the quantizer's are {:?}",
                            now.scale().dims()
                        ),
                        "load a checkpoint saved from a model of the same architecture and                          qconfig mapping",
                    ));
                }
            }
            let scale = Tensor::from_vec(sv, ss, &Device::Cpu)?;
            let zp = Tensor::from_vec(zv, zs, &Device::Cpu)?;
            intx.push(crate::fake_quant::IntxQParams::new(scale, zp)?);
            Ok(())
        })
    })?;
    let mut values = Vec::new();
    {
        let vars = varmap.data().lock().map_err(|_| lock_err())?;
        for (name, var) in vars.iter() {
            let (shape, v) = r.f32s(name)?;
            if shape != var.dims() {
                return Err(Error::state(
                    format!(
                        "`{name}` has shape {shape:?} in the file, {:?} in the model",
                        var.dims()
                    ),
                    "load a checkpoint saved from a model of the same architecture",
                ));
            }
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(Error::state(
                    format!("`{name}` holds {x}"),
                    "load a checkpoint saved from a model that trained without diverging",
                ));
            }
            let t = Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(var.dtype())?
                .to_device(var.device())?;
            values.push((var.clone(), t));
        }
    }
    for (var, t) in values {
        var.set(&t)?;
    }
    plan.apply(model, |m, states| m.load_fake_quant_states(&states))?;
    let mut intx = intx.into_iter();
    for_each_layer(model, |path, m| {
        m.for_each_intx_quantizer(&mut |role, q, _| {
            if q.spec().is_dynamic() {
                return Ok(());
            }
            let p = path.join(role);
            if r.has(&format!("{p}.scale")) {
                if let Some(qp) = intx.next() {
                    q.set_qparams(qp)?;
                }
            }
            Ok(())
        })
    })
}
