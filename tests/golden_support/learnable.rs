//! learnable_fake_quant: LSQ forward and the gradients of x, scale and zero point.

use candle_core::Var;
use candle_qat::fake_quant::fake_quantize_learnable;
use candle_qat::QuantRange;

use crate::case::{
    candle, check_fq, check_grad, check_grad_with, err, f32s, int, num, to_vec, Case, R,
};

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let x = Var::from_tensor(&candle(&j["x"], "x")?).map_err(err)?;
    let scale = Var::from_tensor(&candle(&j["scale"], "scale")?).map_err(err)?;
    let zp = Var::from_tensor(&candle(&j["zero_point"], "zero_point")?).map_err(err)?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let axis = if j["per_channel"].as_bool().unwrap_or(false) {
        Some(int(&j["axis"], "axis")? as usize)
    } else {
        None
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
        Some(a) => (dims[a + 1..].iter().product::<usize>(), dims[a]),
        None => (x.elem_count(), 1),
    };
    check_fq("y", &to_vec(&y)?, &f32s(&e["y"], "y")?, |i| {
        s[(i / inner) % c]
    })?;
    check_grad("grad_x", &get(&x, "x")?, &f32s(&e["grad_x"], "grad_x")?)?;
    let gy_max = f32s(&j["grad_y"], "grad_y")?
        .iter()
        .fold(0f32, |m, v| m.max(v.abs())) as f64;
    let per_scale = x.elem_count() / c;
    let slack = 1e-6 * per_scale as f64 * gy_max * gf as f64 * (qmax - qmin) as f64;
    check_grad_with(
        "grad_scale",
        &get(&scale, "scale")?,
        &f32s(&e["grad_scale"], "grad_scale")?,
        1e-5,
        |_| slack,
    )?;
    check_grad_with(
        "grad_zero_point",
        &get(&zp, "zero_point")?,
        &f32s(&e["grad_zero_point"], "grad_zero_point")?,
        1e-5,
        |_| slack,
    )
}
