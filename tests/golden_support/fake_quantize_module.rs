//! fake_quantize_module: a FakeQuantize built from a preset, fed inputs with toggles.

use candle_qat::qconfig::{Backend, QConfig};

use crate::case::{candle, check_exact, check_fq, check_rel, err, f32s, i32s, to_vec, Case, R};

pub fn backend(name: &str) -> R<Backend> {
    match name {
        "fbgemm" => Ok(Backend::Fbgemm),
        "x86" => Ok(Backend::X86),
        "qnnpack" => Ok(Backend::Qnnpack),
        b => Err(format!("unknown preset {b}")),
    }
}

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let q = &j["qconfig"];
    if q["version"].as_i64() != Some(0) {
        return Err(format!("qconfig version {} is not supported", q["version"]));
    }
    let qc = QConfig::default_qat(backend(q["preset"].as_str().unwrap_or(""))?);
    let spec = match q["role"].as_str() {
        Some("weight") => qc.weight,
        Some("activation") => qc.activation,
        r => return Err(format!("unknown role {r:?}")),
    };
    let mut fq = spec.build().map_err(err)?;
    let r = fq.quant_range();
    let want = [
        q["quant_min"].as_i64().unwrap_or(0) as i32,
        q["quant_max"].as_i64().unwrap_or(0) as i32,
    ];
    check_exact("quant range", &[r.quant_min(), r.quant_max()], &want)?;
    let inputs = j["inputs"].as_array().ok_or("no inputs")?;
    let expected = j["expected"].as_array().ok_or("no expected")?;
    for (k, (x, e)) in inputs.iter().zip(expected).enumerate() {
        if let Some(t) = j["toggles"].as_array().and_then(|t| t.get(k)) {
            match t["observer"].as_bool() {
                Some(true) => fq.enable_observer(),
                Some(false) => fq.disable_observer(),
                None => return Err("bad toggle".into()),
            }
            match t["fake_quant"].as_bool() {
                Some(true) => fq.enable_fake_quant(),
                Some(false) => fq.disable_fake_quant(),
                None => return Err("bad toggle".into()),
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
        let inner = if want_scale.len() > 1 {
            x.elem_count() / x.dims()[0]
        } else {
            x.elem_count()
        };
        check_fq(&format!("step {k} y"), &y, &f32s(&e["y"], "y")?, |i| {
            want_scale[(i / inner) % want_scale.len()]
        })?;
        match (fq.observer().min_max(), e["min_val"].is_null()) {
            (None, true) => {}
            (Some((mn, mx)), false) => {
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
            (got, _) => {
                return Err(format!(
                    "step {k}: observer state {got:?}, want {}",
                    e["min_val"]
                ))
            }
        }
    }
    Ok(())
}
