//! learnable_fake_quant: LSQ forward and the gradients of x, scale and zero point.
//!
//! Inputs: `per_channel`, `axis`, `x`, `scale`, `zero_point`, `quant_min`, `quant_max`,
//! `grad_factor`, `grad_y`. Compared: `expected.y`, `grad_x`, `grad_scale`,
//! `grad_zero_point`, each with its length.

use candle_core::Var;
use candle_qat::fake_quant::fake_quantize_learnable;
use candle_qat::QuantRange;

use crate::case::{
    boolean, candle, check_fq, check_grad, check_grad_with, err, f32s, int, num, to_vec, Case, R,
};

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let x = Var::from_tensor(&candle(&j["x"], "x")?).map_err(err)?;
    let scale = Var::from_tensor(&candle(&j["scale"], "scale")?).map_err(err)?;
    let zp = Var::from_tensor(&candle(&j["zero_point"], "zero_point")?).map_err(err)?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let axis = if boolean(&j["per_channel"], "per_channel")? {
        Some(int(&j["axis"], "axis")? as usize)
    } else if j["axis"].is_null() {
        None
    } else {
        return Err("a per-tensor case with an axis".into());
    };
    let (qmin, qmax) = (
        int(&j["quant_min"], "quant_min")? as i32,
        int(&j["quant_max"], "quant_max")? as i32,
    );
    let range = QuantRange::explicit(qmin, qmax).map_err(err)?;
    let gf = num(&j["grad_factor"], "grad_factor")? as f32;
    let y = fake_quantize_learnable(&x, &scale, &zp, axis, &range, gf).map_err(err)?;
    let grads = (&y * &gy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let get = |v: &Var, what: &str| -> R<Vec<f32>> {
        to_vec(
            grads
                .get(v.as_tensor())
                .ok_or(format!("no gradient for {what}"))?,
        )
    };
    let e = &j["expected"];
    let s = f32s(&j["scale"], "scale")?;
    let dims = x.dims().to_vec();
    let (inner, c) = match axis {
        Some(a) if a < dims.len() => (dims[a + 1..].iter().product::<usize>(), dims[a]),
        Some(a) => return Err(format!("axis {a} of a {dims:?} tensor")),
        None => (x.elem_count(), 1),
    };
    if s.len() != c {
        return Err(format!("{} scales for {c} channels", s.len()));
    }
    check_fq("y", &to_vec(&y)?, &f32s(&e["y"], "y")?, |i| {
        s[(i / inner) % c]
    })?;
    check_grad("grad_x", &get(&x, "x")?, &f32s(&e["grad_x"], "grad_x")?)?;
    let gy_max = f32s(&j["grad_y"], "grad_y")?
        .iter()
        .fold(0f32, |m, v| m.max(v.abs())) as f64;
    let per_scale = (x.elem_count() / c) as f64;
    let base = 1e-6 * per_scale * gy_max * gf as f64;
    // FORMAT.md: grad_scale's slack scales with the range, grad_zero_point's (terms dy*s*gf)
    // with the largest scale; where the reference's |grad_zero_point| exceeds its slack, the
    // signs must agree.
    let scale_slack = base * (qmax - qmin) as f64;
    let s_max = s.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let zp_slack = base * s_max;
    check_grad_with(
        "grad_scale",
        &get(&scale, "scale")?,
        &f32s(&e["grad_scale"], "grad_scale")?,
        1e-5,
        |_| scale_slack,
    )?;
    let gz = get(&zp, "zero_point")?;
    let gz_ref = f32s(&e["grad_zero_point"], "grad_zero_point")?;
    check_grad_with("grad_zero_point", &gz, &gz_ref, 1e-5, |_| zp_slack)?;
    check_signs("grad_zero_point", &gz, &gz_ref, zp_slack)
}

/// Where |want| > slack, got has want's sign (0 has none).
pub fn check_signs(what: &str, got: &[f32], want: &[f32], slack: f64) -> R<()> {
    match got
        .iter()
        .zip(want)
        .position(|(&g, &w)| (w as f64).abs() > slack && !(g as f64 * w as f64 > 0.0))
    {
        Some(i) => Err(format!(
            "{what}[{i}] = {}, want {} (the sign must match beyond the slack {slack:e})",
            got[i], want[i]
        )),
        None => Ok(()),
    }
}
