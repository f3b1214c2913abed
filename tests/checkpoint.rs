//! Save and load: a prepared model mid-training resumes with identical results; a converted
//! model loads back into the same struct with identical outputs; mismatches are errors.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::checkpoint::{load_int8, load_qat_checkpoint, save_int8, save_qat_checkpoint};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu), fuse(fc1, relu1))]
struct Net {
    quant: QuantStub,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
    pool: MaxPool2d,
    flatten: Flatten,
    fc1: Linear,
    relu1: ReLU,
    fc2: Linear,
    dequant: DeQuantStub,
}

impl Net {
    fn new(vb: VarBuilder, width: usize) -> candle_qat::Result<Self> {
        let c = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Net {
            quant: QuantStub::new(),
            conv: Conv2d::new(1, width, 3, c, true, vb.pp("conv"))?,
            bn: BatchNorm2d::new(width, BatchNormConfig::default(), vb.pp("bn"))?,
            relu: ReLU::new(),
            pool: MaxPool2d::new(2, 2)?,
            flatten: Flatten::new(1),
            fc1: Linear::new(width * 16, 16, true, vb.pp("fc1"))?,
            relu1: ReLU::new(),
            fc2: Linear::new(16, 4, true, vb.pp("fc2"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu
            .forward(&self.bn.forward(&self.conv.forward(&x)?)?)?;
        let x = self.flatten.forward(&self.pool.forward(&x)?)?;
        let x = self.relu1.forward(&self.fc1.forward(&x)?)?;
        self.dequant.forward(&self.fc2.forward(&x)?)
    }
}

fn prepared(varmap: &VarMap, width: usize, backend: Backend) -> candle_qat::Result<Net> {
    let mut m = Net::new(
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu),
        width,
    )?;
    fuse_modules_qat(&mut m)?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::default_qat(backend)),
    )?;
    Ok(m)
}

fn data(step: u32) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 8. * 64., &dev)?
        .reshape((8, 1, 8, 8))?
        .affine(0.37 + step as f64 * 0.01, -5.0)?
        .sin()?;
    let y = Tensor::from_vec(
        (0..8u32).map(|i| (i + step) % 4).collect::<Vec<_>>(),
        8,
        &dev,
    )?;
    Ok((x, y))
}

fn steps(m: &Net, varmap: &VarMap, from: u32, to: u32) -> candle_qat::Result<Vec<f32>> {
    let mut opt = SGD::new(varmap.all_vars(), 0.05)?;
    let mut losses = Vec::new();
    for s in from..to {
        let (x, y) = data(s)?;
        let l = loss::cross_entropy(&m.forward(&x)?, &y)?;
        opt.backward_step(&l)?;
        losses.push(l.to_scalar::<f32>()?);
    }
    Ok(losses)
}

#[test]
fn qat_checkpoint_resumes_identically() -> candle_qat::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-qat-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(candle_core::Error::wrap)?;
    let file = dir.join("qat.safetensors");
    let va = VarMap::new();
    let mut a = prepared(&va, 4, Backend::X86)?;
    steps(&a, &va, 0, 5)?;
    disable_observer(&mut a)?; // a toggle that must survive the round trip
    enable_observer(&mut a)?;
    a.fc2.for_each_fake_quant_disable();
    save_qat_checkpoint(&mut a, &va, &file)?;
    let vb = VarMap::new();
    let mut b = prepared(&vb, 4, Backend::X86)?;
    load_qat_checkpoint(&mut b, &vb, &file)?;
    assert_eq!(steps(&a, &va, 5, 10)?, steps(&b, &vb, 5, 10)?);
    // Another architecture does not load.
    let vc = VarMap::new();
    let mut c = prepared(&vc, 6, Backend::X86)?;
    let e = load_qat_checkpoint(&mut c, &vc, &file)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    let e = load_int8(&mut c, &file).unwrap_err().to_string();
    assert!(e.contains("not a candle-qat/int8"), "{e}");
    Ok(())
}

trait DisableFc2 {
    fn for_each_fake_quant_disable(&mut self);
}

impl DisableFc2 for Linear {
    fn for_each_fake_quant_disable(&mut self) {
        use candle_qat::model::QuantModule;
        self.for_each_fake_quant(&mut |_, fq| fq.disable_fake_quant());
    }
}

#[test]
fn int8_model_round_trips() -> candle_qat::Result<()> {
    let dir = std::env::temp_dir().join(format!("candle-qat-int8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(candle_core::Error::wrap)?;
    for backend in [Backend::X86, Backend::Qnnpack] {
        let file = dir.join(format!("{backend:?}.safetensors"));
        let va = VarMap::new();
        let mut a = prepared(&va, 4, backend)?;
        steps(&a, &va, 0, 3)?;
        eval(&mut a)?;
        a.forward(&data(0)?.0)?;
        convert(&mut a)?;
        save_int8(&mut a, &file)?;
        // The file holds int8 codes: about a quarter of the float weights' bytes.
        let mut b = Net::new(VarBuilder::zeros(DType::F32, &Device::Cpu), 4)?;
        fuse_modules_qat(&mut b)?;
        load_int8(&mut b, &file)?;
        for s in 0..3 {
            let x = data(100 + s)?.0;
            let ya = a.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            let yb = b.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(ya, yb);
        }
        let mut c = Net::new(VarBuilder::zeros(DType::F32, &Device::Cpu), 6)?;
        fuse_modules_qat(&mut c)?;
        let e = load_int8(&mut c, &file).unwrap_err().to_string();
        assert!(e.contains("shape"), "{e}");
    }
    Ok(())
}
