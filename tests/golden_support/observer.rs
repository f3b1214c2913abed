//! observer: running min/max and qparams after each input.

use candle_qat::observer::ObserverConfig;
use candle_qat::qconfig::{ObserverKind, ObserverSpec};
use candle_qat::{QDType, QParams, QScheme};
use serde_json::Value;

use crate::case::{
    array, boolean, candle, check_exact, check_rel, err, f32s, i32s, int, num, paired, same_len,
    string, Case, R,
};

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

/// The observer a `config` describes. Every field must be present and consistent: the
/// optional ones (`quant_min`/`quant_max`, `averaging_constant`, `ch_axis`, `bins`) are null
/// exactly where FORMAT.md says.
fn spec(c: &Value) -> R<ObserverSpec> {
    let mut config = ObserverConfig::new(
        dtype(string(&c["dtype"], "dtype")?)?,
        qscheme(string(&c["qscheme"], "qscheme")?)?,
    )
    .with_reduce_range(boolean(&c["reduce_range"], "reduce_range")?)
    .with_eps(num(&c["eps"], "eps")? as f32);
    match (&c["quant_min"], &c["quant_max"]) {
        (Value::Null, Value::Null) => {}
        (lo, hi) => {
            config = config.with_range(int(lo, "quant_min")? as i32, int(hi, "quant_max")? as i32)
        }
    }
    let name = string(&c["observer"], "observer")?;
    let per_channel = name.contains("PerChannel");
    if per_channel != config.qscheme.is_per_channel() {
        return Err(format!("{name} with {:?}", config.qscheme));
    }
    match (per_channel, &c["ch_axis"]) {
        (true, a) => config = config.with_ch_axis(int(a, "ch_axis")? as usize),
        (false, Value::Null) => {}
        (false, a) => return Err(format!("per-tensor observer with ch_axis {a}")),
    }
    let moving = name.starts_with("MovingAverage");
    let histogram = name == "HistogramObserver";
    if !moving && !c["averaging_constant"].is_null() {
        return Err(format!("{name} with an averaging_constant"));
    }
    if !histogram && !c["bins"].is_null() {
        return Err(format!("{name} with bins"));
    }
    let kind = match name {
        "MinMaxObserver" | "PerChannelMinMaxObserver" => ObserverKind::MinMax,
        "MovingAverageMinMaxObserver" | "MovingAveragePerChannelMinMaxObserver" => {
            ObserverKind::MovingAverageMinMax {
                averaging_constant: num(&c["averaging_constant"], "averaging_constant")? as f32,
            }
        }
        "HistogramObserver" => ObserverKind::Histogram {
            bins: int(&c["bins"], "bins")? as usize,
        },
        o => return Err(format!("unknown observer {o}")),
    };
    Ok(ObserverSpec { kind, config })
}

/// Compared, after each input: `min_val`, `max_val` (exact), `scale`, `zero_point` (every
/// entry; HistogramObserver's only on the last, with its tolerance) and, once, `quant_range`.
pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let histogram = j["config"]["observer"] == "HistogramObserver";
    let obs_spec = spec(&j["config"])?;
    let mut obs = obs_spec.build().map_err(err)?;
    if obs.name() != string(&j["config"]["observer"], "observer")? {
        return Err(format!("built a {}", obs.name()));
    }
    let range = obs.quant_range();
    let want_range = array(&j["quant_range"], "quant_range")?
        .iter()
        .map(|v| int(v, "quant_range").map(|v| v as i32))
        .collect::<R<Vec<i32>>>()?;
    check_exact(
        "quant_range",
        &[range.quant_min(), range.quant_max()],
        &want_range,
    )?;
    let steps = paired(&j["inputs"], "inputs", &j["expected"], "expected")?;
    let last = steps.len() - 1;
    for (k, (x, e)) in steps.into_iter().enumerate() {
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
        // Only a histogram's entries before the last have no qparams.
        let qparams_listed = !(histogram && k < last);
        match (
            qparams_listed,
            e["scale"].is_null(),
            e["zero_point"].is_null(),
        ) {
            (false, true, true) => continue,
            (true, false, false) => {}
            _ => {
                return Err(format!(
                    "step {k}: scale/zero_point {} here (FORMAT.md: every entry, a histogram's \
                     last only)",
                    if qparams_listed {
                        "missing"
                    } else {
                        "unexpected"
                    }
                ))
            }
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
            same_len(&format!("step {k} zero_point"), &zp, &want_zp)?;
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
