//! MobileNetV2-0.35 (examples/common/mobilenet_v2.rs: 17 inverted residual blocks with
//! depthwise convs, FloatFunctional skips, a global average pool) through the whole pipeline
//! on the embedded MNIST subset: float training, fuse with live BN, prepare, QAT, freeze,
//! convert, save_int8 / load_int8 into a model built from zeros, ONNX export. Prints the
//! accuracies; leaves in `QAT_ONNX_DIR` the exports and the converted models' outputs on the
//! 1,000 test images, which `tests/onnx/check_onnx.py` compares with onnxruntime.

#[path = "../examples/common/idx.rs"]
mod idx;
#[path = "common/mnist_onnx.rs"]
mod mnist_onnx;
#[path = "../examples/common/mobilenet_v2.rs"]
mod mobilenet_v2;
#[path = "common/onnx_op_count.rs"]
mod onnx_op_count;
#[path = "../examples/common/trainer.rs"]
mod trainer;

use candle_core::{DType, Device, Module};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::checkpoint::{load_int8, save_int8};
use candle_qat::onnx::{export_onnx, ExportOptions};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

use idx::Mnist;
use mnist_onnx::{epoch, out_dir};
use mobilenet_v2::MobileNetV2;
use onnx_op_count::op_count;
use trainer::{AnyResult, Rng};

fn test_accuracy<M: Module>(net: &M, data: &Mnist, label: &str) -> AnyResult<(Vec<u32>, f64)> {
    let preds = trainer::predict(net, &data.test, 250, label, &Device::Cpu)?;
    let acc = trainer::accuracy(&preds, &data.test);
    Ok((preds, acc))
}

#[test]
fn mobilenet_v2_through_the_whole_pipeline() -> AnyResult<()> {
    let dev = Device::Cpu;
    let data = Mnist::embedded()?;
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let (x_test, y_test) = data
        .test
        .batch(&(0..data.test.n).collect::<Vec<_>>(), &dev)?;
    x_test.write_npy(dir.join("inputs.npy"))?;
    y_test
        .to_dtype(DType::I64)?
        .write_npy(dir.join("labels.npy"))?;

    // Float: one epoch.
    let float = VarMap::new();
    let t0 = std::time::Instant::now();
    let mut net = MobileNetV2::new(VarBuilder::from_varmap(&float, DType::F32, &dev))?;
    assert_eq!(net.blocks(), 17);
    trainer::init_weights(&float, &mut Rng::new(7))?;
    train(&mut net)?;
    epoch(&net, &float, &data, 0.05, 11)?;
    eval(&mut net)?;
    let (_, float_acc) = test_accuracy(&net, &data, "float")?;
    println!("float phase {:?}", t0.elapsed());

    for (backend, preset) in [(Backend::X86, "x86"), (Backend::Qnnpack, "qnnpack")] {
        let mut vm = VarMap::new();
        let mut q = MobileNetV2::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        trainer::copy_varmap(&float, &mut vm)?;
        fuse_modules_qat(&mut q)?;
        prepare_qat(
            &mut q,
            &qconfig_mapping! { global => QConfig::default_qat(backend) },
        )?;
        train(&mut q)?;
        epoch(&q, &vm, &data, 0.005, 13)?;
        freeze_bn_stats(&mut q)?;
        disable_observer(&mut q)?;
        eval(&mut q)?;
        let (fq_preds, qat_acc) = test_accuracy(&q, &data, "qat")?;
        let fq_out = q.forward(&x_test)?;
        convert(&mut q)?;
        let (int8_preds, int8_acc) = test_accuracy(&q, &data, "int8")?;
        let int8_out = q.forward(&x_test)?;
        // The default global pool fake-quantizes on its input's grid, so the int8 model is
        // the fake-quant model: same outputs, bit for bit.
        assert_eq!(
            int8_out.flatten_all()?.to_vec1::<f32>()?,
            fq_out.flatten_all()?.to_vec1::<f32>()?,
            "{preset}: int8 equals the fake-quant model"
        );
        assert_eq!(int8_preds, fq_preds);

        // save_int8 -> load_int8 into a model built from zeros: the same outputs.
        let path = dir.join(format!("mobilenet_v2_{preset}.safetensors"));
        save_int8(&mut q, &path)?;
        let mut loaded = MobileNetV2::new(VarBuilder::zeros(DType::F32, &dev))?;
        fuse_modules_qat(&mut loaded)?;
        load_int8(&mut loaded, &path)?;
        assert_eq!(
            loaded.forward(&x_test)?.flatten_all()?.to_vec1::<f32>()?,
            int8_out.flatten_all()?.to_vec1::<f32>()?,
            "{preset}: the loaded int8 model"
        );

        // ONNX, with the converted model's outputs for check_onnx.py.
        let onnx = dir.join(format!("mobilenet_v2_{preset}.onnx"));
        let report = export_onnx(
            &q,
            |m, x| m.forward(x),
            &x_test.narrow(0, 0, 2)?,
            &onnx,
            &ExportOptions::default(),
        )?;
        let count = |op: &str| op_count(&report, op);
        // stem + 17 x (expand?, dw, project) + last: 1 + 16 * 3 + 2 + 1 = 52 convs.
        assert_eq!(count("Conv"), 52, "{:?}", report.op_counts);
        assert_eq!(count("GlobalAveragePool"), 1);
        assert_eq!(count("Add"), 10, "one per skip");
        int8_out.write_npy(dir.join(format!("mobilenet_v2_{preset}_reference.npy")))?;
        println!(
            "MobileNetV2-0.35 {preset}: float {:.2}%, QAT fake-quant {:.2}%, int8 {:.2}% \
             (1,000 test images, 4,000 train, 1 float + 1 QAT epoch)",
            100.0 * float_acc,
            100.0 * qat_acc,
            100.0 * int8_acc
        );
        assert!(int8_acc > 0.85, "{preset}: int8 accuracy {int8_acc}");
    }
    Ok(())
}
