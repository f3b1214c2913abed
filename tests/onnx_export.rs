//! ONNX QDQ export: MnistNet and the residual example's net, trained briefly on the embedded
//! MNIST subset, converted and exported. This test checks the files' structure (read back
//! with the generated protobuf types) and the exporter's errors; it also leaves, in
//! `QAT_ONNX_DIR` (default: a directory under the target dir), the two models, the 1,000
//! test images and the converted models' outputs on them, which `tests/onnx/check_onnx.py`
//! (run by `.ci/run`) compares with onnxruntime and `tools/tract-check` with tract (with the
//! x86 MnistNet also exported with `per_tensor_weights(true)`).

#[path = "../examples/common/idx.rs"]
mod idx;
#[path = "../examples/common/mnist_net.rs"]
mod mnist_net;
#[path = "common/mnist_onnx.rs"]
mod mnist_onnx;
#[path = "../examples/common/residual_net.rs"]
mod residual_net;
#[path = "../examples/common/trainer.rs"]
mod trainer;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::model::QuantModule;
use candle_qat::onnx::proto::{tensor_proto::DataType, ModelProto, NodeProto};
use candle_qat::onnx::{export_onnx, export_onnx_prepared, to_onnx, ExportOptions};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use prost::Message;

use idx::Mnist;
use mnist_onnx::{epoch, out_dir};
use trainer::{AnyResult, Rng};

/// A model trained one float epoch; returns its variables.
fn float_trained<M: Quantizable + Module>(
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
    data: &Mnist,
    lr: f64,
) -> AnyResult<VarMap> {
    let vm = VarMap::new();
    let mut net = build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    trainer::init_weights(&vm, &mut Rng::new(7))?;
    train(&mut net)?;
    epoch(&net, &vm, data, lr, 11)?;
    Ok(vm)
}

/// From the float weights: one QAT epoch with `mapping`, BN statistics and observers frozen,
/// one eval pass for the input records, convert.
fn converted<M: Quantizable + Module>(
    build: impl Fn(VarBuilder) -> candle_qat::Result<M>,
    float: &VarMap,
    mapping: &QConfigMapping,
    data: &Mnist,
) -> AnyResult<M> {
    let dev = Device::Cpu;
    let mut vm = VarMap::new();
    let mut net = build(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    trainer::copy_varmap(float, &mut vm)?;
    fuse_modules_qat(&mut net)?;
    prepare_qat(&mut net, mapping)?;
    train(&mut net)?;
    epoch(&net, &vm, data, 0.005, 12)?;
    freeze_bn_stats(&mut net)?;
    disable_observer(&mut net)?;
    eval(&mut net)?;
    let (x, _) = data.test.batch(&(0..64).collect::<Vec<_>>(), &dev)?;
    net.forward(&x)?;
    convert(&mut net)?;
    Ok(net)
}

fn ops(m: &ModelProto) -> Vec<&NodeProto> {
    m.graph
        .as_ref()
        .map(|g| g.node.iter().collect())
        .unwrap_or_default()
}

fn count(m: &ModelProto, op: &str) -> usize {
    ops(m)
        .iter()
        .filter(|n| n.op_type.as_deref() == Some(op))
        .count()
}

/// The producer of each tensor.
fn producers(m: &ModelProto) -> HashMap<&str, &NodeProto> {
    ops(m)
        .into_iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect()
}

/// Checks what any exported converted model must satisfy: opset 13, a float input, every
/// Conv/Gemm reading dequantized int8 weights (per tensor, per channel on axis 0, or either
/// when `per_tensor` is `None`)
/// and an int32 bias, every QuantizeLinear writing uint8.
fn check_qdq(m: &ModelProto, per_tensor: Option<bool>) {
    assert_eq!(m.opset_import[0].version, Some(13));
    let g = m.graph.as_ref().expect("graph");
    assert_eq!(g.input[0].name.as_deref(), Some("input"));
    assert_eq!(g.output[0].name.as_deref(), Some("output"));
    let inits: HashMap<&str, _> = g
        .initializer
        .iter()
        .map(|t| (t.name.as_deref().unwrap_or(""), t))
        .collect();
    let prod = producers(m);
    for n in ops(m) {
        let op = n.op_type.as_deref().unwrap_or("");
        if op != "Conv" && op != "Gemm" && op != "ConvTranspose" {
            continue;
        }
        // ConvTranspose weights are (in, out / groups, k...): per channel along axis 1.
        let ch_axis = usize::from(op == "ConvTranspose");
        let Some(w) = prod.get(n.input[1].as_str()) else {
            // A float layer: float weights straight from an initializer.
            assert_eq!(
                inits[n.input[1].as_str()].data_type,
                Some(DataType::Float as i32)
            );
            continue;
        };
        assert_eq!(w.op_type.as_deref(), Some("DequantizeLinear"));
        assert_eq!(
            prod[n.input[0].as_str()].op_type.as_deref(),
            Some("DequantizeLinear"),
            "{:?} reads dequantized activations",
            n.name
        );
        let codes = inits[w.input[0].as_str()];
        assert_eq!(codes.data_type, Some(DataType::Int8 as i32));
        let scale = inits[w.input[1].as_str()];
        let axis = w
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("axis"));
        match per_tensor {
            Some(true) => {
                assert!(scale.dims.is_empty(), "{:?}: per-tensor scale", n.name);
                assert!(axis.is_none());
            }
            Some(false) => {
                assert_eq!(
                    scale.dims,
                    vec![codes.dims[ch_axis]],
                    "{:?}: per-channel",
                    n.name
                );
                assert_eq!(axis.and_then(|a| a.i), Some(ch_axis as i64));
            }
            None => {}
        }
        let b = prod[n.input[2].as_str()];
        assert_eq!(
            inits[b.input[0].as_str()].data_type,
            Some(DataType::Int32 as i32)
        );
    }
    for n in ops(m) {
        if n.op_type.as_deref() == Some("QuantizeLinear") {
            assert_eq!(
                inits[n.input[2].as_str()].data_type,
                Some(DataType::Uint8 as i32)
            );
        }
    }
}

fn write_outputs<M: Quantizable + Module>(
    net: &M,
    name: &str,
    x: &Tensor,
    dir: &std::path::Path,
) -> AnyResult<ModelProto> {
    let example = x.narrow(0, 0, 2)?;
    let path = dir.join(format!("{name}.onnx"));
    let report = export_onnx(
        net,
        |m, x| m.forward(x),
        &example,
        &path,
        &ExportOptions::default(),
    )?;
    assert!(report.requantized.is_empty());
    net.forward(x)?
        .write_npy(dir.join(format!("{name}_reference.npy")))?;
    let bytes = std::fs::read(&path)?;
    Ok(ModelProto::decode(bytes.as_slice())?)
}

#[test]
fn exports_mnist_net_and_residual_net_for_onnxruntime() -> AnyResult<()> {
    let data = Mnist::embedded()?;
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let dev = Device::Cpu;
    let (x, y) = data
        .test
        .batch(&(0..data.test.n).collect::<Vec<_>>(), &dev)?;
    x.write_npy(dir.join("inputs.npy"))?;
    y.to_dtype(DType::I64)?.write_npy(dir.join("labels.npy"))?;
    let presets = [(Backend::X86, "x86"), (Backend::Qnnpack, "qnnpack")];

    let float = float_trained(mnist_net::MnistNet::new, &data, 0.05)?;
    for (backend, preset) in presets {
        let mapping = qconfig_mapping! { global => QConfig::default_qat(backend) };
        let net = converted(mnist_net::MnistNet::new, &float, &mapping, &data)?;
        let m = write_outputs(&net, &format!("mnist_net_{preset}"), &x, &dir)?;
        // x86 weights are per channel, qnnpack's per tensor.
        check_qdq(&m, Some(backend == Backend::Qnnpack));
        assert_eq!(count(&m, "Conv"), 3);
        assert_eq!(count(&m, "Gemm"), 2);
        assert_eq!(count(&m, "Flatten"), 1);
        if backend == Backend::X86 {
            // reduce_range: each of the 6 quantized activations (the stub, 3 convs, 2
            // linears) is quantized, clipped to 0..127 and quantized again.
            assert_eq!(count(&m, "QuantizeLinear"), 12);
            assert_eq!(count(&m, "Clip"), 6);

            // Per-tensor weights for tract: every weight scale a scalar, the layers listed.
            let (pt, report) = to_onnx(
                &net,
                |m, x| m.forward(x),
                &x.narrow(0, 0, 1)?,
                &ExportOptions::default().per_tensor_weights(true),
            )?;
            check_qdq(&pt, Some(true));
            assert_eq!(
                report.requantized,
                vec!["conv1", "conv2", "conv3", "fc1", "fc2"]
            );
            // tools/tract-check runs it against this model's reference outputs.
            std::fs::write(
                dir.join("mnist_net_x86_per_tensor.onnx"),
                pt.encode_to_vec(),
            )?;
        } else {
            // Full range and ReLU at zero point 0: uint8 saturation is the whole clamp.
            assert_eq!(count(&m, "QuantizeLinear"), 6);
            assert_eq!(count(&m, "Clip"), 0);
        }
    }

    let float = float_trained(residual_net::ResNet::new, &data, 0.01)?;
    for (backend, preset) in presets {
        let mapping = residual_net::qconfig_mapping(backend)?;
        let net = converted(residual_net::ResNet::new, &float, &mapping, &data)?;
        let r = write_outputs(&net, &format!("residual_{preset}"), &x, &dir)?;
        check_qdq(&r, None);
        assert_eq!(count(&r, "Conv"), 5);
        assert_eq!(count(&r, "Add"), 2);
        assert_eq!(count(&r, "MaxPool"), 2);
        // fc1 stays float: a float Gemm and its ReLU between a DeQuantStub and a QuantStub.
        assert_eq!(count(&r, "Gemm"), 2);
        let g = r.graph.as_ref().expect("graph");
        assert!(g
            .initializer
            .iter()
            .any(|t| t.name.as_deref() == Some("fc1.weight")
                && t.data_type == Some(DataType::Float as i32)));
    }
    Ok(())
}

/// A model whose forward runs a bare candle op between layers.
#[derive(Clone, Quantizable)]
struct Reshaped {
    quant: QuantStub,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Reshaped {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(Reshaped {
            quant: QuantStub::new(),
            fc: Linear::new(8, 4, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
    fn forward(&self, x: &Tensor, bare: bool) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = if bare {
            x.reshape((2, 2, 4))?.reshape((2, 8))?
        } else {
            x
        };
        self.dequant.forward(&self.fc.forward(&x)?)
    }
}

#[test]
fn export_errors_name_the_module() -> AnyResult<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut net = Reshaped::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1., (2, 8), &dev)?;
    prepare_qat(
        &mut net,
        &qconfig_mapping! { global => QConfig::default_qat(Backend::X86) },
    )?;
    net.forward(&x, false)?;
    let opts = ExportOptions::default();

    // A prepared model is not exported: convert first.
    let err = to_onnx(&net, |m, x| m.forward(x, false), &x, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("prepared") && msg.contains("convert"), "{msg}");

    // ... but export_onnx_prepared converts a clone: the same file as converting by hand,
    // and the prepared model is left as it was.
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("prepared.onnx");
    export_onnx_prepared(&net, |m, x| m.forward(x, false), &x, &path, &opts)?;
    assert_eq!(net.fc.stage(), Stage::Prepared);

    disable_observer(&mut net)?;
    eval(&mut net)?;
    net.forward(&x, false)?;
    convert(&mut net)?;
    let (ok, _) = to_onnx(&net, |m, x| m.forward(x, false), &x, &opts)?;
    assert_eq!(std::fs::read(&path)?, ok.encode_to_vec());
    assert_eq!(count(&ok, "Gemm"), 1);

    // A reshape between the stub and fc is invisible to the exporter: fc is named.
    let err = to_onnx(&net, |m, x| m.forward(x, true), &x, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("fc") && msg.contains("did not see"), "{msg}");

    // A codes tensor as the example input.
    let codes = Tensor::zeros((2, 8), DType::U8, &dev)?;
    assert!(to_onnx(&net, |m, x| m.forward(x, false), &codes, &opts).is_err());
    Ok(())
}

/// A ReLU left unfused, converted: it runs on codes (`max(q, zero point)`), exported as
/// DequantizeLinear -> Relu -> QuantizeLinear with its input's qparams and no Clip (its codes
/// already lie in the trained range).
#[derive(Clone, Quantizable)]
struct LoneRelu {
    quant: QuantStub,
    fc: Linear,
    relu: ReLU,
    dequant: DeQuantStub,
}

#[test]
fn a_lone_relu_on_codes_exports_without_a_clip() -> AnyResult<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let mut net = LoneRelu {
        quant: QuantStub::new(),
        fc: Linear::new(8, 4, true, vb.pp("fc"))?,
        relu: ReLU::new(),
        dequant: DeQuantStub::new(),
    };
    let fwd = |m: &LoneRelu, x: &Tensor| -> candle_core::Result<Tensor> {
        let x = m.fc.forward(&m.quant.forward(x)?)?;
        m.dequant.forward(&m.relu.forward(&x)?)
    };
    prepare_qat(
        &mut net,
        &qconfig_mapping! { global => QConfig::default_qat(Backend::X86) },
    )?;
    let x = Tensor::randn(0f32, 1., (16, 8), &dev)?;
    fwd(&net, &x)?;
    disable_observer(&mut net)?;
    eval(&mut net)?;
    fwd(&net, &x)?;
    convert(&mut net)?;
    let (m, _) = to_onnx(&net, fwd, &x, &ExportOptions::default())?;
    assert_eq!(count(&m, "Relu"), 1);
    // The stub and fc: quantize, clip to 0..127, quantize again; the ReLU: quantize once.
    assert_eq!(count(&m, "QuantizeLinear"), 5);
    assert_eq!(count(&m, "Clip"), 2);
    Ok(())
}

/// A 1-D model: a fused Conv1d+ReLU, a strided, padded, dilated Conv1d, and a float Conv1d
/// left unquantized between a DeQuantStub and a QuantStub.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv1, relu1))]
struct Seq1d {
    quant: QuantStub,
    conv1: Conv1d,
    relu1: ReLU,
    conv2: Conv1d,
    dequant_f: DeQuantStub,
    float_conv: Conv1d,
    quant_f: QuantStub,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Seq1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self.relu1.forward(&self.conv1.forward(&x)?)?;
        let x = self.dequant_f.forward(&self.conv2.forward(&x)?)?;
        let x = self.quant_f.forward(&self.float_conv.forward(&x)?)?;
        self.dequant
            .forward(&self.fc.forward(&self.flatten.forward(&x)?)?)
    }
}

#[test]
fn a_conv1d_model_exports_1d_convs_with_qdq() -> AnyResult<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let c2 = ConvConfig {
        padding: 2,
        stride: 2,
        dilation: 2,
        groups: 2,
    };
    let mut net = Seq1d {
        quant: QuantStub::new(),
        conv1: Conv1d::new(2, 4, 3, ConvConfig::default(), true, vb.pp("conv1"))?,
        relu1: ReLU::new(),
        conv2: Conv1d::new(4, 6, 3, c2, true, vb.pp("conv2"))?,
        dequant_f: DeQuantStub::new(),
        float_conv: Conv1d::new(6, 6, 1, ConvConfig::default(), false, vb.pp("float_conv"))?,
        quant_f: QuantStub::new(),
        flatten: Flatten::new(1),
        fc: Linear::new(6 * 7, 3, true, vb.pp("fc"))?,
        dequant: DeQuantStub::new(),
    };
    fuse_modules_qat(&mut net)?;
    prepare_qat(
        &mut net,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)).set_path("float_conv", None),
    )?;
    let x = Tensor::randn(0f32, 1., (4, 2, 16), &dev)?;
    net.forward(&x)?;
    disable_observer(&mut net)?;
    eval(&mut net)?;
    let fq_out = net.forward(&x)?;
    convert(&mut net)?;
    assert_eq!(
        fq_out.flatten_all()?.to_vec1::<f32>()?,
        net.forward(&x)?.flatten_all()?.to_vec1::<f32>()?
    );
    let (m, _) = to_onnx(&net, |m, x| m.forward(x), &x, &ExportOptions::default())?;
    check_qdq(&m, Some(false));
    let g = m.graph.as_ref().expect("graph");
    let inits: HashMap<&str, _> = g
        .initializer
        .iter()
        .map(|t| (t.name.as_deref().unwrap_or(""), t))
        .collect();
    let prod = producers(&m);
    let convs: Vec<_> = ops(&m)
        .into_iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
        .collect();
    assert_eq!(convs.len(), 3);
    let ints = |n: &NodeProto, name: &str| -> Vec<i64> {
        n.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .map(|a| a.ints.clone())
            .unwrap_or_default()
    };
    // Every Conv is 1-D: one stride and dilation, two pads, a 3-D weight.
    for n in &convs {
        assert_eq!(ints(n, "strides").len(), 1, "{:?}", n.name);
        assert_eq!(ints(n, "dilations").len(), 1, "{:?}", n.name);
        assert_eq!(ints(n, "pads").len(), 2, "{:?}", n.name);
        let w = match prod.get(n.input[1].as_str()) {
            Some(dq) => inits[dq.input[0].as_str()],
            None => inits[n.input[1].as_str()],
        };
        assert_eq!(w.dims.len(), 3, "{:?}", n.name);
    }
    let conv2 = convs[1];
    assert_eq!(ints(conv2, "strides"), vec![2]);
    assert_eq!(ints(conv2, "pads"), vec![2, 2]);
    assert_eq!(ints(conv2, "dilations"), vec![2]);
    let w2 = inits[prod[conv2.input[1].as_str()].input[0].as_str()];
    assert_eq!(w2.dims, vec![6, 2, 3]);
    assert_eq!(w2.data_type, Some(DataType::Int8 as i32));
    // The float Conv1d reads float weights.
    assert_eq!(
        inits[convs[2].input[1].as_str()].data_type,
        Some(DataType::Float as i32)
    );
    Ok(())
}

/// A transposed-convolution net on MNIST: downsample, upsample with a grouped
/// ConvTranspose2d (stride 2, padding 1, output_padding 1), a 1-D-free head.
#[derive(Clone, Quantizable)]
struct UpNet {
    quant: QuantStub,
    conv1: Conv2d,
    relu1: ReLU,
    up: ConvTranspose2d,
    relu2: ReLU,
    conv2: Conv2d,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl UpNet {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let down = ConvConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let up = ConvTransposeConfig {
            padding: 1,
            output_padding: 1,
            stride: 2,
            groups: 2,
            ..Default::default()
        };
        let head = ConvConfig {
            stride: 4,
            ..Default::default()
        };
        Ok(UpNet {
            quant: QuantStub::new(),
            conv1: Conv2d::new(1, 8, 3, down, true, vb.pp("conv1"))?,
            relu1: ReLU::new(),
            up: ConvTranspose2d::new(8, 8, 3, up, true, vb.pp("up"))?,
            relu2: ReLU::new(),
            conv2: Conv2d::new(8, 4, 4, head, true, vb.pp("conv2"))?,
            flatten: Flatten::new(1),
            fc: Linear::new(4 * 7 * 7, 10, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for UpNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self.relu1.forward(&self.conv1.forward(&x)?)?;
        let x = self.relu2.forward(&self.up.forward(&x)?)?;
        let x = self.flatten.forward(&self.conv2.forward(&x)?)?;
        self.dequant.forward(&self.fc.forward(&x)?)
    }
}

/// A converted ConvTranspose2d exports as ONNX's ConvTranspose behind QDQ: its int8 weight
/// in ONNX's layout `(in, out / groups, kh, kw)`, per channel on axis 1 (x86) or per tensor
/// (qnnpack), an int32 bias per output channel; the models go to `check_onnx.py`
/// (onnxruntime). The int8 file round-trips the layer exactly.
#[test]
fn a_conv_transpose_net_exports_and_round_trips() -> AnyResult<()> {
    use candle_qat::checkpoint::{load_int8, save_int8};
    let data = Mnist::embedded()?;
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let dev = Device::Cpu;
    let (x, y) = data
        .test
        .batch(&(0..data.test.n).collect::<Vec<_>>(), &dev)?;
    x.write_npy(dir.join("inputs.npy"))?;
    y.to_dtype(DType::I64)?.write_npy(dir.join("labels.npy"))?;
    let float = float_trained(UpNet::new, &data, 0.05)?;
    for (backend, preset) in [(Backend::X86, "x86"), (Backend::Qnnpack, "qnnpack")] {
        let mapping = qconfig_mapping! { global => QConfig::default_qat(backend) };
        let net = converted(UpNet::new, &float, &mapping, &data)?;
        assert_eq!(net.up.kind(), "ConvTranspose2d");
        let m = write_outputs(&net, &format!("conv_transpose_{preset}"), &x, &dir)?;
        check_qdq(&m, Some(backend == Backend::Qnnpack));
        assert_eq!(count(&m, "ConvTranspose"), 1);
        assert_eq!(count(&m, "Conv"), 2);
        let g = m.graph.as_ref().expect("graph");
        let inits: HashMap<&str, _> = g
            .initializer
            .iter()
            .map(|t| (t.name.as_deref().unwrap_or(""), t))
            .collect();
        let prod = producers(&m);
        let node = ops(&m)
            .into_iter()
            .find(|n| n.op_type.as_deref() == Some("ConvTranspose"))
            .expect("ConvTranspose");
        let attr = |name: &str| {
            node.attribute
                .iter()
                .find(|a| a.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(attr("strides").ints, vec![2, 2]);
        assert_eq!(attr("pads").ints, vec![1, 1, 1, 1]);
        assert_eq!(attr("output_padding").ints, vec![1, 1]);
        assert_eq!(attr("dilations").ints, vec![1, 1]);
        assert_eq!(attr("group").i, Some(2));
        let wdq = prod[node.input[1].as_str()];
        let wq = inits[wdq.input[0].as_str()];
        // ONNX's layout: (in, out / groups, kh, kw).
        assert_eq!(wq.dims, vec![8, 4, 3, 3]);
        let ws = inits[wdq.input[1].as_str()];
        let axis = wdq
            .attribute
            .iter()
            .find(|a| a.name.as_deref() == Some("axis"))
            .and_then(|a| a.i);
        if backend == Backend::X86 {
            assert_eq!(ws.dims, vec![4]);
            assert_eq!(axis, Some(1));
        } else {
            assert!(ws.dims.is_empty());
            assert_eq!(axis, None);
        }
        let bdq = prod[node.input[2].as_str()];
        let bq = inits[bdq.input[0].as_str()];
        assert_eq!(bq.dims, vec![8]);
        assert_eq!(bq.data_type, Some(DataType::Int32 as i32));

        // save_int8 / load_int8: the same codes, in PyTorch's weight layout.
        let file = dir.join(format!("conv_transpose_{preset}.safetensors"));
        let mut a = net.clone();
        save_int8(&mut a, &file)?;
        let mut b = UpNet::new(VarBuilder::zeros(DType::F32, &dev))?;
        load_int8(&mut b, &file)?;
        let sa = net.up.int8_state().expect("converted");
        let sb = b.up.int8_state().expect("loaded");
        assert_eq!(sa, sb);
        assert_eq!(sa.weight_shape, vec![8, 4, 3, 3]);
        let xs = x.narrow(0, 0, 64)?;
        assert_eq!(
            net.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?,
            b.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?
        );
    }
    Ok(())
}

/// QuantStub -> ConvTranspose1d -> DeQuantStub.
#[derive(Clone, Quantizable)]
struct Up1d {
    quant: QuantStub,
    up: ConvTranspose1d,
    dequant: DeQuantStub,
}

impl Module for Up1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dequant
            .forward(&self.up.forward(&self.quant.forward(x)?)?)
    }
}

/// ConvTranspose1d: the converted model equals the fake-quant model code for code and
/// exports a 1-D ConvTranspose (one stride, two pads, a 3-D weight per channel on axis 1).
#[test]
fn a_conv_transpose1d_converts_exactly_and_exports() -> AnyResult<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let c = ConvTransposeConfig {
        padding: 1,
        output_padding: 2,
        stride: 3,
        dilation: 1,
        groups: 2,
    };
    let mut net = Up1d {
        quant: QuantStub::new(),
        up: ConvTranspose1d::new(4, 6, 3, c, true, vb.pp("up"))?,
        dequant: DeQuantStub::new(),
    };
    prepare_qat(
        &mut net,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
    let x = Tensor::randn(0f32, 1., (3, 4, 9), &dev)?;
    net.forward(&x)?;
    disable_observer(&mut net)?;
    eval(&mut net)?;
    let fq_out = net.forward(&x)?;
    convert(&mut net)?;
    let int_out = net.forward(&x)?;
    assert_eq!(int_out.dims(), &[3, 6, 27]);
    assert_eq!(
        fq_out.flatten_all()?.to_vec1::<f32>()?,
        int_out.flatten_all()?.to_vec1::<f32>()?
    );
    // check_onnx.py runs it in onnxruntime on its own input.
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("conv_transpose1d_x86.onnx");
    export_onnx(
        &net,
        |m, x| m.forward(x),
        &x,
        &path,
        &ExportOptions::default(),
    )?;
    x.write_npy(dir.join("conv_transpose1d_x86_input.npy"))?;
    int_out.write_npy(dir.join("conv_transpose1d_x86_reference.npy"))?;
    let m = ModelProto::decode(std::fs::read(&path)?.as_slice())?;
    check_qdq(&m, Some(false));
    let node = ops(&m)
        .into_iter()
        .find(|n| n.op_type.as_deref() == Some("ConvTranspose"))
        .expect("ConvTranspose");
    let ints = |name: &str| -> Vec<i64> {
        node.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .map(|a| a.ints.clone())
            .unwrap_or_default()
    };
    assert_eq!(ints("strides"), vec![3]);
    assert_eq!(ints("pads"), vec![1, 1]);
    assert_eq!(ints("output_padding"), vec![2]);
    let prod = producers(&m);
    let g = m.graph.as_ref().expect("graph");
    let wdq = prod[node.input[1].as_str()];
    let wq = g
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(wdq.input[0].as_str()))
        .expect("weight");
    assert_eq!(wq.dims, vec![4, 3, 3]);

    // Per-tensor weights (for runtimes without per-channel ConvTranspose): one scale, the
    // largest column's, and the layer reported as requantized.
    let (pt, report) = to_onnx(
        &net,
        |m, x| m.forward(x),
        &x,
        &ExportOptions::default().per_tensor_weights(true),
    )?;
    check_qdq(&pt, Some(true));
    assert_eq!(report.requantized, vec!["up"]);
    Ok(())
}
