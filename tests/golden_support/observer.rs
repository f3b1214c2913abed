//! observer: running min/max and qparams after each input.

use candle_qat::observer::ObserverConfig;
use candle_qat::qconfig::{ObserverKind, ObserverSpec};
use candle_qat::{QDType, QParams, QScheme};
use serde_json::Value;

use crate::case::{candle, check_exact, check_rel, err, f32s, i32s, Case, R};

pub fn qscheme(name: &str) -> R<QScheme> {
    Ok(match name {
        "per_tensor_affine" => QScheme::PerTensorAffine,
        "per_tensor_symmetric" => QScheme::PerTensorSymmetric,
        "per_channel_affine" => QScheme::PerChannelAffine,
        "per_channel_symmetric" => QScheme::PerChannelSymmetric,
        q => return Err(format!("unknown qscheme {q}")),
    })
}

pub fn dtype(name: &str) -> R<QDType> {
    match name {
        "quint8" => Ok(QDType::QUINT8),
        "qint8" => Ok(QDType::QINT8),
        d => Err(format!("unknown dtype {d}")),
    }
}

fn spec(c: &Value) -> R<ObserverSpec> {
    let mut config = ObserverConfig::new(
        dtype(c["dtype"].as_str().unwrap_or(""))?,
        qscheme(c["qscheme"].as_str().unwrap_or(""))?,
    )
    .with_reduce_range(c["reduce_range"].as_bool().unwrap_or(false))
    .with_eps(c["eps"].as_f64().ok_or("no eps")? as f32);
    if let (Some(lo), Some(hi)) = (c["quant_min"].as_i64(), c["quant_max"].as_i64()) {
        config = config.with_range(lo as i32, hi as i32);
    }
    if let Some(axis) = c["ch_axis"].as_u64() {
        config = config.with_ch_axis(axis as usize);
    }
    let averaging = || -> R<f32> {
        Ok(c["averaging_constant"]
            .as_f64()
            .ok_or("no averaging_constant")? as f32)
    };
    let kind = match c["observer"].as_str().unwrap_or("") {
        "MinMaxObserver" | "PerChannelMinMaxObserver" => ObserverKind::MinMax,
        "MovingAverageMinMaxObserver" | "MovingAveragePerChannelMinMaxObserver" => {
            ObserverKind::MovingAverageMinMax {
                averaging_constant: averaging()?,
            }
        }
        "HistogramObserver" => ObserverKind::Histogram {
            bins: c["bins"].as_u64().ok_or("no bins")? as usize,
        },
        o => return Err(format!("unknown observer {o}")),
    };
    Ok(ObserverSpec { kind, config })
}

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let histogram = j["config"]["observer"] == "HistogramObserver";
    let mut obs = spec(&j["config"])?.build().map_err(err)?;
    let range = obs.quant_range();
    let want_range: Vec<i32> = j["quant_range"]
        .as_array()
        .ok_or("no quant_range")?
        .iter()
        .map(|v| v.as_i64().unwrap_or(i64::MIN) as i32)
        .collect();
    check_exact(
        "quant_range",
        &[range.quant_min(), range.quant_max()],
        &want_range,
    )?;
    let inputs = j["inputs"].as_array().ok_or("no inputs")?;
    let expected = j["expected"].as_array().ok_or("no expected")?;
    for (k, (x, e)) in inputs.iter().zip(expected).enumerate() {
        obs.observe(&candle(x, "input")?).map_err(err)?;
        let (mn, mx) = obs.min_max().ok_or("observer saw nothing")?;
        check_exact(
            &format!("step {k} min_val"),
            &mn,
            &f32s(&e["min_val"], "min_val")?,
        )?;
        check_exact(
            &format!("step {k} max_val"),
            &mx,
            &f32s(&e["max_val"], "max_val")?,
        )?;
        if e["scale"].is_null() {
            continue;
        }
        let qp = obs.calculate_qparams().map_err(err)?;
        let (scale, zp) = match &qp {
            QParams::PerTensor { scale, zero_point } => (vec![*scale], vec![*zero_point]),
            QParams::PerChannel {
                scale, zero_point, ..
            } => (scale.clone(), zero_point.clone()),
        };
        let want_zp = i32s(&e["zero_point"], "zero_point")?;
        if histogram {
            check_rel(
                &format!("step {k} scale"),
                &scale,
                &f32s(&e["scale"], "scale")?,
                1e-4,
            )?;
            if zp.iter().zip(&want_zp).any(|(a, b)| (a - b).abs() > 1) {
                return Err(format!(
                    "step {k} zero_point = {zp:?}, want {want_zp:?} (within 1)"
                ));
            }
        } else {
            check_rel(
                &format!("step {k} scale"),
                &scale,
                &f32s(&e["scale"], "scale")?,
                1e-6,
            )?;
            check_exact(&format!("step {k} zero_point"), &zp, &want_zp)?;
        }
    }
    Ok(())
}
