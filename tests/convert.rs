//! convert(): the int8 model agrees with the fake-quant model it came from, code for code, on
//! every preset; and convert's errors.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap, SGD};
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
