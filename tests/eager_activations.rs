//! ReLU6, Hardswish, Hardsigmoid, LeakyReLU and ELU against PyTorch 2.15's eager QAT pipeline
//! (fixtures: tests/data/eager_activations, written by tools/gen_eager_activations.py) on
//! QuantStub -> activation -> DeQuantStub: prepare_qat, calibration in train mode, a train
//! forward and backward (values, input gradient, both fake-quants' qparams), then convert with
//! observers frozen (int8 codes); plus ONNX export of the converted forms. Likewise AvgPool2d,
//! AdaptiveAvgPool2d (in `AvgPoolOutput::PyTorchEager`) and Upsample (fixtures:
//! tests/data/eager_pools, tools/gen_eager_pools.py): their int8 codes equal PyTorch's.

// Tolerance checks are written `!(diff <= tol)` so that a NaN fails them.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

#[path = "golden_support/case.rs"]
#[allow(dead_code)]
mod case;
#[path = "common/onnx_op_count.rs"]
mod onnx_op_count;

use candle_core::{Module, Tensor, Var};
use candle_qat::model::Quantizable;
use candle_qat::nn::{
    AdaptiveAvgPool2d, AvgPool2d, AvgPoolOutput, DeQuantStub, Hardsigmoid, Hardswish, LeakyReLU,
    QuantStub, ReLU6, Upsample, ELU,
};
use candle_qat::passes::{convert, disable_observer, eval, prepare_qat, train};
use candle_qat::qconfig::{Backend, QConfig};
use candle_qat::qconfig_mapping::QConfigMapping;
use candle_qat::Quantizable;

use case::{
    as_codes, candle, check_codes, check_exact, check_fq, check_grad, check_rel, err, f32s, int,
    num, string, to_vec, Case, R,
};
use onnx_op_count::op_count;

macro_rules! net {
    ($name:ident, $act:ty) => {
        #[derive(Quantizable)]
        struct $name {
            quant: QuantStub,
            act: $act,
            dequant: DeQuantStub,
        }
        impl Module for $name {
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                self.dequant
                    .forward(&self.act.forward(&self.quant.forward(x)?)?)
            }
        }
        impl $name {
            fn new(act: $act) -> Self {
                $name {
                    quant: QuantStub::new(),
                    act,
                    dequant: DeQuantStub::new(),
                }
            }
        }
    };
}

net!(Relu6Net, ReLU6);
net!(HardswishNet, Hardswish);
net!(HardsigmoidNet, Hardsigmoid);
net!(LeakyNet, LeakyReLU);
net!(EluNet, ELU);

/// The activation's output fake-quant (scale, zero point, range) and QuantStub's.
trait Fqs {
    fn act_fq(&self) -> R<(f32, i32, i32, i32)>;
    fn in_fq(&self) -> R<(f32, i32)>;
    fn act_int8(&self) -> R<(f32, i32)>;
}

macro_rules! fqs {
    ($name:ident) => {
        impl Fqs for $name {
            fn act_fq(&self) -> R<(f32, i32, i32, i32)> {
                let fqs = candle_qat::model::QuantModule::fake_quants(&self.act);
                let (_, f) = fqs.first().ok_or("activation has no output fake-quant")?;
                let r = f.quant_range();
                Ok((
                    f.scale()[0],
                    f.zero_point()[0],
                    r.quant_min(),
                    r.quant_max(),
                ))
            }
            fn in_fq(&self) -> R<(f32, i32)> {
                let fqs = candle_qat::model::QuantModule::fake_quants(&self.quant);
                let (_, f) = fqs.first().ok_or("QuantStub has no fake-quant")?;
                Ok((f.scale()[0], f.zero_point()[0]))
            }
            fn act_int8(&self) -> R<(f32, i32)> {
                let s = candle_qat::model::QuantModule::int8_state(&self.act)
                    .and_then(|s| s.output)
                    .ok_or("converted activation has no output qparams")?;
                Ok((s.scale, s.zero_point))
            }
        }
    };
}

fqs!(Relu6Net);
fqs!(HardswishNet);
fqs!(HardsigmoidNet);
fqs!(LeakyNet);
fqs!(EluNet);

fn backend(preset: &str) -> R<Backend> {
    match preset {
        "fbgemm" => Ok(Backend::Fbgemm),
        "qnnpack" => Ok(Backend::Qnnpack),
        "x86" => Ok(Backend::X86),
        p => Err(format!("unknown preset {p}")),
    }
}

/// The QAT half of both pipelines: `model` prepared for the case's preset in train mode, run
/// on every `calib` batch, then on `x` with `backward(sum(y * grad_y))`. Returns `x`, `y`
/// and x's gradient.
fn qat_forward_backward<M: Quantizable + Module>(
    case: &Case,
    model: &mut M,
) -> R<(Var, Tensor, Tensor)> {
    let j = &case.json;
    let qc = QConfig::default_qat(backend(string(&j["preset"], "preset")?)?);
    train(model).map_err(err)?;
    prepare_qat(model, &QConfigMapping::global(qc)).map_err(err)?;
    for c in j["calib"].as_array().ok_or("no calib")? {
        model.forward(&candle(c, "calib")?).map_err(err)?;
    }
    let x = Var::from_tensor(&candle(&j["x"], "x")?).map_err(err)?;
    let y = model.forward(x.as_tensor()).map_err(err)?;
    let grad_y = candle(&j["grad_y"], "grad_y")?;
    let grads = (&y * &grad_y)
        .and_then(|p| p.sum_all())
        .and_then(|l| l.backward())
        .map_err(err)?;
    let grad_x = grads.get(x.as_tensor()).ok_or("no gradient for x")?.clone();
    Ok((x, y, grad_x))
}

/// The pipeline on one case; `pytorch_int8`: whether our converted codes must match
/// PyTorch's (all but ReLU6, whose converted PyTorch module drops the trained output
/// qparams; ours must then equal our own fake-quant output code for code).
fn run<M: Quantizable + Module + Fqs>(case: &Case, mut model: M, pytorch_int8: bool) -> R<()> {
    let j = &case.json;
    let e = &j["expected"];
    let (x, y, grad_x) = qat_forward_backward(case, &mut model)?;

    let (s, z, lo, hi) = model.act_fq()?;
    check_rel(
        "act scale",
        &[s],
        &[num(&e["act_scale"], "act_scale")? as f32],
        1e-6,
    )?;
    check_exact(
        "act zero point / range",
        &[z as i64, lo as i64, hi as i64],
        &[
            int(&e["act_zero_point"], "zp")?,
            int(&e["act_quant_min"], "qmin")?,
            int(&e["act_quant_max"], "qmax")?,
        ],
    )?;
    let (is, iz) = model.in_fq()?;
    check_rel(
        "input scale",
        &[is],
        &[num(&e["in_scale"], "in_scale")? as f32],
        1e-6,
    )?;
    check_exact(
        "input zero point",
        &[iz as i64],
        &[int(&e["in_zero_point"], "zp")?],
    )?;
    let want_y = f32s(&e["qat_y"], "qat_y")?;
    check_fq("qat_y", &to_vec(&y)?, &want_y, |_| s)?;
    check_grad("grad_x", &to_vec(&grad_x)?, &f32s(&e["grad_x"], "grad_x")?)?;

    eval(&mut model).map_err(err)?;
    disable_observer(&mut model).map_err(err)?;
    let y_fq = to_vec(&model.forward(x.as_tensor()).map_err(err)?)?;
    convert(&mut model).map_err(err)?;
    let (s8, z8) = model.act_int8()?;
    let y8 = to_vec(&model.forward(x.as_tensor()).map_err(err)?)?;
    let ours: Vec<i64> = as_codes("int8", &y8, s8)?
        .into_iter()
        .map(|c| c + z8 as i64)
        .collect();
    // Ours, always: the converted activation equals the fake-quant one code for code.
    let fq_codes: Vec<i64> = as_codes("fake-quant", &y_fq, s8)?
        .into_iter()
        .map(|c| c + z8 as i64)
        .collect();
    check_exact("int8 codes vs fake-quant codes", &ours, &fq_codes)?;
    if pytorch_int8 {
        check_rel(
            "int8 scale",
            &[s8],
            &[num(&e["int8_scale"], "int8_scale")? as f32],
            1e-6,
        )?;
        check_exact(
            "int8 zero point",
            &[z8 as i64],
            &[int(&e["int8_zero_point"], "zp")?],
        )?;
        // PyTorch's quantized ops clamp to 0..=255 only; ours to the range the fake-quant
        // trained with (fbgemm: 0..=127), as tests/golden/FORMAT.md's clamped rule.
        let want: Vec<i64> = as_codes("int8_codes", &f32s(&e["int8_codes"], "int8_codes")?, 1.0)?
            .into_iter()
            .map(|c| c.clamp(lo as i64, hi as i64))
            .collect();
        check_codes("int8_codes", &ours, &want)?;
    }
    Ok(())
}

fn run_case(case: &Case) -> R<()> {
    let j = &case.json;
    let arg = |k: &str| num(&j["args"][k], k);
    match string(&j["module"], "module")? {
        "ReLU6" => run(case, Relu6Net::new(ReLU6::new()), false),
        "Hardswish" => run(case, HardswishNet::new(Hardswish::new()), true),
        "Hardsigmoid" => run(case, HardsigmoidNet::new(Hardsigmoid::new()), true),
        "LeakyReLU" => run(
            case,
            LeakyNet::new(LeakyReLU::new(arg("negative_slope")?).map_err(err)?),
            true,
        ),
        "ELU" => run(
            case,
            EluNet::new(ELU::new(arg("alpha")?).map_err(err)?),
            true,
        ),
        m => Err(format!("unknown module {m}")),
    }
}

/// Runs `check` on every case in `tests/data/<subdir>` (there must be `count`: `what`),
/// printing one line per case; fails naming every case that failed.
fn run_fixtures(subdir: &str, count: usize, what: &str, check: fn(&Case) -> R<()>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(subdir);
    let files = case::json_files(&dir).expect("fixture directory");
    assert_eq!(files.len(), count, "{what}");
    let mut failed = Vec::new();
    for f in &files {
        let c = case::load(f).expect("fixture");
        match check(&c) {
            Ok(()) => println!("ok {}", case::stem(f)),
            Err(e) => {
                println!("FAIL {}: {e}", case::stem(f));
                failed.push(case::stem(f));
            }
        }
    }
    assert!(failed.is_empty(), "failed: {failed:?}");
}

#[test]
fn eager_activations_match_pytorch() {
    run_fixtures(
        "eager_activations",
        10,
        "one case per activation and preset",
        run_case,
    );
}

/// Every new layer in one converted model: int8 equals the fake-quant model code for code,
/// the summary names each layer, and the ONNX export writes each as opset-13 ops.
#[derive(Quantizable)]
struct Chain {
    quant: QuantStub,
    hswish: Hardswish,
    relu6: ReLU6,
    leaky: LeakyReLU,
    elu: ELU,
    pool: AvgPool2d,
    hsig: Hardsigmoid,
    gap: AdaptiveAvgPool2d,
    up: Upsample,
    dequant: DeQuantStub,
}

impl Module for Chain {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self.relu6.forward(&self.hswish.forward(&x)?)?;
        let x = self.elu.forward(&self.leaky.forward(&x)?)?;
        let x = self.hsig.forward(&self.pool.forward(&x)?)?;
        self.dequant
            .forward(&self.up.forward(&self.gap.forward(&x)?)?)
    }
}

fn chain() -> candle_qat::Result<Chain> {
    Ok(Chain {
        quant: QuantStub::new(),
        hswish: Hardswish::new(),
        relu6: ReLU6::new(),
        leaky: LeakyReLU::new(0.1)?,
        elu: ELU::new(0.5)?,
        pool: AvgPool2d::new([2, 2], [2, 2], [0, 0])?,
        hsig: Hardsigmoid::new(),
        gap: AdaptiveAvgPool2d::new([1, 1])?,
        up: Upsample::nearest([2, 3])?,
        dequant: DeQuantStub::new(),
    })
}

#[test]
fn new_layers_convert_summarize_and_export() -> candle_qat::Result<()> {
    use candle_qat::checkpoint::{load_int8, load_qat_checkpoint, save_int8, save_qat_checkpoint};
    use candle_qat::onnx::{to_onnx, ExportOptions};
    let dev = candle_core::Device::Cpu;
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let mut m = chain()?;
    prepare_qat(
        &mut m,
        // qnnpack's activations use the whole 0..=255, so no Clip follows a QuantizeLinear
        // and the one Clip counted is ReLU6's.
        &QConfigMapping::global(QConfig::default_qat(Backend::Qnnpack)),
    )?;
    for i in 0..3 {
        m.forward(&((Tensor::randn(0f32, 3.0, (2, 3, 6, 6), &dev)? + i as f64)?))?;
    }
    eval(&mut m)?;
    disable_observer(&mut m)?;
    let x = Tensor::randn(0f32, 3.0, (2, 3, 6, 6), &dev)?;
    let y_fq = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    // The QAT state (every fake-quant, the fixed one included) round-trips.
    let vm = candle_nn::VarMap::new();
    save_qat_checkpoint(&mut m, &vm, tmp.join("chain_qat.safetensors"))?;
    let mut r = chain()?;
    prepare_qat(
        &mut r,
        &QConfigMapping::global(QConfig::default_qat(Backend::Qnnpack)),
    )?;
    load_qat_checkpoint(&mut r, &vm, tmp.join("chain_qat.safetensors"))?;
    eval(&mut r)?;
    disable_observer(&mut r)?;
    assert_eq!(r.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, y_fq);
    convert(&mut m)?;
    let y8 = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(y8, y_fq, "int8 equals the fake-quant model");
    // The int8 model round-trips too.
    save_int8(&mut m, tmp.join("chain_int8.safetensors"))?;
    let mut l = chain()?;
    load_int8(&mut l, tmp.join("chain_int8.safetensors"))?;
    assert_eq!(l.forward(&x)?.flatten_all()?.to_vec1::<f32>()?, y8);
    let s = candle_qat::passes::summary(&m)?;
    for kind in [
        "Hardswish",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "AvgPool2d",
        "Hardsigmoid",
        "AdaptiveAvgPool2d",
        "Upsample",
    ] {
        assert!(s.contains(kind), "{kind} missing from\n{s}");
    }
    let (_, report) = to_onnx(&m, |m, x| m.forward(x), &x, &ExportOptions::default())?;
    let count = |op: &str| op_count(&report, op);
    for (op, n) in [
        ("HardSigmoid", 2), // Hardswish = x * HardSigmoid(x), and Hardsigmoid
        ("Clip", 1),
        ("LeakyRelu", 1),
        ("Elu", 1),
        ("AveragePool", 1),
        ("GlobalAveragePool", 1),
        ("Resize", 1),
    ] {
        assert_eq!(count(op), n, "{op}: {:?}", report.op_counts);
    }
    Ok(())
}

net!(AvgNet, AvgPool2d);
net!(AdaptiveNet, AdaptiveAvgPool2d);
net!(UpNet, Upsample);

/// QuantStub's fake-quant (scale, zero point) of a pool net.
fn stub_qparams<M: Quantizable>(m: &M) -> R<(f32, i32)> {
    let infos = candle_qat::passes::named_modules(m).map_err(err)?;
    let stub = infos
        .iter()
        .find(|i| i.path == "quant")
        .ok_or("no quant stub")?;
    let f = stub
        .fake_quants
        .first()
        .ok_or("QuantStub has no fake-quant")?;
    match &f.qparams {
        candle_qat::QParams::PerTensor { scale, zero_point } => Ok((*scale, *zero_point)),
        q => Err(format!("per-channel stub qparams {q:?}")),
    }
}

/// A pool (in the setting that reproduces PyTorch) against PyTorch's eager pipeline: the
/// unrounded QAT output (float tolerance), its input gradient, QuantStub's qparams, and the
/// converted pool's codes (exactly; they keep the input's qparams).
fn run_pool<M: Quantizable + Module>(case: &Case, mut model: M) -> R<()> {
    let j = &case.json;
    let e = &j["expected"];
    let (x, y, grad_x) = qat_forward_backward(case, &mut model)?;
    let (s, z) = stub_qparams(&model)?;
    check_rel(
        "input scale",
        &[s],
        &[num(&e["in_scale"], "in_scale")? as f32],
        1e-6,
    )?;
    check_exact(
        "input zero point",
        &[z as i64],
        &[int(&e["in_zero_point"], "zp")?],
    )?;
    case::check_float("qat_y", &to_vec(&y)?, &f32s(&e["qat_y"], "qat_y")?)?;
    check_grad("grad_x", &to_vec(&grad_x)?, &f32s(&e["grad_x"], "grad_x")?)?;
    eval(&mut model).map_err(err)?;
    disable_observer(&mut model).map_err(err)?;
    convert(&mut model).map_err(err)?;
    let y8 = to_vec(&model.forward(x.as_tensor()).map_err(err)?)?;
    let ours: Vec<i64> = as_codes("int8", &y8, s)?
        .into_iter()
        .map(|c| c + z as i64)
        .collect();
    let want = as_codes("int8_codes", &f32s(&e["int8_codes"], "int8_codes")?, 1.0)?;
    // Bit-exact: the same integer sums and the same f32 multiplier as PyTorch's kernels.
    check_exact("int8_codes", &ours, &want)
}

fn run_pool_case(case: &Case) -> R<()> {
    let j = &case.json;
    let pair = |k: &str| -> R<[usize; 2]> {
        let v = case::array(&j["args"][k], k)?;
        match v.as_slice() {
            [a, b] => Ok([int(a, k)? as usize, int(b, k)? as usize]),
            _ => Err(format!("{k}: want 2 values")),
        }
    };
    let eager = AvgPoolOutput::PyTorchEager;
    match string(&j["module"], "module")? {
        "AvgPool2d" => {
            let p = AvgPool2d::new(pair("kernel")?, pair("stride")?, pair("padding")?)
                .map_err(err)?
                .with_output(eager);
            run_pool(case, AvgNet::new(p))
        }
        "AdaptiveAvgPool2d" => {
            let p = AdaptiveAvgPool2d::new(pair("output")?)
                .map_err(err)?
                .with_output(eager);
            run_pool(case, AdaptiveNet::new(p))
        }
        "Upsample" => run_pool(
            case,
            UpNet::new(Upsample::nearest(pair("scale")?).map_err(err)?),
        ),
        m => Err(format!("unknown module {m}")),
    }
}

#[test]
fn pools_match_pytorch_in_the_pytorch_setting() {
    run_fixtures("eager_pools", 12, "six layers, two presets", run_pool_case);
}
