//! fuse_conv_bn_eval / fuse_linear_bn_eval: BN folded into the weights.

use candle_qat::fuse::{fold_conv_bn_weights, fold_linear_bn_weights};

use crate::case::{candle, check_float, err, f32s, num, to_vec, Case, R};

/// Inputs: `conv_weight` / `linear_weight`, `bias`, `bn_weight`, `bn_bias`, `running_mean`,
/// `running_var`, `eps`. Compared: `expected.weight`, `expected.bias` (float outputs, lengths
/// included). Not compared: `groups` (FORMAT.md: informational; folding is per output
/// channel whatever the groups).
pub fn run(case: &Case, conv: bool) -> R<()> {
    let j = &case.json;
    let w = candle(
        &j[if conv { "conv_weight" } else { "linear_weight" }],
        "weight",
    )?;
    let b = if j["bias"].is_null() {
        None
    } else {
        Some(candle(&j["bias"], "bias")?)
    };
    let rm = candle(&j["running_mean"], "running_mean")?;
    let rv = candle(&j["running_var"], "running_var")?;
    let bw = candle(&j["bn_weight"], "bn_weight")?;
    let bb = candle(&j["bn_bias"], "bn_bias")?;
    let eps = num(&j["eps"], "eps")?;
    let f = if conv {
        fold_conv_bn_weights
    } else {
        fold_linear_bn_weights
    };
    let (fw, fb) = f(&w, b.as_ref(), &rm, &rv, eps, &bw, &bb).map_err(err)?;
    check_float(
        "weight",
        &to_vec(&fw)?,
        &f32s(&j["expected"]["weight"], "weight")?,
    )?;
    check_float(
        "bias",
        &to_vec(&fb)?,
        &f32s(&j["expected"]["bias"], "bias")?,
    )?;
    Ok(())
}
