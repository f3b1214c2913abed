//! model_e2e_mobile: a MobileNetV2 block (depthwise conv, inverted residual, global average
//! pool) and a MobileNetV3 block (Hardswish, squeeze-excite with Hardsigmoid and
//! FloatFunctional mul) through fuse_modules_qat -> prepare_qat -> calibration in train mode
//! -> eval forward -> convert -> int8 forward.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::model::{ModulePath, ModuleVisitor, QuantModule, Quantizable};
use candle_qat::nn::{
    AdaptiveAvgPool2d, AvgPoolOutput, BatchNorm2d, Conv2d, ConvConfig, DeQuantStub, Flatten,
    FloatFunctional, Hardsigmoid, Hardswish, Linear, QuantStub, ReLU,
};
use candle_qat::passes::{convert, disable_observer};
use candle_qat::Quantizable;

use crate::case::{candle, check_exact, check_rel, err, int, num, string, Case, R};
use crate::model_pipeline::{bn, calibrated, check_int8_codes_clamped, codes};

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    groups: usize,
    vb: VarBuilder,
) -> candle_qat::Result<Conv2d> {
    let cfg = ConvConfig {
        padding: k / 2,
        groups,
        ..Default::default()
    };
    Conv2d::new(cin, cout, k, cfg, true, vb)
}

fn pool(mode: AvgPoolOutput) -> candle_qat::Result<AdaptiveAvgPool2d> {
    Ok(AdaptiveAvgPool2d::new([1, 1])?.with_output(mode))
}

#[derive(Quantizable)]
#[qat(
    fuse(stem, stem_bn, stem_relu),
    fuse(expand, expand_bn, expand_relu),
    fuse(dw, dw_bn, dw_relu),
    fuse(project, project_bn)
)]
pub struct MbV2Block {
    quant: QuantStub,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    stem_relu: ReLU,
    expand: Conv2d,
    expand_bn: BatchNorm2d,
    expand_relu: ReLU,
    dw: Conv2d,
    dw_bn: BatchNorm2d,
    dw_relu: ReLU,
    project: Conv2d,
    project_bn: BatchNorm2d,
    skip: FloatFunctional,
    pool: AdaptiveAvgPool2d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl MbV2Block {
    pub fn new(vb: VarBuilder, mode: AvgPoolOutput) -> candle_qat::Result<Self> {
        Ok(MbV2Block {
            quant: QuantStub::new(),
            stem: conv(1, 8, 3, 1, vb.pp("stem"))?,
            stem_bn: bn(8, vb.pp("stem_bn"))?,
            stem_relu: ReLU::new(),
            expand: conv(8, 16, 1, 1, vb.pp("expand"))?,
            expand_bn: bn(16, vb.pp("expand_bn"))?,
            expand_relu: ReLU::new(),
            dw: conv(16, 16, 3, 16, vb.pp("dw"))?,
            dw_bn: bn(16, vb.pp("dw_bn"))?,
            dw_relu: ReLU::new(),
            project: conv(16, 8, 1, 1, vb.pp("project"))?,
            project_bn: bn(8, vb.pp("project_bn"))?,
            skip: FloatFunctional::new(),
            pool: pool(mode)?,
            flatten: Flatten::new(1),
            fc: Linear::new(8, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for MbV2Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let stem = self
            .stem_relu
            .forward(&self.stem_bn.forward(&self.stem.forward(&x)?)?)?;
        let y = self
            .expand_relu
            .forward(&self.expand_bn.forward(&self.expand.forward(&stem)?)?)?;
        let y = self
            .dw_relu
            .forward(&self.dw_bn.forward(&self.dw.forward(&y)?)?)?;
        let y = self.project_bn.forward(&self.project.forward(&y)?)?;
        let y = self.skip.add(&y, &stem)?;
        let y = self.flatten.forward(&self.pool.forward(&y)?)?;
        self.dequant.forward(&self.fc.forward(&y)?)
    }
}

#[derive(Quantizable)]
#[qat(
    fuse(stem, stem_bn),
    fuse(expand, expand_bn, expand_relu),
    fuse(dw, dw_bn),
    fuse(se_fc1, se_relu),
    fuse(project, project_bn)
)]
pub struct MbV3Block {
    quant: QuantStub,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    stem_act: Hardswish,
    expand: Conv2d,
    expand_bn: BatchNorm2d,
    expand_relu: ReLU,
    dw: Conv2d,
    dw_bn: BatchNorm2d,
    dw_act: Hardswish,
    se_pool: AdaptiveAvgPool2d,
    se_fc1: Conv2d,
    se_relu: ReLU,
    se_fc2: Conv2d,
    se_gate: Hardsigmoid,
    se_mul: FloatFunctional,
    project: Conv2d,
    project_bn: BatchNorm2d,
    skip: FloatFunctional,
    pool: AdaptiveAvgPool2d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl MbV3Block {
    pub fn new(vb: VarBuilder, mode: AvgPoolOutput) -> candle_qat::Result<Self> {
        Ok(MbV3Block {
            quant: QuantStub::new(),
            stem: conv(1, 8, 3, 1, vb.pp("stem"))?,
            stem_bn: bn(8, vb.pp("stem_bn"))?,
            stem_act: Hardswish::new(),
            expand: conv(8, 16, 1, 1, vb.pp("expand"))?,
            expand_bn: bn(16, vb.pp("expand_bn"))?,
            expand_relu: ReLU::new(),
            dw: conv(16, 16, 3, 16, vb.pp("dw"))?,
            dw_bn: bn(16, vb.pp("dw_bn"))?,
            dw_act: Hardswish::new(),
            se_pool: pool(mode)?,
            se_fc1: conv(16, 4, 1, 1, vb.pp("se_fc1"))?,
            se_relu: ReLU::new(),
            se_fc2: conv(4, 16, 1, 1, vb.pp("se_fc2"))?,
            se_gate: Hardsigmoid::new(),
            se_mul: FloatFunctional::new(),
            project: conv(16, 8, 1, 1, vb.pp("project"))?,
            project_bn: bn(8, vb.pp("project_bn"))?,
            skip: FloatFunctional::new(),
            pool: pool(mode)?,
            flatten: Flatten::new(1),
            fc: Linear::new(8, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for MbV3Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let stem = self
            .stem_act
            .forward(&self.stem_bn.forward(&self.stem.forward(&x)?)?)?;
        let y = self
            .expand_relu
            .forward(&self.expand_bn.forward(&self.expand.forward(&stem)?)?)?;
        let y = self
            .dw_act
            .forward(&self.dw_bn.forward(&self.dw.forward(&y)?)?)?;
        let s = self
            .se_relu
            .forward(&self.se_fc1.forward(&self.se_pool.forward(&y)?)?)?;
        let s = self.se_gate.forward(&self.se_fc2.forward(&s)?)?;
        let y = self.se_mul.mul(&y, &s)?;
        let y = self.project_bn.forward(&self.project.forward(&y)?)?;
        let y = self.skip.add(&y, &stem)?;
        let y = self.flatten.forward(&self.pool.forward(&y)?)?;
        self.dequant.forward(&self.fc.forward(&y)?)
    }
}

/// Every converted layer's output qparams, by module path.
struct OutputQParams(Vec<(String, QP)>);

/// An output's scale and zero point.
#[derive(Clone, Copy)]
struct QP {
    scale: f32,
    zero_point: i32,
}

impl ModuleVisitor for OutputQParams {
    fn layer(&mut self, path: &ModulePath, m: &dyn QuantModule) -> candle_qat::Result<()> {
        if let Some(out) = m.int8_state().and_then(|s| s.output) {
            self.0.push((
                path.dotted(),
                QP {
                    scale: out.scale,
                    zero_point: out.zero_point,
                },
            ));
        }
        Ok(())
    }
}

fn output_qparams<M: Quantizable>(model: &M) -> R<Vec<(String, QP)>> {
    let mut v = OutputQParams(Vec::new());
    model.visit(&mut ModulePath::root(), &mut v).map_err(err)?;
    Ok(v.0)
}

/// The setting that reproduces PyTorch (`AvgPoolOutput::PyTorchEager`): the eval forward on
/// `test_x` (which still updates the observers, as PyTorch's), convert, then the int8
/// forward's codes against `int8_codes_clamped` (integer-code tolerance) and every converted
/// module's output qparams against `qparams` (scale relative 1e-5, zero point exact), for
/// every module PyTorch lists (those it swapped for quantized modules: not the pools, the
/// ReLUs fused away, the Hardsigmoid it runs as a float module, nor the flatten); each must
/// exist among ours with output qparams.
/// Not compared (FORMAT.md): `qat_y`, `int8_codes` / `int8_y` (PyTorch's unclamped model).
fn pytorch_setting<M: Quantizable + Module>(
    case: &Case,
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
) -> R<()> {
    let mut model = calibrated(case, build)?;
    let e = &case.json["expected"];
    let test_x = candle(&case.json["test_x"], "test_x")?;
    model.forward(&test_x).map_err(err)?;
    convert(&mut model).map_err(err)?;
    let got = output_qparams(&model)?;
    let want = e["qparams"].as_object().ok_or("no qparams")?;
    for (name, q) in want {
        let (_, ours) = got
            .iter()
            .find(|(p, _)| p == name)
            .ok_or_else(|| format!("no converted module {name} with output qparams"))?;
        check_rel(
            &format!("{name} scale"),
            &[ours.scale],
            &[num(&q["scale"], "scale")? as f32],
            1e-5,
        )?;
        check_exact(
            &format!("{name} zero_point"),
            &[ours.zero_point as i64],
            &[int(&q["zero_point"], "zero_point")?],
        )?;
    }
    let fc = got
        .iter()
        .find(|(p, _)| p == "fc")
        .map(|(_, q)| *q)
        .ok_or("converted fc has no output qparams")?;
    let y8 = model.forward(&test_x).map_err(err)?;
    check_int8_codes_clamped(e, &codes(&y8, fc.scale, fc.zero_point)?)
}

/// Our default (`AvgPoolOutput::SharedFakeQuant`), compared with itself as FORMAT.md says:
/// with observers frozen after the eval switch, the converted model's output codes equal the
/// fake-quant model's, every one of them.
fn default_setting<M: Quantizable + Module>(
    case: &Case,
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
) -> R<()> {
    let mut model = calibrated(case, build)?;
    disable_observer(&mut model).map_err(err)?;
    let test_x = candle(&case.json["test_x"], "test_x")?;
    let y_fq = model.forward(&test_x).map_err(err)?;
    convert(&mut model).map_err(err)?;
    let fc = output_qparams(&model)?
        .into_iter()
        .find(|(p, _)| p == "fc")
        .map(|(_, q)| q)
        .ok_or("converted fc has no output qparams")?;
    let y8 = model.forward(&test_x).map_err(err)?;
    check_exact(
        "default setting: int8 codes vs fake-quant codes",
        &codes(&y8, fc.scale, fc.zero_point)?,
        &codes(&y_fq, fc.scale, fc.zero_point)?,
    )
}

pub fn run(case: &Case) -> R<()> {
    use AvgPoolOutput::{PyTorchEager, SharedFakeQuant};
    match string(&case.json["arch"], "arch")? {
        "MbV2Block" => {
            pytorch_setting(case, |vb| MbV2Block::new(vb, PyTorchEager))?;
            default_setting(case, |vb| MbV2Block::new(vb, SharedFakeQuant))
        }
        "MbV3Block" => {
            pytorch_setting(case, |vb| MbV3Block::new(vb, PyTorchEager))?;
            default_setting(case, |vb| MbV3Block::new(vb, SharedFakeQuant))
        }
        a => Err(format!("unknown arch {a}")),
    }
}
