//! The eager-mode QAT pipeline shared by model_e2e and model_e2e_mobile: the model built from
//! a case's `state_dict`, its fusion groups checked, fused, prepared, calibrated and put in
//! eval mode; and the comparison of a converted model's output codes.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::model::Quantizable;
use candle_qat::nn::{BatchNorm2d, BatchNormConfig};
use candle_qat::passes::{eval, fuse_modules_qat, prepare_qat, train};
use candle_qat::qconfig::QConfig;
use candle_qat::qconfig_mapping::QConfigMapping;

use crate::case::{array, as_codes, candle, check_codes, err, f32s, int, string, to_vec, Case, R};
use crate::fake_quantize_module::backend;

/// A BatchNorm2d over `c` channels with PyTorch's defaults.
pub fn bn(c: usize, vb: VarBuilder) -> candle_qat::Result<BatchNorm2d> {
    BatchNorm2d::new(c, BatchNormConfig::default(), vb)
}

/// The model built from the case's `state_dict` (every key used, every parameter given), its
/// declared fusion groups checked against `fuse_groups`, `engine` checked to equal `preset`
/// and `qconfig_version` to be 0, fused and prepared for the preset, then run on every `calib`
/// batch in train mode and put in eval mode.
pub fn calibrated<M: Quantizable + Module>(
    case: &Case,
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
) -> R<M> {
    let j = &case.json;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let given = j["state_dict"].as_object().ok_or("no state_dict")?;
    {
        let mut data = varmap.data().lock().map_err(err)?;
        for (k, v) in given {
            data.insert(k.clone(), Var::from_tensor(&candle(v, k)?).map_err(err)?);
        }
    }
    let mut model = build(VarBuilder::from_varmap(&varmap, DType::F32, &dev)).map_err(err)?;
    // A VarMap creates a parameter the state_dict lacks: the model must have asked for
    // exactly the keys given (shapes are checked by the layers' constructors).
    let mut used: Vec<String> = varmap.data().lock().map_err(err)?.keys().cloned().collect();
    let mut listed: Vec<String> = given.keys().cloned().collect();
    used.sort();
    listed.sort();
    if used != listed {
        return Err(format!("model parameters {used:?}, state_dict {listed:?}"));
    }
    let want_groups = array(&j["fuse_groups"], "fuse_groups")?
        .iter()
        .map(|g| {
            array(g, "fuse group")?
                .iter()
                .map(|m| string(m, "fuse group member").map(str::to_string))
                .collect::<R<Vec<_>>>()
        })
        .collect::<R<Vec<_>>>()?;
    let groups: Vec<Vec<String>> = model
        .fusion_groups()
        .into_iter()
        .map(|g| g.into_iter().map(str::to_string).collect())
        .collect();
    if groups != want_groups {
        return Err(format!("fuse groups {groups:?}, want {want_groups:?}"));
    }
    let preset = string(&j["preset"], "preset")?;
    if string(&j["engine"], "engine")? != preset || int(&j["qconfig_version"], "version")? != 0 {
        return Err("want engine = preset and qconfig_version 0".into());
    }
    let qc = QConfig::default_qat(backend(preset)?);
    train(&mut model).map_err(err)?;
    fuse_modules_qat(&mut model).map_err(err)?;
    prepare_qat(&mut model, &QConfigMapping::global(qc)).map_err(err)?;
    for (i, x) in array(&j["calib"], "calib")?.iter().enumerate() {
        model
            .forward(&candle(x, "calib")?)
            .map_err(|e| format!("calib {i}: {e}"))?;
    }
    eval(&mut model).map_err(err)?;
    Ok(model)
}

/// The integer output codes of `y` (a converted model's output) under its output scale and
/// zero point.
pub fn codes(y: &Tensor, scale: f32, zero_point: i32) -> R<Vec<i64>> {
    Ok(as_codes("int8 y", &to_vec(y)?, scale)?
        .into_iter()
        .map(|c| c + zero_point as i64)
        .collect())
}

/// `codes` against the case's `expected.int8_codes_clamped` (integer-code tolerance).
pub fn check_int8_codes_clamped(e: &serde_json::Value, codes: &[i64]) -> R<()> {
    let want = as_codes(
        "int8_codes_clamped",
        &f32s(&e["int8_codes_clamped"], "int8_codes_clamped")?,
        1.0,
    )?;
    check_codes("int8_codes_clamped", codes, &want)
}
