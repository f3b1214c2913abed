//! fake_quant_per_tensor / fake_quant_per_channel: forward values and STE gradients.
//!
//! Fields: `x`, `scale`, `zero_point`, `quant_min`, `quant_max`, `grad_y` (and `axis` per
//! channel) are the inputs; `expected.y`, `expected.grad_x` are compared, lengths included.

use candle_core::{Tensor, Var};
use candle_qat::fake_quant::{fake_quantize_per_channel, fake_quantize_per_tensor};

use crate::case::{candle, check_fq, check_grad, err, f32s, i32s, int, num, to_vec, Case, R};

/// Runs `f` on `x` as a variable and returns (y, dL/dx) for L = sum(y * grad_y).
pub fn value_and_grad(
    x: &Tensor,
    grad_y: &Tensor,
    f: impl Fn(&Tensor) -> candle_qat::Result<Tensor>,
) -> R<(Vec<f32>, Vec<f32>)> {
    let v = Var::from_tensor(x).map_err(err)?;
    let y = f(v.as_tensor()).map_err(err)?;
    let grads = (&y * grad_y)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let gx = grads.get(v.as_tensor()).ok_or("no gradient for x")?;
    Ok((to_vec(&y)?, to_vec(gx)?))
}

pub fn run_per_tensor(case: &Case) -> R<()> {
    let j = &case.json;
    let x = candle(&j["x"], "x")?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let scale = num(&j["scale"], "scale")? as f32;
    let zp = int(&j["zero_point"], "zero_point")? as i32;
    let (qmin, qmax) = (
        int(&j["quant_min"], "quant_min")? as i32,
        int(&j["quant_max"], "quant_max")? as i32,
    );
    let (y, gx) = value_and_grad(&x, &gy, |x| {
        fake_quantize_per_tensor(x, scale, zp, qmin, qmax)
    })?;
    check_fq("y", &y, &f32s(&j["expected"]["y"], "y")?, |_| scale)?;
    check_grad("grad_x", &gx, &f32s(&j["expected"]["grad_x"], "grad_x")?)
}

pub fn run_per_channel(case: &Case) -> R<()> {
    let j = &case.json;
    let x = candle(&j["x"], "x")?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let scale = f32s(&j["scale"], "scale")?;
    let zp = i32s(&j["zero_point"], "zero_point")?;
    let axis = int(&j["axis"], "axis")? as usize;
    let (qmin, qmax) = (
        int(&j["quant_min"], "quant_min")? as i32,
        int(&j["quant_max"], "quant_max")? as i32,
    );
    let (y, gx) = value_and_grad(&x, &gy, |x| {
        fake_quantize_per_channel(x, &scale, &zp, axis, qmin, qmax)
    })?;
    let dims = x.dims().to_vec();
    let channels = *dims
        .get(axis)
        .ok_or(format!("axis {axis} of a {dims:?} tensor"))?;
    if scale.len() != channels || zp.len() != channels {
        return Err(format!(
            "{} scales and {} zero points for {channels} channels",
            scale.len(),
            zp.len()
        ));
    }
    let inner: usize = dims[axis + 1..].iter().product();
    let step = |i: usize| scale[(i / inner) % channels];
    check_fq("y", &y, &f32s(&j["expected"]["y"], "y")?, step)?;
    check_grad("grad_x", &gx, &f32s(&j["expected"]["grad_x"], "grad_x")?)
}
