//! intx_qat_linear / intx_qat_embedding: a Linear (input and weight quantizers) or an
//! Embedding (table quantizer) prepared with a torchao intx scheme through `prepare_qat`, as
//! torchao's `quantize_(model, QATConfig(...))` prepares them: forward output and the
//! gradients of input, weight and bias (FORMAT.md, "Grouped, per-token and GGML block
//! kinds"). Tolerance: abs <= 1e-4 + 1e-4·|ref| for at least 99% of each tensor's
//! elements (an activation code that rounds the other way at an exact tie moves a row).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::nn::{Embedding, Linear};
use candle_qat::passes::prepare_qat;
use candle_qat::qconfig::QConfig;
use candle_qat::qconfig_mapping::QConfigMapping;
use serde_json::Value;

use crate::case::{candle, err, f32s, int, tensor, to_vec, Case, R};
use crate::intx::spec;

/// At least 99% of the elements within `1e-4 + 1e-4·|want|`, and none NaN.
fn check_mostly(what: &str, got: &[f32], want: &[f32]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let bad: Vec<usize> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (&g, &w))| !(((g - w).abs() as f64) <= 1e-4 + 1e-4 * (w.abs() as f64)))
        .map(|(i, _)| i)
        .collect();
    if bad.len() * 100 > got.len() || got.iter().any(|g| g.is_nan()) {
        let i = bad.first().copied().unwrap_or(0);
        return Err(format!(
            "{what}: {} of {} elements off (first at {i}: got {}, expected {})",
            bad.len(),
            got.len(),
            got[i],
            want[i]
        ));
    }
    Ok(())
}

/// Sets every variable of `vm` whose name ends with `.name` (or is `name`) to `value`.
fn set_var(vm: &VarMap, name: &str, value: &Tensor) -> R<()> {
    let data = vm.data().lock().map_err(err)?;
    let var = data
        .iter()
        .find(|(k, _)| k.as_str() == name)
        .map(|(_, v)| v.clone())
        .ok_or(format!("no variable `{name}`"))?;
    var.set(value).map_err(err)
}

fn qconfig(j: &Value) -> R<QConfig> {
    let input = match &j["activation"] {
        Value::Null => None,
        a => Some(spec(a)?),
    };
    Ok(QConfig::intx(input, spec(&j["weight"])?))
}

pub fn run_linear(case: &Case) -> R<()> {
    let j = &case.json;
    let (inf, outf) = (
        int(&j["in_features"], "in_features")? as usize,
        int(&j["out_features"], "out_features")? as usize,
    );
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let mut lin = Linear::new(inf, outf, true, vb).map_err(err)?;
    set_var(&vm, "weight", &candle(&j["w"], "w")?)?;
    set_var(&vm, "bias", &candle(&j["b"], "b")?)?;
    prepare_qat(&mut lin, &QConfigMapping::global(qconfig(j)?)).map_err(err)?;

    let x = Var::from_tensor(&candle(&j["x"], "x")?).map_err(err)?;
    let y = lin.forward(x.as_tensor()).map_err(err)?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let grads = (&y * &gy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let grad = |t: &Tensor, what: &str| -> R<Vec<f32>> {
        to_vec(grads.get(t).ok_or(format!("no gradient for {what}"))?)
    };
    check_mostly("y", &to_vec(&y)?, &f32s(&j["y"], "y")?)?;
    check_mostly(
        "grad_x",
        &grad(x.as_tensor(), "x")?,
        &f32s(&j["grad_x"], "grad_x")?,
    )?;
    check_mostly(
        "grad_w",
        &grad(lin.weight(), "w")?,
        &f32s(&j["grad_w"], "grad_w")?,
    )?;
    let b = lin.bias().ok_or("no bias")?;
    check_mostly("grad_b", &grad(b, "b")?, &f32s(&j["grad_b"], "grad_b")?)
}

pub fn run_embedding(case: &Case) -> R<()> {
    let j = &case.json;
    let (n, d) = (
        int(&j["num_embeddings"], "num_embeddings")? as usize,
        int(&j["embedding_dim"], "embedding_dim")? as usize,
    );
    if !matches!(j["activation"], Value::Null) {
        return Err("an Embedding case with an activation config".into());
    }
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let mut emb = Embedding::new(n, d, vb).map_err(err)?;
    set_var(&vm, "weight", &candle(&j["w"], "w")?)?;
    let qc = QConfig::intx_weight_only(spec(&j["weight"])?);
    prepare_qat(&mut emb, &QConfigMapping::global(qc)).map_err(err)?;

    let (shape, ids) = tensor(&j["ids"], "ids")?;
    let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
    let ids = Tensor::from_vec(ids, shape, &Device::Cpu).map_err(err)?;
    let y = emb.forward(&ids).map_err(err)?;
    let gy = candle(&j["grad_y"], "grad_y")?;
    let grads = (&y * &gy)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let gw = grads.get(emb.weight()).ok_or("no gradient for w")?;
    check_mostly("y", &to_vec(&y)?, &f32s(&j["y"], "y")?)?;
    check_mostly("grad_w", &to_vec(gw)?, &f32s(&j["grad_w"], "grad_w")?)
}
