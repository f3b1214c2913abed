//! MobileNetV2 at width 0.35 (torchvision's `mobilenet_v2(width_mult=0.35)` channel plan:
//! every width rounded with `_make_divisible(c * 0.35, 8)`, last conv 1280) for 1x28x28
//! inputs, written as torchvision's *quantizable* MobileNetV2 writes it: ReLU instead of ReLU6
//! so that (Conv, BN, ReLU) fuses, the inverted residual's skip a `FloatFunctional::add`, a
//! global `AdaptiveAvgPool2d` before the classifier. Only the stem differs: stride 1 (a
//! 28x28 digit has no pixels to spare), so the stages run at 28, 14, 7, 4 and 2 pixels.
#![allow(dead_code)]

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::prelude::*;

/// (expansion, output channels, repeats, first stride) per stage, channels already at width
/// 0.35: torchvision's (1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2),
/// (6,320,1,1) with 16, 24, 32, 64, 96, 160, 320 -> 8, 8, 16, 24, 32, 56, 112.
pub const STAGES: [(usize, usize, usize, usize); 7] = [
    (1, 8, 1, 1),
    (6, 8, 2, 2),
    (6, 16, 3, 2),
    (6, 24, 4, 2),
    (6, 32, 3, 1),
    (6, 56, 3, 2),
    (6, 112, 1, 1),
];
/// The stem's width (torchvision: `_make_divisible(32 * 0.35, 8)`).
pub const STEM: usize = 16;
/// The last conv's width (torchvision keeps 1280 below width 1.0).
pub const LAST: usize = 1280;

fn bn(c: usize, vb: VarBuilder) -> candle_qat::Result<BatchNorm2d> {
    BatchNorm2d::new(c, BatchNormConfig::default(), vb)
}

/// Conv (no bias) + BN + ReLU, torchvision's `Conv2dNormActivation` (ReLU for fusion).
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu))]
pub struct ConvBnRelu {
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
}

impl ConvBnRelu {
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_qat::Result<Self> {
        let cfg = ConvConfig {
            padding: k / 2,
            stride,
            groups,
            ..Default::default()
        };
        Ok(ConvBnRelu {
            conv: Conv2d::new(cin, cout, k, cfg, false, vb.pp("conv"))?,
            bn: bn(cout, vb.pp("bn"))?,
            relu: ReLU::new(),
        })
    }
}

impl Module for ConvBnRelu {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.relu.forward(&self.bn.forward(&self.conv.forward(x)?)?)
    }
}

/// The inverted residual: 1x1 expand (absent at expansion 1), 3x3 depthwise, 1x1 linear
/// project; the input added back when the shape allows.
#[derive(Clone, Quantizable)]
#[qat(fuse(project, project_bn))]
pub struct InvertedResidual {
    expand: Option<ConvBnRelu>,
    dw: ConvBnRelu,
    project: Conv2d,
    project_bn: BatchNorm2d,
    skip: Option<FloatFunctional>,
}

impl InvertedResidual {
    pub fn new(
        cin: usize,
        cout: usize,
        stride: usize,
        expansion: usize,
        vb: VarBuilder,
    ) -> candle_qat::Result<Self> {
        let hidden = cin * expansion;
        let expand = if expansion == 1 {
            None
        } else {
            Some(ConvBnRelu::new(cin, hidden, 1, 1, 1, vb.pp("expand"))?)
        };
        Ok(InvertedResidual {
            expand,
            dw: ConvBnRelu::new(hidden, hidden, 3, stride, hidden, vb.pp("dw"))?,
            project: Conv2d::new(
                hidden,
                cout,
                1,
                ConvConfig::default(),
                false,
                vb.pp("project"),
            )?,
            project_bn: bn(cout, vb.pp("project_bn"))?,
            skip: (stride == 1 && cin == cout).then(FloatFunctional::new),
        })
    }
}

impl Module for InvertedResidual {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        let y = self
            .project_bn
            .forward(&self.project.forward(&self.dw.forward(&h)?)?)?;
        match &self.skip {
            Some(s) => Ok(s.add(x, &y)?),
            None => Ok(y),
        }
    }
}

#[derive(Clone, Quantizable)]
pub struct MobileNetV2 {
    quant: QuantStub,
    stem: ConvBnRelu,
    blocks: Vec<InvertedResidual>,
    last: ConvBnRelu,
    pool: AdaptiveAvgPool2d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl MobileNetV2 {
    /// The network with `pool` as its global pool's quantization mode.
    pub fn with_pool(vb: VarBuilder, pool: AvgPoolOutput) -> candle_qat::Result<Self> {
        let mut blocks = Vec::new();
        let mut cin = STEM;
        for (t, c, n, s) in STAGES {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let vb = vb.pp("blocks").pp(blocks.len());
                blocks.push(InvertedResidual::new(cin, c, stride, t, vb)?);
                cin = c;
            }
        }
        Ok(MobileNetV2 {
            quant: QuantStub::new(),
            stem: ConvBnRelu::new(1, STEM, 3, 1, 1, vb.pp("stem"))?,
            blocks,
            last: ConvBnRelu::new(cin, LAST, 1, 1, 1, vb.pp("last"))?,
            pool: AdaptiveAvgPool2d::new([1, 1])?.with_output(pool),
            flatten: Flatten::new(1),
            fc: Linear::new(LAST, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }

    /// The network with the default pool (its int8 output equals the fake-quant one).
    pub fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Self::with_pool(vb, AvgPoolOutput::default())
    }

    /// The number of inverted residual blocks.
    pub fn blocks(&self) -> usize {
        self.blocks.len()
    }
}

impl Module for MobileNetV2 {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(&self.quant.forward(x)?)?;
        for b in &self.blocks {
            x = b.forward(&x)?;
        }
        let x = self.pool.forward(&self.last.forward(&x)?)?;
        self.dequant
            .forward(&self.fc.forward(&self.flatten.forward(&x)?)?)
    }
}
