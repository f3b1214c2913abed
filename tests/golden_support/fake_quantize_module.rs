//! fake_quantize_module: a FakeQuantize built from a preset, fed inputs with toggles.

use candle_qat::fake_quant::FakeQuantize;
use candle_qat::qconfig::{Backend, ObserverKind, QConfig};
use serde_json::Value;

use crate::case::{
    boolean, candle, check_exact, check_fq, check_rel, err, f32s, i32s, int, num, paired, string,
    to_vec, Case, R,
};
use crate::observer::{dtype, qscheme};

pub fn backend(name: &str) -> R<Backend> {
    match name {
        "fbgemm" => Ok(Backend::Fbgemm),
        "x86" => Ok(Backend::X86),
        "qnnpack" => Ok(Backend::Qnnpack),
        b => Err(format!("unknown preset {b}")),
    }
}

/// `qconfig.preset`, `role`, `version` build the FakeQuantize; the rest of `qconfig` (the
/// observer's class, `dtype`, `qscheme`, `quant_min`/`quant_max`, `averaging_constant`,
/// `ch_axis`, `eps`) is compared with what that built. Per input, after `toggles`: `y`,
/// `scale`, `zero_point`, `min_val`, `max_val`.
pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let q = &j["qconfig"];
    if int(&q["version"], "version")? != 0 {
        return Err(format!("qconfig version {} is not supported", q["version"]));
    }
    let qc = QConfig::default_qat(backend(string(&q["preset"], "preset")?)?);
    let spec = match string(&q["role"], "role")? {
        "weight" => qc.weight,
        "activation" => qc.activation,
        r => return Err(format!("unknown role {r}")),
    };
    let mut fq = spec.build().map_err(err)?;
    check_settings(q, &fq)?;
    let steps = paired(&j["inputs"], "inputs", &j["expected"], "expected")?;
    let toggles = match &j["toggles"] {
        Value::Null => None,
        t => Some(paired(&j["inputs"], "inputs", t, "toggles")?),
    };
    let ch_axis = fq.observer().ch_axis();
    for (k, (x, e)) in steps.into_iter().enumerate() {
        if let Some(t) = toggles.as_ref().map(|t| t[k].1) {
            match boolean(&t["observer"], "toggles.observer")? {
                true => fq.enable_observer(),
                false => fq.disable_observer(),
            }
            match boolean(&t["fake_quant"], "toggles.fake_quant")? {
                true => fq.enable_fake_quant(),
                false => fq.disable_fake_quant(),
            }
        }
        let x = candle(x, "input")?;
        let y = to_vec(&fq.forward(&x).map_err(err)?)?;
        let want_scale = f32s(&e["scale"], "scale")?;
        check_rel(&format!("step {k} scale"), &fq.scale(), &want_scale, 1e-6)?;
        check_exact(
            &format!("step {k} zero_point"),
            &fq.zero_point(),
            &i32s(&e["zero_point"], "zero_point")?,
        )?;
        // The step of each element: its channel's scale.
        let dims = x.dims();
        let (inner, channels) = match ch_axis {
            Some(a) if a < dims.len() => (dims[a + 1..].iter().product::<usize>(), dims[a]),
            Some(a) => return Err(format!("ch_axis {a} of a {dims:?} input")),
            None => (x.elem_count(), 1),
        };
        if want_scale.len() != channels {
            return Err(format!(
                "{} scales for {channels} channels",
                want_scale.len()
            ));
        }
        check_fq(&format!("step {k} y"), &y, &f32s(&e["y"], "y")?, |i| {
            want_scale[(i / inner) % channels]
        })?;
        match (
            fq.observer().min_max(),
            e["min_val"].is_null(),
            e["max_val"].is_null(),
        ) {
            (None, true, true) => {}
            (Some((mn, mx)), false, false) => {
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
            }
            (got, _, _) => {
                return Err(format!(
                    "step {k}: observer state {got:?}, want {} / {}",
                    e["min_val"], e["max_val"]
                ))
            }
        }
    }
    Ok(())
}

/// The settings the case lists for reference, against the FakeQuantize the preset built.
fn check_settings(q: &Value, fq: &FakeQuantize) -> R<()> {
    let obs = fq.observer();
    let cfg = &fq.spec().observer.config;
    let name = string(&q["observer"], "observer")?;
    if obs.name() != name {
        return Err(format!("observer {}, want {name}", obs.name()));
    }
    let d = dtype(string(&q["dtype"], "dtype")?)?;
    if cfg.dtype != d {
        return Err(format!("dtype {:?}, want {d:?}", cfg.dtype));
    }
    let qs = qscheme(string(&q["qscheme"], "qscheme")?)?;
    if obs.qscheme() != qs {
        return Err(format!("qscheme {:?}, want {qs:?}", obs.qscheme()));
    }
    let r = fq.quant_range();
    check_exact(
        "quant range",
        &[r.quant_min(), r.quant_max()],
        &[
            int(&q["quant_min"], "quant_min")? as i32,
            int(&q["quant_max"], "quant_max")? as i32,
        ],
    )?;
    let averaging = match fq.spec().observer.kind {
        ObserverKind::MovingAverageMinMax { averaging_constant } => Some(averaging_constant),
        _ => None,
    };
    let want_avg = match &q["averaging_constant"] {
        Value::Null => None,
        v => Some(num(v, "averaging_constant")? as f32),
    };
    if averaging != want_avg {
        return Err(format!(
            "averaging_constant {averaging:?}, want {want_avg:?}"
        ));
    }
    let want_axis = match &q["ch_axis"] {
        Value::Null => None,
        v => Some(int(v, "ch_axis")? as usize),
    };
    if obs.ch_axis() != want_axis {
        return Err(format!("ch_axis {:?}, want {want_axis:?}", obs.ch_axis()));
    }
    let eps = num(&q["eps"], "eps")? as f32;
    if cfg.eps != eps {
        return Err(format!("eps {:e}, want {eps:e}", cfg.eps));
    }
    Ok(())
}
