//! A user's mistakes get messages with the module path and the fix: inputs of the wrong dtype,
//! channel count or rank, files that cannot be written, a missing QuantStub.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_qat::checkpoint::{save_int8, save_qat_checkpoint};
use candle_qat::model::QuantModule;
use candle_qat::onnx::{export_onnx, ExportOptions};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

/// QuantStub -> Conv2d(2 -> 3) + ReLU -> Flatten -> Linear(12 -> 2) -> DeQuantStub, on 2x2x2.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, relu))]
struct Net {
    quant: QuantStub,
    conv: Conv2d,
    relu: ReLU,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Net {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let c = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Net {
            quant: QuantStub::new(),
            conv: Conv2d::new(2, 3, 3, c, true, vb.pp("conv"))?,
            relu: ReLU::new(),
            flatten: Flatten::new(1),
            fc: Linear::new(12, 2, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for Net {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self.relu.forward(&self.conv.forward(&x)?)?;
        self.dequant
            .forward(&self.fc.forward(&self.flatten.forward(&x)?)?)
    }
}

fn prepare_x86<M: Quantizable>(m: &mut M) -> candle_qat::Result<()> {
    prepare_qat(
        m,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )
}

fn prepared() -> candle_qat::Result<Net> {
    let dev = Device::Cpu;
    let mut m = Net::new(VarBuilder::from_varmap(
        &candle_nn::VarMap::new(),
        DType::F32,
        &dev,
    ))?;
    fuse_modules_qat(&mut m)?;
    prepare_x86(&mut m)?;
    Ok(m)
}

fn x(shape: &[usize]) -> candle_core::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}

#[test]
fn a_half_precision_input_names_the_layer_and_the_cast() -> candle_qat::Result<()> {
    let m = prepared()?;
    for dt in [DType::F16, DType::BF16] {
        let e = m
            .forward(&x(&[1, 2, 2, 2])?.to_dtype(dt)?)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in module `"), "{e}");
        assert!(
            e.contains(&format!("F32 parameters but got a {dt:?} input")),
            "{e}"
        );
        assert!(e.contains("x.to_dtype(DType::F32)"), "{e}");
    }
    Ok(())
}

#[test]
fn a_wrong_channel_count_names_the_layer() -> candle_qat::Result<()> {
    let m = prepared()?;
    let e = m.forward(&x(&[1, 5, 2, 2])?).unwrap_err().to_string();
    assert!(e.contains("in module `conv`"), "{e}");
    assert!(
        e.contains("Conv2d takes 2 channels along dim 1 but got an input of shape [1, 5, 2, 2]"),
        "{e}"
    );
    assert!(e.contains("in_channels"), "{e}");
    // Linear: the feature count.
    let e = m.fc.forward(&x(&[3, 7])?).unwrap_err().to_string();
    assert!(e.contains("in module `fc`"), "{e}");
    assert!(e.contains("Linear over 12 features"), "{e}");
    Ok(())
}

#[test]
fn a_wrong_channel_count_is_caught_once_converted() -> candle_qat::Result<()> {
    let mut m = prepared()?;
    m.forward(&x(&[2, 2, 2, 2])?)?;
    eval(&mut m)?;
    convert(&mut m)?;
    assert_eq!(m.conv.stage(), Stage::Converted);
    m.forward(&x(&[1, 2, 2, 2])?)?;
    // The converted conv runs its int8 weight: the channel count is checked against it.
    let e = m.forward(&x(&[1, 5, 2, 2])?).unwrap_err().to_string();
    assert!(e.contains("in module `conv`"), "{e}");
    assert!(
        e.contains("Conv2d takes 2 channels along dim 1 but got an input of shape [1, 5, 2, 2]"),
        "{e}"
    );
    assert!(e.contains("in_channels"), "{e}");
    Ok(())
}

/// QuantStub -> Linear -> DeQuantStub.
#[derive(Clone, Quantizable)]
struct Head {
    quant: QuantStub,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Module for Head {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dequant
            .forward(&self.fc.forward(&self.quant.forward(x)?)?)
    }
}

#[test]
fn prepared_and_converted_linear_both_take_one_sample() -> candle_qat::Result<()> {
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut m = Head {
        quant: QuantStub::new(),
        fc: Linear::new(12, 2, true, vb.pp("fc"))?,
        dequant: DeQuantStub::new(),
    };
    prepare_x86(&mut m)?;
    let batch = x(&[4, 12])?;
    m.forward(&batch)?;
    disable_observer(&mut m)?;
    eval(&mut m)?;
    // One sample (rank 1) gives the row of the batch's result.
    let one = batch.get(2)?;
    let y1 = m.forward(&one)?;
    assert_eq!(y1.dims(), &[2]);
    assert_eq!(
        y1.to_vec1::<f32>()?,
        m.forward(&batch)?.get(2)?.to_vec1::<f32>()?
    );
    // A rank-1 forward is enough for convert to find the producers, and the converted model
    // takes rank 1 too, agreeing code for code.
    let mut int8 = m.clone();
    int8.forward(&one)?;
    convert(&mut int8)?;
    assert_eq!(int8.forward(&one)?.to_vec1::<f32>()?, y1.to_vec1::<f32>()?);
    Ok(())
}

#[test]
fn write_failures_say_cannot_write() -> candle_qat::Result<()> {
    let dir = std::env::temp_dir().join("candle-qat-no-such-dir/nested");
    let mut m = prepared()?;
    let varmap = candle_nn::VarMap::new();
    let e = save_qat_checkpoint(&mut m, &varmap, dir.join("qat.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cannot write"), "{e}");
    assert!(!e.contains("cannot load"), "{e}");
    assert!(e.contains("directory exists"), "{e}");
    m.forward(&x(&[2, 2, 2, 2])?)?;
    disable_observer(&mut m)?;
    eval(&mut m)?;
    let mut int8 = m.clone();
    int8.forward(&x(&[2, 2, 2, 2])?)?;
    convert(&mut int8)?;
    let e = save_int8(&mut int8, dir.join("int8.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("cannot write"), "{e}");
    let e = export_onnx(
        &int8,
        |m, x| m.forward(x),
        &x(&[1, 2, 2, 2])?,
        dir.join("m.onnx"),
        &ExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("cannot write the ONNX file"), "{e}");
    Ok(())
}

/// Linear without a QuantStub before it.
#[derive(Clone, Quantizable)]
struct NoStub {
    fc: Linear,
    dequant: DeQuantStub,
}

#[test]
fn a_missing_quant_stub_is_not_a_pass_order_error() -> candle_qat::Result<()> {
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let mut m = NoStub {
        fc: Linear::new(12, 2, true, vb.pp("fc"))?,
        dequant: DeQuantStub::new(),
    };
    prepare_x86(&mut m)?;
    m.dequant.forward(&m.fc.forward(&x(&[2, 12])?)?)?;
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(!e.contains("wrong pass order"), "{e}");
    assert!(e.contains("in module `fc`"), "{e}");
    assert!(e.starts_with("in module `fc`: quantized region:"), "{e}");
    assert!(e.contains("insert a QuantStub"), "{e}");
    Ok(())
}
