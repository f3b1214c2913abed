//! conv_bn_qat: ConvBn2d / ConvBnReLU2d / ConvReLU2d fused for QAT, prepared with a preset,
//! run step by step in train/eval with the output fake-quant; values, gradients, BN running
//! statistics and qparams after each step.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::fuse::{Fusable, FuseGroup};
use candle_qat::model::{FuseMode, ModulePath, QuantModule};
use candle_qat::nn::{BatchNorm2d, BatchNormConfig, Conv2d, ConvConfig, ReLU};
use candle_qat::qconfig::QConfig;
use serde_json::Value;

use crate::case::{
    array, as_codes, boolean, candle, check_codes, check_exact, check_float, check_grad_with,
    check_rel, err, f32s, i32s, int, num, paired, same_len, string, to_vec, Case, R,
};
use crate::fake_quantize_module::backend;

/// A pair field `[a, a]`: the value, as our square ConvConfig takes it.
fn pair(v: &Value, what: &str) -> R<usize> {
    match array(v, what)?.as_slice() {
        [x, y] if x.as_u64().is_some() && x == y => Ok(x.as_u64().unwrap_or(0) as usize),
        _ => Err(format!("{what}: only square pairs are supported, got {v}")),
    }
}

/// Inputs: `module`, `preset`, `qconfig_version` (0), `conv`, `params`, `steps`. Compared
/// after each step: `y` (codes with the reference's act_scale), `grad_x`, `grad_weight`,
/// `grad_bias`, `grad_bn_weight`, `grad_bn_bias` (present exactly where ours are),
/// `running_mean`, `running_var` (present exactly where the module has a BN: a fused layer
/// that lost its BN fails), `weight_scale`, `weight_zero_point` (exact), `act_scale`,
/// `act_zero_point` (within 1).
pub fn run(case: &Case) -> R<()> {
    let j = &case.json;
    let dev = Device::Cpu;
    let c = &j["conv"];
    let p = &j["params"];
    let module = string(&j["module"], "module")?;
    let (has_bn, relu_fused) = match module {
        "ConvBn2d" => (true, false),
        "ConvBnReLU2d" => (true, true),
        "ConvReLU2d" => (false, true),
        m => return Err(format!("unknown module {m}")),
    };
    if int(&j["qconfig_version"], "qconfig_version")? != 0 {
        return Err("only qconfig_version 0 is supported".into());
    }
    let qc = QConfig::default_qat(backend(string(&j["preset"], "preset")?)?);
    // The parameters this module has: present exactly then (VarBuilder would create a
    // missing one silently).
    let has_bias = boolean(&c["bias"], "conv.bias")?;
    for (key, present) in [
        ("weight", true),
        ("bias", has_bias),
        ("bn_weight", has_bn),
        ("bn_bias", has_bn),
        ("running_mean", has_bn),
        ("running_var", has_bn),
        ("bn_eps", has_bn),
        ("bn_momentum", has_bn),
    ] {
        if p[key].is_null() == present {
            return Err(format!(
                "params.{key} {} for {module} (conv.bias {has_bias})",
                if present { "missing" } else { "present" }
            ));
        }
    }
    let varmap = VarMap::new();
    let mut vars: Vec<(&str, Var)> = Vec::new();
    {
        let mut data = varmap.data().lock().map_err(err)?;
        let mut put = |name: &'static str, key: &str| -> R<()> {
            if !p[key].is_null() {
                let v = Var::from_tensor(&candle(&p[key], key)?).map_err(err)?;
                data.insert(name.to_string(), v.clone());
                vars.push((key_static(key), v));
            }
            Ok(())
        };
        put("conv.weight", "weight")?;
        put("conv.bias", "bias")?;
        if has_bn {
            put("bn.weight", "bn_weight")?;
            put("bn.bias", "bn_bias")?;
            put("bn.running_mean", "running_mean")?;
            put("bn.running_var", "running_var")?;
        }
    }
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = ConvConfig {
        padding: pair(&c["padding"], "padding")?,
        stride: pair(&c["stride"], "stride")?,
        dilation: pair(&c["dilation"], "dilation")?,
        groups: int(&c["groups"], "groups")? as usize,
    };
    let (cin, cout) = (
        int(&c["in_channels"], "in")? as usize,
        int(&c["out_channels"], "out")? as usize,
    );
    let mut conv = Conv2d::new(
        cin,
        cout,
        pair(&c["kernel_size"], "kernel_size")?,
        cfg,
        has_bias,
        vb.pp("conv"),
    )
    .map_err(err)?;
    let mut relu = ReLU::new();
    let root = ModulePath::root();
    if has_bn {
        let bn_cfg = BatchNormConfig {
            eps: num(&p["bn_eps"], "bn_eps")?,
            momentum: num(&p["bn_momentum"], "bn_momentum")?,
        };
        let mut bn = BatchNorm2d::new(cout, bn_cfg, vb.pp("bn")).map_err(err)?;
        if relu_fused {
            let g = FuseGroup {
                path: &root,
                members: &["conv", "bn", "relu"],
                mode: FuseMode::Qat,
            };
            (&mut conv, &mut bn, &mut relu).fuse(&g).map_err(err)?;
        } else {
            let g = FuseGroup {
                path: &root,
                members: &["conv", "bn"],
                mode: FuseMode::Qat,
            };
            (&mut conv, &mut bn).fuse(&g).map_err(err)?;
        }
    } else {
        let g = FuseGroup {
            path: &root,
            members: &["conv", "relu"],
            mode: FuseMode::Qat,
        };
        (&mut conv, &mut relu).fuse(&g).map_err(err)?;
    }
    conv.prepare_qat(Some(&qc)).map_err(err)?;
    let var = |key: &str| vars.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
    let weight = var("weight").ok_or("no weight")?;
    let steps = paired(&j["steps"], "steps", &j["expected"], "expected")?;
    let w_host = f32s(&p["weight"], "weight")?;
    let per_out = w_host.len() / cout;
    for (k, (s, e)) in steps.into_iter().enumerate() {
        let train = boolean(&s["train"], "train")?;
        conv.set_training(train);
        // Tie bookkeeping (FORMAT.md): which weight of each channel is a rounding tie.
        let (rv_before, bn_w) = match (conv.bn_running_stats(), var("bn_weight")) {
            (Some((_, rv)), Some(bw)) => (to_vec(&rv)?, to_vec(bw.as_tensor())?),
            _ => (vec![1.0; cout], vec![1.0; cout]),
        };
        let eps = p["bn_eps"].as_f64().unwrap_or(0.0) as f32;
        let tie: Vec<usize> = (0..cout)
            .map(|ch| {
                let sl = &w_host[ch * per_out..(ch + 1) * per_out];
                ch * per_out + (0..per_out).fold(0, |b, i| if sl[i] > sl[b] { i } else { b })
            })
            .collect();
        let scaled = |ch: usize| w_host[tie[ch]] * bn_w[ch] / (rv_before[ch] + eps).sqrt();
        let per_tensor = j["preset"] == "qnnpack";
        let top = (0..cout).fold(0, |b, ch| if scaled(ch) > scaled(b) { ch } else { b });
        let tied: Vec<usize> = (0..cout)
            .filter(|&ch| !per_tensor || ch == top)
            .map(|ch| tie[ch])
            .collect();

        let x = Var::from_tensor(&candle(&s["x"], "x")?).map_err(err)?;
        let gy = candle(&s["grad_y"], "grad_y")?;
        let y = candle_core::Module::forward(&conv, x.as_tensor()).map_err(err)?;
        let grads = (&y * &gy)
            .and_then(|l| l.sum_all())
            .and_then(|l| l.backward())
            .map_err(err)?;
        let grad = |t: &Tensor| grads.get(t).map(to_vec).transpose();
        let fqs = conv.fake_quants();
        let find = |role: &str| fqs.iter().find(|(r, _)| r == role).map(|(_, f)| f.clone());
        let (wfq, afq) = (
            find("weight").ok_or("no weight fq")?,
            find("activation").ok_or("no act fq")?,
        );
        let act_scale = f32s(&e["act_scale"], "act_scale")?;
        check_rel(
            &format!("step {k} act_scale"),
            &afq.scale(),
            &act_scale,
            1e-5,
        )?;
        let azp = i32s(&e["act_zero_point"], "act_zero_point")?;
        let own_azp = afq.zero_point();
        same_len(&format!("step {k} act_zero_point"), &own_azp, &azp)?;
        if own_azp.iter().zip(&azp).any(|(a, b)| (a - b).abs() > 1) {
            return Err(format!(
                "step {k} act_zero_point {own_azp:?}, want {azp:?} (within 1)"
            ));
        }
        check_rel(
            &format!("step {k} weight_scale"),
            &wfq.scale(),
            &f32s(&e["weight_scale"], "weight_scale")?,
            1e-5,
        )?;
        check_exact(
            &format!("step {k} weight_zero_point"),
            &wfq.zero_point(),
            &i32s(&e["weight_zero_point"], "weight_zero_point")?,
        )?;
        check_codes(
            &format!("step {k} y"),
            &as_codes("y", &to_vec(&y)?, act_scale[0])?,
            &as_codes("expected y", &f32s(&e["y"], "y")?, act_scale[0])?,
        )?;
        let g = |name: &str, got: Option<Vec<f32>>, extra: &dyn Fn(usize) -> f64| -> R<()> {
            match (got, e[name].is_null()) {
                (None, true) => Ok(()),
                (Some(got), false) => check_grad_with(
                    &format!("step {k} {name}"),
                    &got,
                    &f32s(&e[name], name)?,
                    1e-4,
                    extra,
                ),
                (None, false) => Err(format!("step {k}: no {name}")),
                (Some(_), true) => Err(format!("step {k}: {name} should be absent")),
            }
        };
        let gw = grad(weight.as_tensor())?;
        let gw_ref = f32s(&e["grad_weight"], "grad_weight")?;
        let exempt = |i: usize| {
            if tied.contains(&i) {
                f64::INFINITY
            } else {
                0.0
            }
        };
        g("grad_x", grad(x.as_tensor())?, &|_| 0.0)?;
        g("grad_weight", gw.clone(), &exempt)?;
        g(
            "grad_bias",
            var("bias")
                .map(|v| grad(v.as_tensor()))
                .transpose()?
                .flatten(),
            &|_| 0.0,
        )?;
        let gw_own = gw.unwrap_or_default();
        let bn_slack = |ch: usize| -> f64 {
            let t = tie[ch];
            if !tied.contains(&t) {
                return 0.0;
            }
            let m = gw_ref[t]
                .abs()
                .max(gw_own.get(t).copied().unwrap_or(0.0).abs()) as f64;
            m * w_host[t].abs() as f64 / bn_w[ch].abs() as f64
        };
        g(
            "grad_bn_weight",
            var("bn_weight")
                .map(|v| grad(v.as_tensor()))
                .transpose()?
                .flatten(),
            &bn_slack,
        )?;
        g(
            "grad_bn_bias",
            var("bn_bias")
                .map(|v| grad(v.as_tensor()))
                .transpose()?
                .flatten(),
            &|_| 0.0,
        )?;
        let stats = conv.bn_running_stats();
        match (
            has_bn,
            stats,
            e["running_mean"].is_null(),
            e["running_var"].is_null(),
        ) {
            (false, None, true, true) => {}
            (true, Some((rm, rv)), false, false) => {
                check_float(
                    &format!("step {k} running_mean"),
                    &to_vec(&rm)?,
                    &f32s(&e["running_mean"], "running_mean")?,
                )?;
                check_float(
                    &format!("step {k} running_var"),
                    &to_vec(&rv)?,
                    &f32s(&e["running_var"], "running_var")?,
                )?;
            }
            (_, stats, _, _) => {
                return Err(format!(
                    "step {k} running_mean/running_var: {module} {} a BN, ours has {}, the \
                     reference lists {} / {}",
                    if has_bn { "has" } else { "has no" },
                    if stats.is_some() { "one" } else { "none" },
                    if e["running_mean"].is_null() {
                        "none"
                    } else {
                        "a running_mean"
                    },
                    if e["running_var"].is_null() {
                        "none"
                    } else {
                        "a running_var"
                    },
                ))
            }
        }
    }
    Ok(())
}

fn key_static(k: &str) -> &'static str {
    match k {
        "weight" => "weight",
        "bias" => "bias",
        "bn_weight" => "bn_weight",
        "bn_bias" => "bn_bias",
        "running_mean" => "running_mean",
        _ => "running_var",
    }
}
