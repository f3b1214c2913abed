//! ConvTranspose1d / ConvTranspose2d against PyTorch 2.15 (fixtures: tests/data/
//! eager_conv_transpose, written by tools/gen_eager_conv_transpose.py) on QuantStub ->
//! ConvTranspose -> DeQuantStub, over stride 2 and 3, padding, output_padding, dilation and
//! groups > 1, with the qnnpack and x86 presets:
//!
//! - `eager`: PyTorch's own eager pipeline, which keeps the ConvTranspose float during QAT (no
//!   QAT module exists; only its output is fake-quantized) and quantizes the weight at
//!   convert with a fresh per-tensor observer. Ours reproduces it with the weight fake-quant's
//!   fake quantization switched off (its observer still sees the weight): QAT values,
//!   gradients and qparams, then the converted int8 codes.
//! - `weight_fq`: our default, the weight fake-quantized during QAT (per tensor for qnnpack,
//!   per channel along the weight's axis 1 for x86, as PT2E places it), against PyTorch's
//!   fake-quant modules around `F.conv_transpose*d`; the converted model equals our
//!   fake-quant model code for code, and for per-tensor weights PyTorch's
//!   `nnq.ConvTranspose*d` on the same qparams.
//! - `fusion`: (ConvTranspose, BatchNorm) folded in eval against PyTorch's `fuse_modules`
//!   where it works (groups 1) and against the unfused float layers always (PyTorch's fold
//!   fails for groups > 1, pytorch#180995); QAT fusion is refused, as PyTorch's.

// Tolerance checks are written `!(diff <= tol)` so that a NaN fails them.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

#[path = "golden_support/case.rs"]
#[allow(dead_code)]
mod case;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::model::{QuantModule, Quantizable};
use candle_qat::nn::{
    BatchNorm1d, BatchNorm2d, BatchNormConfig, ConvTranspose1d, ConvTranspose2d,
    ConvTransposeConfig, DeQuantStub, QuantStub,
};
use candle_qat::passes::{
    convert, disable_observer, eval, fuse_modules, fuse_modules_qat, prepare_qat, train,
};
use candle_qat::qconfig::{Backend, QConfig};
use candle_qat::qconfig_mapping::QConfigMapping;
use candle_qat::Quantizable;

use case::{
    as_codes, candle, check_codes, check_exact, check_float, check_fq, check_grad, check_rel, err,
    f32s, int, num, string, to_vec, Case, R,
};

/// What the tests need of a net, for both ranks.
trait Net: Quantizable + Module + Sized {
    fn build(c: &Case, vb: VarBuilder) -> R<Self>;
    fn conv(&mut self) -> &mut dyn QuantModule;
    fn conv_ref(&self) -> &dyn QuantModule;
    fn stub(&self) -> &dyn QuantModule;
}

/// The layer's settings from the case.
fn settings(c: &Case) -> R<(usize, usize, usize, ConvTransposeConfig)> {
    let a = &c.json["args"];
    let u = |k: &str| -> R<usize> { Ok(int(&a[k], k)? as usize) };
    Ok((
        u("in_channels")?,
        u("out_channels")?,
        u("kernel_size")?,
        ConvTransposeConfig {
            padding: u("padding")?,
            output_padding: u("output_padding")?,
            stride: u("stride")?,
            dilation: u("dilation")?,
            groups: u("groups")?,
        },
    ))
}

macro_rules! nets {
    ($net:ident, $conv:ty) => {
        #[derive(Quantizable)]
        struct $net {
            quant: QuantStub,
            conv: $conv,
            dequant: DeQuantStub,
        }
        impl Module for $net {
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                self.dequant
                    .forward(&self.conv.forward(&self.quant.forward(x)?)?)
            }
        }
        impl Net for $net {
            fn build(c: &Case, vb: VarBuilder) -> R<Self> {
                let (i, o, k, cfg) = settings(c)?;
                Ok($net {
                    quant: QuantStub::new(),
                    conv: <$conv>::new(i, o, k, cfg, true, vb.pp("conv")).map_err(err)?,
                    dequant: DeQuantStub::new(),
                })
            }
            fn conv(&mut self) -> &mut dyn QuantModule {
                &mut self.conv
            }
            fn conv_ref(&self) -> &dyn QuantModule {
                &self.conv
            }
            fn stub(&self) -> &dyn QuantModule {
                &self.quant
            }
        }
    };
}

nets!(Net1d, ConvTranspose1d);
nets!(Net2d, ConvTranspose2d);

// The fusion nets are written out: the derive's generated code takes its spans from the
// field types and the fuse list, and an `ident` fragment of a `macro_rules!` gives those
// the macro's hygiene (a `ty` fragment, as above, does not).
#[derive(Quantizable)]
#[qat(fuse(conv, bn))]
struct Fused1d {
    conv: ConvTranspose1d,
    bn: BatchNorm1d,
}

#[derive(Quantizable)]
#[qat(fuse(conv, bn))]
struct Fused2d {
    conv: ConvTranspose2d,
    bn: BatchNorm2d,
}

macro_rules! fused_impl {
    ($fused:ident, $conv:ident, $bn:ident) => {
        impl Module for $fused {
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                self.bn.forward(&self.conv.forward(x)?)
            }
        }
        impl $fused {
            fn build(c: &Case, vb: VarBuilder) -> R<Self> {
                let (i, o, k, cfg) = settings(c)?;
                let eps = num(&c.json["fusion"]["bn_eps"], "bn_eps")?;
                let bn_cfg = BatchNormConfig {
                    eps,
                    ..Default::default()
                };
                Ok($fused {
                    conv: $conv::new(i, o, k, cfg, true, vb.pp("conv")).map_err(err)?,
                    bn: $bn::new(o, bn_cfg, vb.pp("bn")).map_err(err)?,
                })
            }
            fn folded(&self) -> (Tensor, Option<Tensor>) {
                (self.conv.weight().clone(), self.conv.bias().cloned())
            }
        }
    };
}

fused_impl!(Fused1d, ConvTranspose1d, BatchNorm1d);
fused_impl!(Fused2d, ConvTranspose2d, BatchNorm2d);

/// Sets every variable of `vm` named in `values` (prefix-qualified) to the case's tensor.
fn load(vm: &VarMap, values: &[(&str, &serde_json::Value)]) -> R<()> {
    let data = vm.data().lock().map_err(err)?;
    for (name, v) in values {
        let var = data.get(*name).ok_or(format!("no variable {name}"))?;
        var.set(&candle(v, name)?).map_err(err)?;
    }
    Ok(())
}

fn var(vm: &VarMap, name: &str) -> R<Var> {
    let data = vm.data().lock().map_err(err)?;
    data.get(name).cloned().ok_or(format!("no variable {name}"))
}

/// An output fake-quant's scale, zero point, quant_min and quant_max.
type ActFq = (f32, i32, i32, i32);

/// The weight's and output's fake-quants of the layer: (weight scales, output).
fn fqs(m: &dyn QuantModule) -> R<(Vec<f32>, ActFq)> {
    let mut w = None;
    let mut o = None;
    for (name, f) in m.fake_quants() {
        let r = f.quant_range();
        if name == "weight" {
            w = Some(f.scale());
        } else {
            o = Some((
                f.scale()[0],
                f.zero_point()[0],
                r.quant_min(),
                r.quant_max(),
            ));
        }
    }
    Ok((
        w.ok_or("no weight fake-quant")?,
        o.ok_or("no output fake-quant")?,
    ))
}

fn check_act(what: &str, got: ActFq, want: &serde_json::Value) -> R<()> {
    check_rel(
        &format!("{what} scale"),
        &[got.0],
        &[num(&want["scale"], "scale")? as f32],
        1e-6,
    )?;
    check_exact(
        &format!("{what} zero point / range"),
        &[got.1 as i64, got.2 as i64, got.3 as i64],
        &[
            int(&want["zero_point"], "zp")?,
            int(&want["quant_min"], "qmin")?,
            int(&want["quant_max"], "qmax")?,
        ],
    )
}

fn backend(preset: &str) -> R<Backend> {
    match preset {
        "qnnpack" => Ok(Backend::Qnnpack),
        "x86" => Ok(Backend::X86),
        p => Err(format!("unknown preset {p}")),
    }
}

/// Output codes of a converted model's dequantized output.
fn codes(what: &str, y: &Tensor, scale: f32, zp: i32) -> R<Vec<i64>> {
    Ok(as_codes(what, &to_vec(y)?, scale)?
        .into_iter()
        .map(|c| c + zp as i64)
        .collect())
}

/// Prepared for `qc`, calibrated in train mode, then a forward and backward on `x`. Returns
/// the model, its var map, x, y and the gradients of x and the weight.
fn qat<M: Net>(c: &Case, qc: QConfig, eager: bool) -> R<(M, VarMap, Var, Tensor, Tensor, Tensor)> {
    let j = &c.json;
    let vm = VarMap::new();
    let mut m = M::build(c, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    load(
        &vm,
        &[("conv.weight", &j["weight"]), ("conv.bias", &j["bias"])],
    )?;
    train(&mut m).map_err(err)?;
    prepare_qat(&mut m, &QConfigMapping::global(qc)).map_err(err)?;
    if eager {
        // PyTorch's eager QAT keeps the ConvTranspose float: no weight fake quantization (the
        // observer stays on and sees the weight, as convert's fresh observer will).
        m.conv().for_each_fake_quant(&mut |name, f| {
            if name == "weight" {
                f.disable_fake_quant()
            }
        });
    }
    for b in j["calib"].as_array().ok_or("no calib")? {
        m.forward(&candle(b, "calib")?).map_err(err)?;
    }
    let x = Var::from_tensor(&candle(&j["x"], "x")?).map_err(err)?;
    let y = m.forward(x.as_tensor()).map_err(err)?;
    let grads = (&y * &candle(&j["grad_y"], "grad_y")?)
        .and_then(|p| p.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let gx = grads.get(x.as_tensor()).ok_or("no grad for x")?.clone();
    let w = var(&vm, "conv.weight")?;
    let gw = grads
        .get(w.as_tensor())
        .ok_or("no grad for the weight")?
        .clone();
    Ok((m, vm, x, y, gx, gw))
}

/// PyTorch's eager pipeline: values, gradients, qparams and the converted int8 codes.
fn eager<M: Net>(c: &Case) -> R<()> {
    let e = &c.json["eager"];
    let preset = backend(string(&c.json["preset"], "preset")?)?;
    let mut qc = QConfig::default_qat(preset);
    // PyTorch converts transposed convs with per-tensor weights only.
    qc.weight = QConfig::default_qat(Backend::Qnnpack).weight;
    let (mut m, _vm, x, y, gx, gw) = qat::<M>(c, qc, true)?;
    let (_, act) = fqs(m.conv_ref())?;
    check_act("output fake-quant", act, &e["act"])?;
    let (in_scale, in_zp) = stub_qparams(m.stub())?;
    check_rel(
        "input scale",
        &[in_scale],
        &[num(&e["input"]["scale"], "scale")? as f32],
        1e-6,
    )?;
    check_exact(
        "input zero point",
        &[in_zp as i64],
        &[int(&e["input"]["zero_point"], "zp")?],
    )?;
    check_fq("qat_y", &to_vec(&y)?, &f32s(&e["qat_y"], "qat_y")?, |_| {
        act.0
    })?;
    check_grad("grad_x", &to_vec(&gx)?, &f32s(&e["grad_x"], "grad_x")?)?;
    check_grad("grad_w", &to_vec(&gw)?, &f32s(&e["grad_w"], "grad_w")?)?;

    eval(&mut m).map_err(err)?;
    disable_observer(&mut m).map_err(err)?;
    convert(&mut m).map_err(err)?;
    let state = m.conv_ref().int8_state().ok_or("not converted")?;
    check_rel(
        "converted weight scale",
        &state.weight_scales,
        &[num(&e["weight_scale"], "weight_scale")? as f32],
        1e-6,
    )?;
    let out = state.output.ok_or("no output qparams")?;
    let y8 = m.forward(x.as_tensor()).map_err(err)?;
    let ours = codes("int8", &y8, out.scale, out.zero_point)?;
    let list =
        |k: &str| -> R<Vec<i64>> { Ok(f32s(&e[k], k)?.into_iter().map(|v| v as i64).collect()) };
    // PyTorch's codes under the clamped rule (its quantize ops clamp to 0..=255 only; ours,
    // the input's and the output's, to the ranges the fake-quants trained with: x86 0..=127).
    if int(&e["int8_ref_max_diff"], "int8_ref_max_diff")? <= 1 {
        check_exact(
            "int8 codes vs PyTorch's eager convert (clamped rule)",
            &ours,
            &list("int8_codes_clamped")?,
        )
    } else {
        // PyTorch's int8 module is off its own arithmetic (x86 ConvTranspose1d): ours must
        // be the arithmetic, PyTorch's float evaluation of it on the same codes, within the
        // integer-code tolerance (f32 ties there), and PyTorch's must really be off.
        let reference = list("int8_ref_codes_clamped")?;
        check_codes("int8 codes vs the layer's arithmetic", &ours, &reference)?;
        if check_codes("PyTorch", &list("int8_codes_clamped")?, &reference).is_ok() {
            return Err(
                "PyTorch's int8 codes now agree with the arithmetic: compare exactly".into(),
            );
        }
        Ok(())
    }
}

/// QuantStub's (scale, zero point).
fn stub_qparams(m: &dyn QuantModule) -> R<(f32, i32)> {
    let fqs = m.fake_quants();
    let (_, f) = fqs.first().ok_or("QuantStub has no fake-quant")?;
    Ok((f.scale()[0], f.zero_point()[0]))
}

/// Our default (weight fake-quantized in QAT): against PyTorch's fake-quant modules; the
/// converted model equals the fake-quant model code for code, and PyTorch's int8 module
/// where PyTorch converts (per-tensor weights).
fn weight_fq<M: Net>(c: &Case) -> R<()> {
    let e = &c.json["weight_fq"];
    let preset = backend(string(&c.json["preset"], "preset")?)?;
    let (mut m, _vm, x, y, gx, gw) = qat::<M>(c, QConfig::default_qat(preset), false)?;
    let (w_scales, act) = fqs(m.conv_ref())?;
    check_act("output fake-quant", act, &e["act"])?;
    let want_w: Vec<f32> = e["w_scales"]
        .as_array()
        .ok_or("no w_scales")?
        .iter()
        .map(|v| v.as_f64().map(|v| v as f32).ok_or("bad scale"))
        .collect::<Result<_, _>>()?;
    check_rel("weight scales", &w_scales, &want_w, 1e-6)?;
    check_fq("qat_y", &to_vec(&y)?, &f32s(&e["qat_y"], "qat_y")?, |_| {
        act.0
    })?;
    check_grad("grad_x", &to_vec(&gx)?, &f32s(&e["grad_x"], "grad_x")?)?;
    check_grad("grad_w", &to_vec(&gw)?, &f32s(&e["grad_w"], "grad_w")?)?;

    eval(&mut m).map_err(err)?;
    disable_observer(&mut m).map_err(err)?;
    let y_fq = m.forward(x.as_tensor()).map_err(err)?;
    convert(&mut m).map_err(err)?;
    let out = m
        .conv_ref()
        .int8_state()
        .and_then(|s| s.output)
        .ok_or("not converted")?;
    let y8 = m.forward(x.as_tensor()).map_err(err)?;
    let ours = codes("int8", &y8, out.scale, out.zero_point)?;
    check_exact(
        "int8 codes vs our fake-quant codes",
        &ours,
        &codes("fake-quant", &y_fq, out.scale, out.zero_point)?,
    )?;
    if !e["int8_codes"].is_null() {
        let want: Vec<i64> = f32s(&e["int8_codes"], "int8_codes")?
            .into_iter()
            .map(|v| v as i64)
            .collect();
        check_exact("int8 codes vs PyTorch's nnq module", &ours, &want)?;
    }
    Ok(())
}

macro_rules! fusion {
    ($name:ident, $fused:ident) => {
        fn $name(c: &Case) -> R<()> {
            let f = &c.json["fusion"];
            let dev = Device::Cpu;
            let build = || -> R<(VarMap, $fused)> {
                let vm = VarMap::new();
                let m = $fused::build(c, VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
                load(
                    &vm,
                    &[
                        ("conv.weight", &c.json["weight"]),
                        ("conv.bias", &c.json["bias"]),
                        ("bn.weight", &f["bn_weight"]),
                        ("bn.bias", &f["bn_bias"]),
                        ("bn.running_mean", &f["bn_running_mean"]),
                        ("bn.running_var", &f["bn_running_var"]),
                    ],
                )?;
                Ok((vm, m))
            };
            // QAT fusion is refused (PyTorch: "not yet supported in QAT").
            let (_vm, mut q) = build()?;
            let e = fuse_modules_qat(&mut q)
                .err()
                .ok_or("QAT fusion was accepted")?;
            if !e.to_string().contains("fuse_modules") {
                return Err(format!("QAT fusion error does not name the fix: {e}"));
            }
            let (_vm, mut m) = build()?;
            eval(&mut m).map_err(err)?;
            let x = candle(&c.json["x"], "x")?;
            let unfused = m.forward(&x).map_err(err)?;
            let ref_y = f32s(&f["ref_y"], "ref_y")?;
            check_float("unfused y vs PyTorch", &to_vec(&unfused)?, &ref_y)?;
            fuse_modules(&mut m).map_err(err)?;
            let fused = m.forward(&x).map_err(err)?;
            check_float(
                "fused y vs the unfused float reference",
                &to_vec(&fused)?,
                &ref_y,
            )?;
            let (w, b) = m.folded();
            match (&f["fused_weight"], &f["fuse_error"]) {
                (fw, _) if !fw.is_null() => {
                    check_float("fused weight", &to_vec(&w)?, &f32s(fw, "fused_weight")?)?;
                    let b = b.ok_or("no folded bias")?;
                    check_float(
                        "fused bias",
                        &to_vec(&b)?,
                        &f32s(&f["fused_bias"], "fused_bias")?,
                    )?;
                }
                (_, err) if err.is_string() => {
                    if int(&c.json["args"]["groups"], "groups")? == 1 {
                        return Err(format!("PyTorch's fusion failed with groups 1: {err}"));
                    }
                }
                _ => return Err("neither a fused weight nor an error".into()),
            }
            Ok(())
        }
    };
}

fusion!(fusion_1d, Fused1d);
fusion!(fusion_2d, Fused2d);

fn cases() -> R<Vec<Case>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/eager_conv_transpose");
    let files = case::json_files(&dir)?;
    if files.len() < 10 {
        return Err(format!("{} cases in {}", files.len(), dir.display()));
    }
    files.iter().map(|p| case::load(p)).collect()
}

/// Runs `f` on every case of the right rank; fails with every failing case named.
fn each(f1: fn(&Case) -> R<()>, f2: fn(&Case) -> R<()>) {
    let mut failed = Vec::new();
    let cases = cases().unwrap_or_else(|e| panic!("{e}"));
    for c in &cases {
        let r = match c.json["module"].as_str() {
            Some("ConvTranspose1d") => f1(c),
            Some("ConvTranspose2d") => f2(c),
            m => Err(format!("unknown module {m:?}")),
        };
        if let Err(e) = r {
            failed.push(format!("{}: {e}", c.name));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn eager_pipeline_matches_pytorch() {
    each(eager::<Net1d>, eager::<Net2d>);
}

#[test]
fn weight_fake_quant_matches_pytorch_and_converts_exactly() {
    each(weight_fq::<Net1d>, weight_fq::<Net2d>);
}

#[test]
fn bn_fusion_folds_for_any_groups() {
    each(fusion_1d, fusion_2d);
}

/// A prepared ConvTranspose2d goes through the QAT checkpoint (weights, bias, both
/// fake-quants) into a fresh model that then computes the same, and the summary names it
/// with its weight fake-quant per channel on axis 1 (x86).
#[test]
fn qat_checkpoint_round_trips_and_summary_names_the_layer() {
    use candle_qat::checkpoint::{load_qat_checkpoint, save_qat_checkpoint};
    use candle_qat::passes::summary;
    let cases = cases().unwrap_or_else(|e| panic!("{e}"));
    let c = cases
        .iter()
        .find(|c| {
            c.json["module"] == "ConvTranspose2d"
                && c.json["preset"] == "x86"
                && c.json["args"]["groups"] == 2
        })
        .expect("a grouped 2-D x86 case");
    let opg = (int(&c.json["args"]["out_channels"], "out").unwrap() / 2) as usize;
    let (mut a, vm_a, x, ..) = qat::<Net2d>(c, QConfig::default_qat(Backend::X86), false)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = summary(&a).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with("conv "))
        .unwrap_or_else(|| panic!("no conv line in\n{s}"));
    assert!(
        line.contains("ConvTranspose2d") && line.contains("Prepared"),
        "{line}"
    );
    let file = std::env::temp_dir().join(format!(
        "candle-qat-convt-{}.safetensors",
        std::process::id()
    ));
    save_qat_checkpoint(&mut a, &vm_a, &file).unwrap();
    let vm_b = VarMap::new();
    let mut b = Net2d::build(c, VarBuilder::from_varmap(&vm_b, DType::F32, &Device::Cpu)).unwrap();
    train(&mut b).unwrap();
    prepare_qat(
        &mut b,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )
    .unwrap();
    load_qat_checkpoint(&mut b, &vm_b, &file).unwrap();
    let _ = std::fs::remove_file(&file);
    let (wa, oa) = fqs(a.conv_ref()).unwrap();
    let (wb, ob) = fqs(b.conv_ref()).unwrap();
    assert_eq!(
        wa.len(),
        opg,
        "one weight scale per column of axis 1 (out / groups)"
    );
    assert_eq!((&wa, oa), (&wb, ob));
    for m in [&mut a, &mut b] {
        eval(m).unwrap();
        disable_observer(m).unwrap();
    }
    let ya = to_vec(&a.forward(x.as_tensor()).unwrap()).unwrap();
    let yb = to_vec(&b.forward(x.as_tensor()).unwrap()).unwrap();
    assert_eq!(ya, yb);
}
