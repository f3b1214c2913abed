// MnistNet, the model of the MNIST example and the training-step bench (included by path).
//
// QuantStub -> conv1 Conv2d(1,16,3,p1)+bn1+relu1 -> conv2 Conv2d(16,32,3,s2,p1)+bn2+relu2
// -> conv3 Conv2d(32,64,3,s2,p1)+bn3+relu3 -> flatten -> fc1 Linear(3136,128)+relu4
// -> fc2 Linear(128,10) -> DeQuantStub.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::prelude::*;

#[derive(Clone, Quantizable)]
#[qat(
    fuse(conv1, bn1, relu1),
    fuse(conv2, bn2, relu2),
    fuse(conv3, bn3, relu3),
    fuse(fc1, relu4)
)]
pub struct MnistNet {
    quant: QuantStub,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    relu2: ReLU,
    conv3: Conv2d,
    bn3: BatchNorm2d,
    relu3: ReLU,
    flatten: Flatten,
    fc1: Linear,
    relu4: ReLU,
    fc2: Linear,
    dequant: DeQuantStub,
}

impl MnistNet {
    pub fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let conv = |cin, cout, stride, vb| {
            let cfg = ConvConfig {
                padding: 1,
                stride,
                ..Default::default()
            };
            Conv2d::new(cin, cout, 3, cfg, true, vb)
        };
        let bn = |c, vb| BatchNorm2d::new(c, BatchNormConfig::default(), vb);
        Ok(MnistNet {
            quant: QuantStub::new(),
            conv1: conv(1, 16, 1, vb.pp("conv1"))?,
            bn1: bn(16, vb.pp("bn1"))?,
            relu1: ReLU::new(),
            conv2: conv(16, 32, 2, vb.pp("conv2"))?,
            bn2: bn(32, vb.pp("bn2"))?,
            relu2: ReLU::new(),
            conv3: conv(32, 64, 2, vb.pp("conv3"))?,
            bn3: bn(64, vb.pp("bn3"))?,
            relu3: ReLU::new(),
            flatten: Flatten::new(1),
            fc1: Linear::new(3136, 128, true, vb.pp("fc1"))?,
            relu4: ReLU::new(),
            fc2: Linear::new(128, 10, true, vb.pp("fc2"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for MnistNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu1
            .forward(&self.bn1.forward(&self.conv1.forward(&x)?)?)?;
        let x = self
            .relu2
            .forward(&self.bn2.forward(&self.conv2.forward(&x)?)?)?;
        let x = self
            .relu3
            .forward(&self.bn3.forward(&self.conv3.forward(&x)?)?)?;
        let x = self
            .relu4
            .forward(&self.fc1.forward(&self.flatten.forward(&x)?)?)?;
        self.dequant.forward(&self.fc2.forward(&x)?)
    }
}
