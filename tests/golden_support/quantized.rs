//! quantized_linear / quantized_conv2d: PyTorch's int8 kernels (x86 engine) against ours.
//!
//! x is quantized as torch.quantize_per_tensor does (clamp to 0..=255), the weight per
//! tensor or per channel (symmetric qint8), and the output requantized with PyTorch's clamp
//! range 0..=255 (the reference's). x_q and w_q must match exactly; y_q and y within the
//! integer-code tolerance.
//!
//! Every input field is used or checked for consistency: `engine` (x86), `per_channel`
//! (the length of `w_scale`), `w_zero_point` (zeros, one per scale), `relu`, and for conv
//! `in_channels`, `out_channels`, `kernel_size` (the weight's shape), `stride`, `padding`,
//! `dilation`, `groups`. Compared: `expected.x_q`, `w_q` (exact), `y_q` (its shape too) and
//! `y` (in steps of y_scale).

use candle_core::Tensor;
use candle_qat::nn::ConvConfig;
use candle_qat::quantized::{
    dequantize, quantize, quantized_conv2d, quantized_linear, QuantizedWeight, Requant,
};
use serde_json::Value;

use crate::case::{boolean, candle, err, f32s, i32s, int, num, string, tensor, to_vec, Case, R};

fn shape(v: &Value, what: &str) -> R<Vec<usize>> {
    Ok(tensor(v, what)?.0)
}

/// PyTorch's quint8 range: its quantize ops and int8 kernels clamp to it.
const U8_MIN: i32 = 0;
const U8_MAX: i32 = 255;

/// The inputs shared by both kinds.
struct Common {
    x_q: Tensor,
    x_scale: f32,
    x_zp: i32,
    w_q: QuantizedWeight,
    bias: Vec<f32>,
    out: Requant,
    y_scale: f32,
    y_zp: i32,
}

fn common(j: &Value) -> R<Common> {
    let x = candle(&j["x"], "x")?;
    let x_scale = num(&j["x_scale"], "x_scale")? as f32;
    let x_zp = int(&j["x_zero_point"], "x_zero_point")? as i32;
    let x_q = quantize(&x, x_scale, x_zp, U8_MIN, U8_MAX).map_err(err)?;
    let want_xq = codes(&j["expected"]["x_q"], "x_q")?;
    check_exact_codes("x_q", &u8s(&x_q)?, &want_xq)?;

    if string(&j["engine"], "engine")? != "x86" {
        return Err(format!("engine {}: the cases are x86's", j["engine"]));
    }
    let w = candle(&j["weight"], "weight")?;
    let w_scale = f32s(&j["w_scale"], "w_scale")?;
    let out_channels = w.dims().first().copied().unwrap_or(0);
    let scales = if boolean(&j["per_channel"], "per_channel")? {
        out_channels
    } else {
        1
    };
    let w_zp = i32s(&j["w_zero_point"], "w_zero_point")?;
    if w_scale.len() != scales || w_zp.len() != scales {
        return Err(format!(
            "{} weight scales and {} zero points, want {scales}",
            w_scale.len(),
            w_zp.len()
        ));
    }
    if let Some(z) = w_zp.iter().find(|&&z| z != 0) {
        return Err(format!(
            "w_zero_point {z}: only symmetric int8 weights are supported"
        ));
    }
    let w_q = QuantizedWeight::quantize(&w, &w_scale, -128, 127).map_err(err)?;
    let want_wq = i32s(&j["expected"]["w_q"], "w_q")?;
    let got_wq: Vec<i32> = w_q.codes().iter().map(|&c| c as i32).collect();
    check_exact_codes("w_q", &got_wq, &want_wq)?;

    let bias = match &j["bias"] {
        Value::Null => vec![0.0; w_q.out_channels()],
        b => f32s(b, "bias")?,
    };
    let y_scale = num(&j["y_scale"], "y_scale")? as f32;
    let y_zp = int(&j["y_zero_point"], "y_zero_point")? as i32;
    let relu = boolean(&j["relu"], "relu")?;
    let out = Requant::new(y_scale, y_zp, U8_MIN, U8_MAX)
        .map_err(err)?
        .with_relu(relu);
    Ok(Common {
        x_q,
        x_scale,
        x_zp,
        w_q,
        bias,
        out,
        y_scale,
        y_zp,
    })
}

pub fn run_linear(case: &Case) -> R<()> {
    let j = &case.json;
    let c = common(j)?;
    let y_q =
        quantized_linear(&c.x_q, c.x_scale, c.x_zp, &c.w_q, Some(&c.bias), &c.out).map_err(err)?;
    check_outputs(j, &c, &y_q)
}

pub fn run_conv(case: &Case) -> R<()> {
    let j = &case.json;
    let c = common(j)?;
    let groups = int(&j["groups"], "groups")? as usize;
    let (cin, cout) = (
        int(&j["in_channels"], "in_channels")? as usize,
        int(&j["out_channels"], "out_channels")? as usize,
    );
    let k = square(&j["kernel_size"], "kernel_size")?;
    let want_shape = [cout, cin / groups.max(1), k, k];
    if shape(&j["weight"], "weight")? != want_shape {
        return Err(format!(
            "weight shape {:?}, want {want_shape:?} (in_channels {cin}, groups {groups})",
            shape(&j["weight"], "weight")?
        ));
    }
    let conv = ConvConfig {
        padding: square(&j["padding"], "padding")?,
        stride: square(&j["stride"], "stride")?,
        dilation: square(&j["dilation"], "dilation")?,
        groups,
    };
    let y_q = quantized_conv2d(
        &c.x_q,
        c.x_scale,
        c.x_zp,
        &c.w_q,
        Some(&c.bias),
        &conv,
        &c.out,
    )
    .map_err(err)?;
    check_outputs(j, &c, &y_q)
}

/// y_q (codes) and y (their dequantized values) with the integer-code tolerance.
fn check_outputs(j: &Value, c: &Common, y_q: &Tensor) -> R<()> {
    let (want_shape, _) = tensor(&j["expected"]["y_q"], "y_q")?;
    if y_q.dims() != want_shape.as_slice() {
        return Err(format!("y_q shape {:?}, want {want_shape:?}", y_q.dims()));
    }
    check_codes("y_q", &u8s(y_q)?, &codes(&j["expected"]["y_q"], "y_q")?)?;
    let y = to_vec(&dequantize(y_q, c.y_scale, c.y_zp).map_err(err)?)?;
    let want_y = f32s(&j["expected"]["y"], "y")?;
    // One code is one y_scale step; compare in steps.
    let as_steps = |v: &[f32]| -> Vec<i32> {
        v.iter()
            .map(|&v| (v / c.y_scale).round_ties_even() as i32)
            .collect()
    };
    check_codes("y (in steps of y_scale)", &as_steps(&y), &as_steps(&want_y))
}

/// A pair field (`[a, a]`): the value, as our square ConvConfig takes it.
fn square(v: &Value, what: &str) -> R<usize> {
    let pair = v.as_array().ok_or(format!("{what}: not a pair"))?;
    let vals = pair
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or(format!("{what}: not integers"))?;
    match vals.as_slice() {
        [a, b] if a == b => Ok(*a),
        _ => Err(format!(
            "{what} {vals:?}: only equal values along both dims are supported"
        )),
    }
}

fn codes(v: &Value, what: &str) -> R<Vec<i32>> {
    i32s(v, what)
}

fn u8s(t: &Tensor) -> R<Vec<i32>> {
    Ok(t.flatten_all()
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(err)?
        .into_iter()
        .map(i32::from)
        .collect())
}

fn check_exact_codes(what: &str, got: &[i32], want: &[i32]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} codes, want {}", got.len(), want.len()));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        return Err(format!(
            "{what}[{i}] = {}, want {} (must be exact)",
            got[i], want[i]
        ));
    }
    Ok(())
}

/// Integer codes: every one within 1, at most max(1, floor(1% of n)) differ.
fn check_codes(what: &str, got: &[i32], want: &[i32]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} codes, want {}", got.len(), want.len()));
    }
    let mut off = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > 1 {
            return Err(format!(
                "{what}[{i}] = {g}, want {w} (more than one code apart)"
            ));
        }
        if g != w {
            off += 1;
        }
    }
    let allowed = (got.len() / 100).max(1);
    if off > allowed {
        return Err(format!(
            "{what}: {off} of {} codes differ by one (at most {allowed} may)",
            got.len()
        ));
    }
    Ok(())
}
