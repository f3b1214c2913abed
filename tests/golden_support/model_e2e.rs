//! model_e2e: TinyNet / TinyResNet through fuse_modules_qat -> prepare_qat -> calibration in
//! train mode -> eval forward (`qat_y`) -> convert -> int8 forward (`int8_codes_clamped`).

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::model::Quantizable;
use candle_qat::nn::{
    BatchNorm2d, BatchNormConfig, Conv2d, ConvConfig, DeQuantStub, Flatten, FloatFunctional,
    Linear, QuantStub, ReLU,
};
use candle_qat::passes::{convert, eval, fuse_modules_qat, prepare_qat, train};
use candle_qat::qconfig::QConfig;
use candle_qat::qconfig_mapping::QConfigMapping;
use candle_qat::Quantizable;

use crate::case::{candle, err, num, to_vec, Case, Outcome, R};
use crate::conv_bn_qat::check_codes;
use crate::fake_quantize_module::backend;

fn conv(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> candle_qat::Result<Conv2d> {
    let cfg = ConvConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    Conv2d::new(cin, cout, 3, cfg, true, vb)
}

fn bn(c: usize, vb: VarBuilder) -> candle_qat::Result<BatchNorm2d> {
    BatchNorm2d::new(c, BatchNormConfig::default(), vb)
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

fn run_model<M: Quantizable + Module>(
    case: &Case,
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
) -> R<()> {
    let j = &case.json;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().map_err(err)?;
        for (k, v) in j["state_dict"].as_object().ok_or("no state_dict")? {
            data.insert(k.clone(), Var::from_tensor(&candle(v, k)?).map_err(err)?);
        }
    }
    let mut model = build(VarBuilder::from_varmap(&varmap, DType::F32, &dev)).map_err(err)?;
    let qc = QConfig::default_qat(backend(j["preset"].as_str().unwrap_or(""))?);
    train(&mut model).map_err(err)?;
    fuse_modules_qat(&mut model).map_err(err)?;
    prepare_qat(&mut model, &QConfigMapping::global(qc)).map_err(err)?;
    for (i, x) in j["calib"].as_array().ok_or("no calib")?.iter().enumerate() {
        model
            .forward(&candle(x, "calib")?)
            .map_err(|e| format!("calib {i}: {e}"))?;
    }
    eval(&mut model).map_err(err)?;
    let test_x = candle(&j["test_x"], "test_x")?;
    let y = model.forward(&test_x).map_err(err)?;
    let e = &j["expected"];
    let scale = num(&e["qat_scale"], "qat_scale")? as f32;
    check_codes(
        "qat_y",
        &to_vec(&y)?,
        &crate::case::f32s(&e["qat_y"], "qat_y")?,
        scale,
    )?;
    // convert: PyTorch's pipeline with every activation clamped to its trained range.
    convert(&mut model).map_err(err)?;
    let y8 = to_vec(&model.forward(&test_x).map_err(err)?)?;
    let s8 = num(&e["int8_scale"], "int8_scale")? as f32;
    let zp8 = num(&e["int8_zero_point"], "int8_zero_point")? as f32;
    let codes: Vec<f32> = y8.iter().map(|v| (v / s8).round() + zp8).collect();
    let want: Vec<f32> = crate::case::f32s(&e["int8_codes_clamped"], "int8_codes_clamped")?;
    let want_y: Vec<f32> = want.iter().map(|c| (c - zp8) * s8).collect();
    let got_y: Vec<f32> = codes.iter().map(|c| (c - zp8) * s8).collect();
    check_codes("int8_codes_clamped", &got_y, &want_y, s8)
}

pub fn run(case: &Case) -> Outcome {
    let r = match case.json["arch"].as_str() {
        Some("TinyNet") => run_model(case, TinyNet::new),
        Some("TinyResNet") => run_model(case, TinyResNet::new),
        a => Err(format!("unknown arch {a:?}")),
    };
    r.into()
}
