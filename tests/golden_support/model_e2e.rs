//! model_e2e: TinyNet / TinyResNet through fuse_modules_qat -> prepare_qat -> calibration in
//! train mode -> eval forward (`qat_y`) -> convert -> int8 forward (`int8_codes_clamped`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::model::{QuantModule, Quantizable};
use candle_qat::nn::{
    BatchNorm2d, Conv2d, ConvConfig, DeQuantStub, Flatten, FloatFunctional, Linear, QuantStub, ReLU,
};
use candle_qat::passes::convert;
use candle_qat::Quantizable;

use crate::case::{
    as_codes, candle, check_codes, check_exact, check_rel, err, f32s, int, num, string, to_vec,
    Case, R,
};
use crate::model_pipeline::{bn, calibrated, check_int8_codes_clamped, codes};

fn conv(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_qat::Result<Conv2d> {
    let cfg = ConvConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Conv2d::new(cin, cout, 3, cfg, true, vb)
}

#[derive(Quantizable)]
#[qat(fuse(conv1, bn1, relu1), fuse(conv2, bn2, relu2))]
pub struct TinyNet {
    quant: QuantStub,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    relu2: ReLU,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl TinyNet {
    pub fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(TinyNet {
            quant: QuantStub::new(),
            conv1: conv(1, 4, 1, vb.pp("conv1"))?,
            bn1: bn(4, vb.pp("bn1"))?,
            relu1: ReLU::new(),
            conv2: conv(4, 8, 2, vb.pp("conv2"))?,
            bn2: bn(8, vb.pp("bn2"))?,
            relu2: ReLU::new(),
            flatten: Flatten::new(1),
            fc: Linear::new(288, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for TinyNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu1
            .forward(&self.bn1.forward(&self.conv1.forward(&x)?)?)?;
        let x = self
            .relu2
            .forward(&self.bn2.forward(&self.conv2.forward(&x)?)?)?;
        let x = self.fc.forward(&self.flatten.forward(&x)?)?;
        self.dequant.forward(&x)
    }
}

#[derive(Quantizable)]
#[qat(
    fuse(stem, stem_bn, stem_relu),
    fuse(conv_a, bn_a, relu_a),
    fuse(conv_b, bn_b)
)]
pub struct TinyResNet {
    quant: QuantStub,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    stem_relu: ReLU,
    conv_a: Conv2d,
    bn_a: BatchNorm2d,
    relu_a: ReLU,
    conv_b: Conv2d,
    bn_b: BatchNorm2d,
    skip: FloatFunctional,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl TinyResNet {
    pub fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(TinyResNet {
            quant: QuantStub::new(),
            stem: conv(1, 8, 1, vb.pp("stem"))?,
            stem_bn: bn(8, vb.pp("stem_bn"))?,
            stem_relu: ReLU::new(),
            conv_a: conv(8, 8, 1, vb.pp("conv_a"))?,
            bn_a: bn(8, vb.pp("bn_a"))?,
            relu_a: ReLU::new(),
            conv_b: conv(8, 8, 1, vb.pp("conv_b"))?,
            bn_b: bn(8, vb.pp("bn_b"))?,
            skip: FloatFunctional::new(),
            flatten: Flatten::new(1),
            fc: Linear::new(8 * 12 * 12, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for TinyResNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let stem = self
            .stem_relu
            .forward(&self.stem_bn.forward(&self.stem.forward(&x)?)?)?;
        let a = self
            .relu_a
            .forward(&self.bn_a.forward(&self.conv_a.forward(&stem)?)?)?;
        let b = self.bn_b.forward(&self.conv_b.forward(&a)?)?;
        let x = self.skip.add_relu(&b, &stem)?;
        let x = self.fc.forward(&self.flatten.forward(&x)?)?;
        self.dequant.forward(&x)
    }
}

/// Inputs: `arch`, `preset`, `engine` (= preset), `qconfig_version` (0), `fuse_groups` (must
/// be the groups our model declares), `state_dict` (every key used, every parameter given),
/// `calib`, `test_x`. Compared: `qat_y` (codes with the reference's `qat_scale`, as FORMAT.md
/// says), our fc output fake-quant's scale and zero point after that forward against
/// `qat_scale` / `qat_zero_point`, our converted model's output scale and zero point against
/// `int8_scale` / `int8_zero_point`, and its output codes (with its own qparams) against
/// `int8_codes_clamped` and its output against `int8_y_clamped`.
/// Not compared: `int8_y` / `int8_codes` (PyTorch's unclamped int8 model; FORMAT.md compares
/// them only in a PyTorch-compatible mode, which candle-qat does not offer) and `qparams`
/// (FORMAT.md: informational for model_e2e).
fn run_model<M: Quantizable + Module>(
    case: &Case,
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
    fc: impl Fn(&M) -> &Linear,
) -> R<()> {
    let j = &case.json;
    let mut model = calibrated(case, build)?;
    let test_x = candle(&j["test_x"], "test_x")?;
    let y = model.forward(&test_x).map_err(err)?;
    let e = &j["expected"];
    let qat_scale = num(&e["qat_scale"], "qat_scale")? as f32;
    check_codes(
        "qat_y",
        &as_codes("qat_y", &to_vec(&y)?, qat_scale)?,
        &as_codes("expected qat_y", &f32s(&e["qat_y"], "qat_y")?, qat_scale)?,
    )?;
    let fqs = fc(&model).fake_quants();
    let out_fq = fqs
        .iter()
        .find(|(role, _)| role == "activation")
        .map(|(_, f)| f)
        .ok_or("fc has no output fake-quant")?;
    check_qparams(
        "qat",
        (out_fq.scale(), out_fq.zero_point()),
        e,
        "qat_scale",
        "qat_zero_point",
    )?;
    // convert: PyTorch's pipeline with every activation clamped to its trained range.
    convert(&mut model).map_err(err)?;
    let out = fc(&model)
        .int8_state()
        .and_then(|s| s.output)
        .ok_or("converted fc has no output qparams")?;
    check_qparams(
        "int8",
        (vec![out.scale], vec![out.zero_point]),
        e,
        "int8_scale",
        "int8_zero_point",
    )?;
    let y8 = model.forward(&test_x).map_err(err)?;
    // Our output codes, with our own output qparams.
    check_int8_codes_clamped(e, &codes(&y8, out.scale, out.zero_point)?)?;
    let y8 = to_vec(&y8)?;
    let int8_scale = num(&e["int8_scale"], "int8_scale")? as f32;
    check_codes(
        "int8_y_clamped",
        &as_codes("int8 y", &y8, int8_scale)?,
        &as_codes(
            "int8_y_clamped",
            &f32s(&e["int8_y_clamped"], "int8_y_clamped")?,
            int8_scale,
        )?,
    )
}

/// An output scale (relative 1e-6, FORMAT.md's scale tolerance) and zero point (exact).
fn check_qparams(
    what: &str,
    (scale, zp): (Vec<f32>, Vec<i32>),
    e: &serde_json::Value,
    scale_key: &str,
    zp_key: &str,
) -> R<()> {
    check_rel(
        &format!("{what} {scale_key}"),
        &scale,
        &[num(&e[scale_key], scale_key)? as f32],
        1e-6,
    )?;
    check_exact(
        &format!("{what} {zp_key}"),
        &zp,
        &[int(&e[zp_key], zp_key)? as i32],
    )
}

pub fn run(case: &Case) -> R<()> {
    match string(&case.json["arch"], "arch")? {
        "TinyNet" => run_model(case, TinyNet::new, |m| &m.fc),
        "TinyResNet" => run_model(case, TinyResNet::new, |m| &m.fc),
        a => Err(format!("unknown arch {a}")),
    }
}
