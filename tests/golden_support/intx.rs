//! intx_fake_quant: torchao's `IntxFakeQuantizer` — output, straight-through gradient, and
//! the scale / zero point it keeps (FORMAT.md, "Grouped, per-token and GGML block kinds").

use candle_core::{Tensor, Var};
use candle_qat::fake_quant::{IntxFakeQuantizer, IntxSpec};
use serde_json::Value;

use crate::case::{candle, check_exact, check_fq, check_grad, check_rel, err, f32s, i32s};
use crate::case::{tensor, to_vec, Case, R};

/// The config object of FORMAT.md as an [`IntxSpec`].
pub fn spec(c: &Value) -> R<IntxSpec> {
    let dtype = c["dtype"].as_str().ok_or("config.dtype: not a string")?;
    let bits: u8 = dtype
        .strip_prefix("int")
        .and_then(|b| b.parse().ok())
        .ok_or(format!("config.dtype `{dtype}`: not int1..int8"))?;
    if c["zero_point_domain"].as_str() != Some("int") {
        return Err(format!(
            "config.zero_point_domain {}: only `int` is supported",
            c["zero_point_domain"]
        ));
    }
    let b = IntxSpec::builder(bits);
    let b = match c["granularity"].as_str() {
        Some("per_token") => b.per_token(),
        Some("per_axis") | Some("per_channel") => b.per_axis(),
        Some("per_group") => b.per_group(
            c["group_size"]
                .as_u64()
                .ok_or("config.group_size: not an integer")? as usize,
        ),
        g => return Err(format!("config.granularity {g:?}: unknown")),
    };
    let b = if c["is_symmetric"].as_bool().ok_or("config.is_symmetric")? {
        b.symmetric()
    } else {
        b.asymmetric()
    };
    b.eps(c["eps"].as_f64().map(|e| e as f32))
        .dynamic(c["is_dynamic"].as_bool().unwrap_or(true))
        .build()
        .map_err(err)
}

pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let x = candle(&j["x"], "x")?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let mut fq = IntxFakeQuantizer::new(spec(&j["config"])?);
    let v = Var::from_tensor(&x).map_err(err)?;
    let y = fq.forward(v.as_tensor()).map_err(err)?;
    let grads = (&y * &gy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let gx = grads.get(v.as_tensor()).ok_or("no gradient for x")?;

    let scale_t: Tensor = fq.scale().ok_or("no scale after forward")?;
    let zp_t: Tensor = fq.zero_point().ok_or("no zero point after forward")?;
    let (want_shape, _) = tensor(&j["scale"], "scale")?;
    check_exact("scale shape", scale_t.dims(), &want_shape)?;
    check_exact("zero_point shape", zp_t.dims(), &want_shape)?;
    let scale = to_vec(&scale_t)?;
    check_rel("scale", &scale, &f32s(&j["scale"], "scale")?, 1e-6)?;
    let zp: Vec<i32> = to_vec(&zp_t)?.iter().map(|&z| z as i32).collect();
    check_exact("zero_point", &zp, &i32s(&j["zero_point"], "zero_point")?)?;

    let per = x.elem_count() / scale.len().max(1);
    check_fq("y", &to_vec(&y)?, &f32s(&j["y"], "y")?, |i| scale[i / per])?;
    check_grad("grad_x", &to_vec(gx)?, &f32s(&j["grad_x"], "grad_x")?)
}
