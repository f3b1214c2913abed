//! The residual CNN of the `residual` example (also exported to ONNX by the tests):
//! QuantStub -> stem conv+bn+relu -> max pool -> two residual blocks (conv+bn+relu, conv+bn,
//! `FloatFunctional::add_relu` with the block's input) -> max pool -> flatten -> DeQuantStub
//! -> fc1+relu kept in float -> QuantStub -> fc2 -> DeQuantStub, with its per-path qconfigs.
#![allow(dead_code)]

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::prelude::*;

/// One tapped layer output: a label, the module whose output qparams apply to it (for
/// dequantizing the converted model's codes), and the tensor.
pub struct Tap {
    pub label: String,
    pub qsource: Option<String>,
    pub value: Tensor,
}

/// Collects layer outputs when given a list; costs nothing otherwise.
pub struct Taps<'a>(pub Option<&'a mut Vec<Tap>>);

impl Taps<'_> {
    pub fn push(&mut self, label: impl Into<String>, qsource: Option<String>, t: &Tensor) {
        if let Some(v) = self.0.as_mut() {
            v.push(Tap {
                label: label.into(),
                qsource,
                value: t.clone(),
            });
        }
    }
}

/// A basic residual block: conv+bn+relu, conv+bn, add the input, relu.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv1, bn1, relu1), fuse(conv2, bn2))]
pub struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    skip: FloatFunctional,
}

impl Block {
    pub fn new(c: usize, vb: VarBuilder) -> candle_qat::Result<Self> {
        let cfg = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let bn = |vb| BatchNorm2d::new(c, BatchNormConfig::default(), vb);
        Ok(Block {
            conv1: Conv2d::new(c, c, 3, cfg, false, vb.pp("conv1"))?,
            bn1: bn(vb.pp("bn1"))?,
            relu1: ReLU::new(),
            conv2: Conv2d::new(c, c, 3, cfg, false, vb.pp("conv2"))?,
            bn2: bn(vb.pp("bn2"))?,
            skip: FloatFunctional::new(),
        })
    }

    pub fn forward_taps(
        &self,
        x: &Tensor,
        prefix: &str,
        taps: &mut Taps,
    ) -> candle_core::Result<Tensor> {
        let p = |f: &str| format!("{prefix}.{f}");
        let a = self
            .relu1
            .forward(&self.bn1.forward(&self.conv1.forward(x)?)?)?;
        taps.push(p("conv1"), Some(p("conv1")), &a);
        let b = self.bn2.forward(&self.conv2.forward(&a)?)?;
        taps.push(p("conv2"), Some(p("conv2")), &b);
        let y = self.skip.add_relu(&b, x)?;
        taps.push(p("skip"), Some(p("skip")), &y);
        Ok(y)
    }
}

#[derive(Clone, Quantizable)]
#[qat(fuse(stem, stem_bn, stem_relu), fuse(fc1, fc1_relu))]
pub struct ResNet {
    quant: QuantStub,
    stem: Conv2d,
    stem_bn: BatchNorm2d,
    stem_relu: ReLU,
    pool1: MaxPool2d,
    blocks: Vec<Block>,
    pool2: MaxPool2d,
    flatten: Flatten,
    /// fc1 stays float: a DeQuantStub before it, a QuantStub after it.
    dequant_fc1: DeQuantStub,
    fc1: Linear,
    fc1_relu: ReLU,
    quant_fc2: QuantStub,
    fc2: Linear,
    dequant: DeQuantStub,
}

pub const CHANNELS: usize = 16;
pub const BLOCKS: usize = 2;

impl ResNet {
    pub fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let cfg = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let blocks = (0..BLOCKS)
            .map(|i| Block::new(CHANNELS, vb.pp("blocks").pp(i)))
            .collect::<candle_qat::Result<Vec<_>>>()?;
        Ok(ResNet {
            quant: QuantStub::new(),
            stem: Conv2d::new(1, CHANNELS, 3, cfg, false, vb.pp("stem"))?,
            stem_bn: BatchNorm2d::new(CHANNELS, BatchNormConfig::default(), vb.pp("stem_bn"))?,
            stem_relu: ReLU::new(),
            pool1: MaxPool2d::new(2, 2)?,
            blocks,
            pool2: MaxPool2d::new(2, 2)?,
            flatten: Flatten::new(1),
            dequant_fc1: DeQuantStub::new(),
            fc1: Linear::new(CHANNELS * 7 * 7, 64, true, vb.pp("fc1"))?,
            fc1_relu: ReLU::new(),
            quant_fc2: QuantStub::new(),
            fc2: Linear::new(64, 10, true, vb.pp("fc2"))?,
            dequant: DeQuantStub::new(),
        })
    }

    /// The forward pass, handing each layer's (or fused group's) output to `taps`.
    pub fn forward_taps(&self, x: &Tensor, taps: &mut Taps) -> candle_core::Result<Tensor> {
        let s = |p: &str| Some(p.to_string());
        let x = self.quant.forward(x)?;
        taps.push("quant", s("quant"), &x);
        let x = self
            .stem_relu
            .forward(&self.stem_bn.forward(&self.stem.forward(&x)?)?)?;
        taps.push("stem", s("stem"), &x);
        let mut x = self.pool1.forward(&x)?;
        taps.push("pool1", s("stem"), &x);
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward_taps(&x, &format!("blocks.{i}"), taps)?;
        }
        let src = format!("blocks.{}.skip", BLOCKS - 1);
        let x = self.flatten.forward(&self.pool2.forward(&x)?)?;
        taps.push("pool2+flatten", Some(src), &x);
        let x = self.dequant_fc1.forward(&x)?;
        let x = self.fc1_relu.forward(&self.fc1.forward(&x)?)?;
        taps.push("fc1 (float)", None, &x);
        let x = self.quant_fc2.forward(&x)?;
        taps.push("quant_fc2", s("quant_fc2"), &x);
        let x = self.fc2.forward(&x)?;
        taps.push("fc2", s("fc2"), &x);
        self.dequant.forward(&x)
    }
}

impl Module for ResNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_taps(x, &mut Taps(None))
    }
}

/// The example's qconfigs: the preset everywhere, `fc1` kept float, 4-bit weights for
/// `blocks.1.conv1`.
pub fn qconfig_mapping(backend: Backend) -> candle_qat::Result<QConfigMapping> {
    let qc = QConfig::default_qat(backend);
    let w4 = FakeQuantizeSpec::builder()
        .bits(4)
        .signed(true)
        .symmetric(true)
        .per_channel(0)
        .build()?;
    let qc4 = QConfig::new(qc.activation, w4).with_backend(backend);
    Ok(qconfig_mapping! {
        global => qc,
        path "fc1" => None,
        path "blocks.1.conv1" => qc4,
    })
}
