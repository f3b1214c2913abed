//! convert(): the int8 model agrees with the fake-quant model it came from, code for code, on
//! every preset; and convert's errors.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::model::QuantModule;
use candle_qat::passes::convert;
use candle_qat::prelude::*;

#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
use mnist_net::MnistNet;

/// A residual model: a FloatFunctional add on the skip path, max pool and flatten.
#[derive(Clone, Quantizable)]
#[qat(
    fuse(stem, stem_bn, stem_relu),
    fuse(conv_a, bn_a, relu_a),
    fuse(conv_b, bn_b)
)]
struct ResNetLite {
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
    pool: MaxPool2d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl ResNetLite {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let c = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let bn = |vb| BatchNorm2d::new(8, BatchNormConfig::default(), vb);
        Ok(ResNetLite {
            quant: QuantStub::new(),
            stem: Conv2d::new(1, 8, 3, c, true, vb.pp("stem"))?,
            stem_bn: bn(vb.pp("stem_bn"))?,
            stem_relu: ReLU::new(),
            conv_a: Conv2d::new(8, 8, 3, c, true, vb.pp("conv_a"))?,
            bn_a: bn(vb.pp("bn_a"))?,
            relu_a: ReLU::new(),
            conv_b: Conv2d::new(8, 8, 3, c, false, vb.pp("conv_b"))?,
            bn_b: bn(vb.pp("bn_b"))?,
            skip: FloatFunctional::new(),
            pool: MaxPool2d::new(2, 2)?,
            flatten: Flatten::new(1),
            fc: Linear::new(8 * 6 * 6, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for ResNetLite {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let s = self
            .stem_relu
            .forward(&self.stem_bn.forward(&self.stem.forward(&x)?)?)?;
        let a = self
            .relu_a
            .forward(&self.bn_a.forward(&self.conv_a.forward(&s)?)?)?;
        let b = self.bn_b.forward(&self.conv_b.forward(&a)?)?;
        let x = self.pool.forward(&self.skip.add_relu(&b, &s)?)?;
        self.dequant
            .forward(&self.fc.forward(&self.flatten.forward(&x)?)?)
    }
}

/// Fuses, prepares with `backend`, trains a few SGD steps on random data, then freezes
/// observers and BN and switches to eval.
fn qat<M: Quantizable + Module>(
    mut model: M,
    varmap: &VarMap,
    backend: Backend,
    hw: usize,
) -> candle_qat::Result<M> {
    let dev = Device::Cpu;
    train(&mut model)?;
    fuse_modules_qat(&mut model)?;
    prepare_qat(
        &mut model,
        &QConfigMapping::global(QConfig::default_qat(backend)),
    )?;
    let mut opt = SGD::new(varmap.all_vars(), 0.02)?;
    for step in 0..6u32 {
        let x = Tensor::randn(0f32, 1., (8, 1, hw, hw), &dev)?;
        let y = Tensor::from_vec(
            (0..8u32).map(|i| (i + step) % 10).collect::<Vec<_>>(),
            8,
            &dev,
        )?;
        opt.backward_step(&loss::cross_entropy(&model.forward(&x)?, &y)?)?;
    }
    disable_observer(&mut model)?;
    freeze_bn_stats(&mut model)?;
    eval(&mut model)?;
    Ok(model)
}

fn agree<M: Quantizable + Module + Clone>(fq_model: M, hw: usize) -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let mut int8 = fq_model.clone();
    // One frozen forward notes which fake-quant feeds each layer.
    int8.forward(&Tensor::randn(0f32, 1., (2, 1, hw, hw), &dev)?)?;
    convert(&mut int8)?;
    for seed in 0..3 {
        let x = (Tensor::randn(0f32, 1., (16, 1, hw, hw), &dev)? * (1.0 + seed as f64))?;
        let a = fq_model.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let b = int8.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
        assert_eq!(differ, 0, "{differ} of {} outputs differ", a.len());
    }
    Ok(())
}

#[test]
fn converted_mnist_net_agrees_with_fake_quant_on_every_preset() -> candle_qat::Result<()> {
    for backend in [Backend::Fbgemm, Backend::X86, Backend::Qnnpack] {
        let varmap = VarMap::new();
        let m = MnistNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        agree(qat(m, &varmap, backend, 28)?, 28)?;
    }
    Ok(())
}

#[test]
fn converted_residual_net_agrees_with_fake_quant_on_every_preset() -> candle_qat::Result<()> {
    for backend in [Backend::Fbgemm, Backend::X86, Backend::Qnnpack] {
        let varmap = VarMap::new();
        let m = ResNetLite::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        agree(qat(m, &varmap, backend, 12)?, 12)?;
    }
    Ok(())
}

#[test]
fn convert_errors() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let mut m = ResNetLite::new(VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(e.contains("prepare_qat"), "{e}");
    let mut m = qat(m, &varmap, Backend::X86, 12)?;
    convert(&mut m)?;
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(e.contains("already converted"), "{e}");
    // A float tensor fed past the QuantStub into a converted layer.
    let e = m
        .stem
        .forward(&Tensor::zeros((1, 1, 12, 12), DType::F32, &dev)?)
        .unwrap_err();
    assert!(e.to_string().contains("takes u8 codes"), "{e}");
    Ok(())
}

/// A 1-D model: Conv1d+BN+ReLU (fused), a strided grouped Conv1d, flatten, Linear.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv1, bn1, relu1))]
struct Seq1d {
    quant: QuantStub,
    conv1: Conv1d,
    bn1: BatchNorm1d,
    relu1: ReLU,
    conv2: Conv1d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Seq1d {
    const LEN: usize = 24;

    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let pad = ConvConfig {
            padding: 2,
            dilation: 2,
            ..Default::default()
        };
        let strided = ConvConfig {
            padding: 1,
            stride: 2,
            groups: 2,
            ..Default::default()
        };
        Ok(Seq1d {
            quant: QuantStub::new(),
            conv1: Conv1d::new(1, 6, 3, pad, true, vb.pp("conv1"))?,
            bn1: BatchNorm1d::new(6, BatchNormConfig::default(), vb.pp("bn1"))?,
            relu1: ReLU::new(),
            conv2: Conv1d::new(6, 4, 3, strided, true, vb.pp("conv2"))?,
            flatten: Flatten::new(1),
            fc: Linear::new(4 * Self::LEN / 2, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for Seq1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // The shared QAT loop feeds (N, 1, L, L) images: take their first row, (N, 1, L).
        let x = if x.rank() == 4 {
            x.narrow(2, 0, 1)?.squeeze(2)?
        } else {
            x.clone()
        };
        let x = self.quant.forward(&x)?;
        let x = self
            .relu1
            .forward(&self.bn1.forward(&self.conv1.forward(&x)?)?)?;
        let x = self.flatten.forward(&self.conv2.forward(&x)?)?;
        self.dequant.forward(&self.fc.forward(&x)?)
    }
}

#[test]
fn converted_conv1d_net_agrees_with_fake_quant_on_every_preset() -> candle_qat::Result<()> {
    for backend in [Backend::Fbgemm, Backend::X86, Backend::Qnnpack] {
        let varmap = VarMap::new();
        let m = Seq1d::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
        let m = qat(m, &varmap, backend, Seq1d::LEN)?;
        assert_eq!(m.conv1.kind(), "ConvBnReLU1d");
        let mut int8 = m.clone();
        int8.forward(&Tensor::randn(0f32, 1., (2, 1, Seq1d::LEN), &Device::Cpu)?)?;
        convert(&mut int8)?;
        assert_eq!(int8.conv2.stage(), Stage::Converted);
        // Codes, not floats, flow out of the converted convolutions.
        let codes = int8.conv1.forward(&int8.quant.forward(&Tensor::ones(
            (1, 1, Seq1d::LEN),
            DType::F32,
            &Device::Cpu,
        )?)?)?;
        assert_eq!(codes.dtype(), DType::U8);
        agree(m, Seq1d::LEN)?;
    }
    Ok(())
}

/// A Conv3d with an int8 qconfig is refused at prepare time (naming it and the fix), before
/// any layer changes: the fixed mapping then prepares the same model.
#[test]
fn prepare_refuses_a_layer_without_int8_form() -> candle_qat::Result<()> {
    #[derive(Quantizable)]
    struct Vol {
        quant: QuantStub,
        conv: Conv3d,
        head: Linear,
    }
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let mut m = Vol {
        quant: QuantStub::new(),
        conv: Conv3d::new(1, 2, 3, ConvConfig::default(), true, vb.pp("conv"))?,
        head: Linear::new(4, 2, true, vb.pp("head"))?,
    };
    let qc = QConfig::default_qat(Backend::X86);
    let e = prepare_qat(&mut m, &QConfigMapping::global(qc))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`conv`") && e.contains("Conv3d"), "{e}");
    assert!(
        e.contains("has no int8 form") && e.contains("set_type::<Conv3d>(None)"),
        "{e}"
    );
    // Nothing was prepared, not even the layer before it.
    for info in named_modules(&m)? {
        assert_eq!(info.stage, Stage::Float, "{}", info.path);
    }
    prepare_qat(&mut m, &QConfigMapping::global(qc).set_type::<Conv3d>(None))?;
    assert_eq!(m.quant.stage(), Stage::Prepared);
    // A second prepare is refused before it changes anything.
    let before = summary(&m)?;
    let e = prepare_qat(&mut m, &QConfigMapping::global(qc).set_type::<Conv3d>(None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`quant`") && e.contains("already run"), "{e}");
    assert_eq!(before, summary(&m)?);
    assert_eq!(m.conv.stage(), Stage::Float);
    assert_eq!(m.head.stage(), Stage::Prepared);
    // Mapping it by path works too.
    let mut m2 = Vol {
        quant: QuantStub::new(),
        conv: Conv3d::new(1, 2, 3, ConvConfig::default(), true, vb.pp("conv"))?,
        head: Linear::new(4, 2, true, vb.pp("head"))?,
    };
    prepare_qat(&mut m2, &QConfigMapping::global(qc).set_path("conv", None))?;
    assert_eq!(m2.conv.stage(), Stage::Float);
    Ok(())
}
