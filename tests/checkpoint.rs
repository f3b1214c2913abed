//! Save and load: a prepared model mid-training resumes with identical results; a converted
//! model loads back into the same struct with identical outputs; mismatches are errors.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{loss, Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::checkpoint::{load_int8, load_qat_checkpoint, save_int8, save_qat_checkpoint};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

#[path = "../examples/common/residual_net.rs"]
mod residual_net;

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

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-qat-ckpt2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// The residual example's net (fc1 kept float between a DeQuantStub and a QuantStub),
/// calibrated and converted.
fn converted_resnet(backend: Backend) -> candle_qat::Result<residual_net::ResNet> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut m = residual_net::ResNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    fuse_modules_qat(&mut m)?;
    prepare_qat(&mut m, &residual_net::qconfig_mapping(backend)?)?;
    for s in 0..3 {
        m.forward(&(Tensor::randn(0f32, 1., (8, 1, 28, 28), &dev)? * (1.0 + s as f64))?)?;
    }
    disable_observer(&mut m)?;
    freeze_bn_stats(&mut m)?;
    eval(&mut m)?;
    m.forward(&Tensor::randn(0f32, 1., (2, 1, 28, 28), &dev)?)?;
    convert(&mut m)?;
    Ok(m)
}

fn fresh_resnet() -> candle_qat::Result<residual_net::ResNet> {
    let mut m = residual_net::ResNet::new(VarBuilder::zeros(DType::F32, &Device::Cpu))?;
    fuse_modules_qat(&mut m)?;
    Ok(m)
}

fn outputs<M: Module>(m: &M) -> candle_qat::Result<Vec<f32>> {
    let x = Tensor::randn(0f32, 1., (4, 1, 28, 28), &Device::Cpu)?;
    let x = (x * 2.0)?;
    Ok(m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The int8 file is the whole deployed model: loaded into a model built from
/// `VarBuilder::zeros`, the float fc1 gets its weights back and the outputs are exact.
#[test]
fn int8_file_restores_float_layers_into_a_zero_model() -> candle_qat::Result<()> {
    for backend in [Backend::X86, Backend::Qnnpack] {
        let a = converted_resnet(backend)?;
        let mut a2 = a.clone();
        let file = tmp(&format!("resnet-{backend:?}.safetensors"));
        save_int8(&mut a2, &file)?;
        let mut b = fresh_resnet()?;
        load_int8(&mut b, &file)?;
        let x = (Tensor::randn(0f32, 1., (6, 1, 28, 28), &Device::Cpu)? * 2.0)?;
        let ya = a.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        let yb = b.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(ya, yb, "{backend:?}");
        // Not trivially: the outputs vary from image to image (a zero fc1 would give every
        // image the same logits).
        assert!(ya.chunks(10).any(|r| r != &ya[..10]));
        // The loaded model saves and loads again, with the same outputs.
        let again = tmp(&format!("resnet-{backend:?}-again.safetensors"));
        save_int8(&mut b, &again)?;
        let mut c = fresh_resnet()?;
        load_int8(&mut c, &again)?;
        assert_eq!(ya, c.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(())
}

/// Rewrites a safetensors file: `edit` may change any tensor's bytes (same length) and the
/// metadata; the checksum is recomputed as candle-qat defines it (64-bit FNV-1a over each
/// tensor in name order: name, 0xff, dtype, rank and dims as u64 LE, byte count as u64 LE,
/// bytes; then each metadata entry but `checksum` in key order: key, 0xff, value, 0xff)
/// unless `keep_checksum`.
fn rewrite(
    path: &std::path::Path,
    out: &std::path::Path,
    keep_checksum: bool,
    edit: impl Fn(&str, &mut [u8]),
    edit_meta: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let mut names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    names.sort();
    for name in &names {
        let o = &header[name]["data_offsets"];
        let (b, e) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        edit(name, &mut data[b..e]);
    }
    let meta = header
        .get_mut("__metadata__")
        .and_then(|m| m.as_object_mut())
        .unwrap();
    edit_meta(meta);
    if !keep_checksum {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut put = |bs: &[u8]| {
            for &b in bs {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for name in &names {
            let t = &header[name];
            let o = &t["data_offsets"];
            let (b, e) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            put(name.as_bytes());
            put(&[0xff]);
            put(t["dtype"].as_str().unwrap().as_bytes());
            let shape = t["shape"].as_array().unwrap();
            put(&(shape.len() as u64).to_le_bytes());
            for d in shape {
                put(&d.as_u64().unwrap().to_le_bytes());
            }
            put(&((e - b) as u64).to_le_bytes());
            put(&data[b..e]);
        }
        let meta = header["__metadata__"].as_object().unwrap();
        let mut keys: Vec<&String> = meta.keys().filter(|k| *k != "checksum").collect();
        keys.sort();
        for k in keys {
            put(k.as_bytes());
            put(&[0xff]);
            put(meta[k].as_str().unwrap().as_bytes());
            put(&[0xff]);
        }
        header["__metadata__"]["checksum"] = format!("fnv1a64:{h:016x}").into();
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut bytes = (head.len() as u64).to_le_bytes().to_vec();
    bytes.extend(head);
    bytes.extend(data);
    std::fs::write(out, bytes).unwrap();
}

fn set_f32(bytes: &mut [u8], i: usize, v: f32) {
    bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}

/// Asserts `load_int8` into a fresh model fails with a message holding every `needle`, and
/// leaves the model unconverted and still running in float.
fn refused(file: &std::path::Path, needles: &[&str]) -> candle_qat::Result<()> {
    let mut b = fresh_resnet()?;
    let before = outputs(&b)?;
    let e = load_int8(&mut b, file).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    for info in named_modules(&b)? {
        assert_ne!(info.stage, Stage::Converted, "{}", info.path);
    }
    assert_eq!(before, outputs(&b)?);
    Ok(())
}

#[test]
fn int8_load_refuses_damaged_and_invalid_files() -> candle_qat::Result<()> {
    let mut a = converted_resnet(Backend::X86)?;
    let good = tmp("good.safetensors");
    save_int8(&mut a, &good)?;
    let bad = tmp("bad.safetensors");
    let none = |_: &mut serde_json::Map<String, serde_json::Value>| {};
    // One flipped bit in fc2's weight codes: the checksum no longer matches.
    rewrite(
        &good,
        &bad,
        true,
        |n, b| {
            if n == "fc2.weight" {
                b[3] ^= 0x10;
            }
        },
        none,
    );
    refused(&bad, &["checksum", "damaged"])?;
    // A truncated file.
    let bytes = std::fs::read(&good).map_err(candle_core::Error::wrap)?;
    std::fs::write(&bad, &bytes[..bytes.len() - 100]).map_err(candle_core::Error::wrap)?;
    refused(&bad, &["bad.safetensors"])?;
    std::fs::write(&bad, &bytes[..5]).map_err(candle_core::Error::wrap)?;
    refused(&bad, &["bad.safetensors"])?;
    // Values no converted model holds, with a valid checksum.
    rewrite(
        &good,
        &bad,
        false,
        |n, b| {
            if n == "fc2.bias" {
                set_f32(b, 3, f32::NAN);
            }
        },
        none,
    );
    refused(&bad, &["fc2.bias", "NaN"])?;
    rewrite(
        &good,
        &bad,
        false,
        |n, b| {
            if n == "stem.weight_scale" {
                set_f32(b, 0, f32::INFINITY);
            }
        },
        none,
    );
    refused(&bad, &["stem.weight_scale", "inf"])?;
    rewrite(
        &good,
        &bad,
        false,
        |n, b| {
            if n == "fc1.weight" {
                set_f32(b, 7, f32::NAN);
            }
        },
        none,
    );
    refused(&bad, &["fc1.weight", "NaN"])?;
    rewrite(
        &good,
        &bad,
        false,
        |n, b| {
            if n == "quant.output_qrange" {
                b[..4].copy_from_slice(&300i32.to_le_bytes());
            }
        },
        none,
    );
    refused(&bad, &["quant.output", "zero point 300"])?;
    // fc2's input qparams no longer those quant_fc2 outputs.
    rewrite(
        &good,
        &bad,
        false,
        |n, b| {
            if n == "fc2.input_scale" {
                let v = f32::from_le_bytes(b[..4].try_into().unwrap());
                set_f32(b, 0, v * 1.5);
            }
        },
        none,
    );
    refused(&bad, &["input 0 of `fc2`", "quant_fc2"])?;
    // A first-version file is refused with a message to save it again.
    rewrite(
        &good,
        &bad,
        false,
        |_, _| {},
        |m| {
            m.insert("format".into(), "candle-qat/int8/1".into());
        },
    );
    refused(
        &bad,
        &["candle-qat/int8/1", "save the model again", "save_int8"],
    )?;
    // The untouched file still loads (the rewrite itself is faithful).
    rewrite(&good, &bad, false, |_, _| {}, none);
    load_int8(&mut fresh_resnet()?, &bad)?;
    Ok(())
}

/// `Net` with one more layer at the end.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu), fuse(fc1, relu1))]
struct NetExtra {
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
    extra: Linear,
}

/// `Net` without its DeQuantStub.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu), fuse(fc1, relu1))]
struct NetMissing {
    quant: QuantStub,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
    pool: MaxPool2d,
    flatten: Flatten,
    fc1: Linear,
    relu1: ReLU,
    fc2: Linear,
}

/// `Net` with `fc2` named `head`.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu), fuse(fc1, relu1))]
struct NetRenamed {
    quant: QuantStub,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
    pool: MaxPool2d,
    flatten: Flatten,
    fc1: Linear,
    relu1: ReLU,
    head: Linear,
    dequant: DeQuantStub,
}

impl NetExtra {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let n = Net::new(vb.clone(), 4)?;
        Ok(NetExtra {
            quant: n.quant,
            conv: n.conv,
            bn: n.bn,
            relu: n.relu,
            pool: n.pool,
            flatten: n.flatten,
            fc1: n.fc1,
            relu1: n.relu1,
            fc2: n.fc2,
            dequant: n.dequant,
            extra: Linear::new(4, 4, true, vb.pp("extra"))?,
        })
    }
}

impl NetMissing {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let n = Net::new(vb, 4)?;
        Ok(NetMissing {
            quant: n.quant,
            conv: n.conv,
            bn: n.bn,
            relu: n.relu,
            pool: n.pool,
            flatten: n.flatten,
            fc1: n.fc1,
            relu1: n.relu1,
            fc2: n.fc2,
        })
    }
}

impl NetRenamed {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let n = Net::new(vb, 4)?;
        Ok(NetRenamed {
            quant: n.quant,
            conv: n.conv,
            bn: n.bn,
            relu: n.relu,
            pool: n.pool,
            flatten: n.flatten,
            fc1: n.fc1,
            relu1: n.relu1,
            head: n.fc2,
            dequant: n.dequant,
        })
    }
}

/// The stage of every layer, to check a failed load changed nothing.
fn stages<M: Quantizable>(m: &M) -> candle_qat::Result<Vec<(String, Stage, String)>> {
    Ok(named_modules(m)?
        .into_iter()
        .map(|i| (i.path, i.stage, i.kind))
        .collect())
}

/// Loads `file` into `m` expecting an error holding every needle; `m` must be unchanged.
fn load_fails<M: Quantizable>(
    m: &mut M,
    load: impl Fn(&mut M) -> candle_qat::Result<()>,
    needles: &[&str],
) -> candle_qat::Result<()> {
    let before = stages(m)?;
    let e = load(m).unwrap_err().to_string();
    for n in needles {
        assert!(e.contains(n), "{n:?} not in: {e}");
    }
    assert_eq!(before, stages(m)?);
    Ok(())
}

#[test]
fn loads_into_another_structure_name_the_first_difference() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let zeros = || VarBuilder::zeros(DType::F32, &dev);
    let va = VarMap::new();
    let mut a = prepared(&va, 4, Backend::X86)?;
    steps(&a, &va, 0, 2)?;
    let qat_file = tmp("structure-qat.safetensors");
    save_qat_checkpoint(&mut a, &va, &qat_file)?;
    eval(&mut a)?;
    a.forward(&data(0)?.0)?;
    convert(&mut a)?;
    let int8_file = tmp("structure-int8.safetensors");
    save_int8(&mut a, &int8_file)?;
    let int8 = |m: &mut _| load_int8(m, &int8_file);

    // Not fused.
    let mut m = Net::new(zeros(), 4)?;
    load_fails(
        &mut m,
        int8,
        &["`conv`", "is ConvBnReLU2d in the file but Conv2d", "fuse"],
    )?;
    // Fused the other way (BN folded, so no BN in the kind).
    let mut m = Net::new(zeros(), 4)?;
    fuse_modules(&mut m)?;
    load_fails(&mut m, int8, &["ConvBnReLU2d in the file but ConvReLU2d"])?;
    // Prepared.
    let vm = VarMap::new();
    let mut m = prepared(&vm, 4, Backend::X86)?;
    load_fails(
        &mut m,
        int8,
        &[
            "`quant`",
            "was saved Converted, the model's is Prepared",
            "not prepared",
        ],
    )?;
    // Converted already.
    let mut m = a.clone();
    load_fails(&mut m, int8, &["already converted"])?;
    // Extra, missing and renamed layers.
    let mut m = NetExtra::new(zeros())?;
    fuse_modules_qat(&mut m)?;
    load_fails(
        &mut m,
        |m| load_int8(m, &int8_file),
        &["the file has no `extra`"],
    )?;
    let mut m = NetMissing::new(zeros())?;
    fuse_modules_qat(&mut m)?;
    load_fails(
        &mut m,
        |m| load_int8(m, &int8_file),
        &["the model has no `dequant`"],
    )?;
    let mut m = NetRenamed::new(zeros())?;
    fuse_modules_qat(&mut m)?;
    load_fails(
        &mut m,
        |m| load_int8(m, &int8_file),
        &["`fc2` (Linear) in the file but `head` (Linear) in the model"],
    )?;
    // Other layer sizes.
    let mut m = Net::new(zeros(), 6)?;
    fuse_modules_qat(&mut m)?;
    load_fails(&mut m, int8, &["conv.weight", "shape"])?;
    // The right structure loads.
    let mut m = Net::new(zeros(), 4)?;
    fuse_modules_qat(&mut m)?;
    load_int8(&mut m, &int8_file)?;

    // The QAT checkpoint: into a fused but unprepared model, an unfused prepared one, and
    // one with an extra layer; the VarMap is left as it was.
    let qat = |vm: &VarMap| {
        let vm = vm.clone();
        let f = qat_file.clone();
        move |m: &mut Net| load_qat_checkpoint(m, &vm, &f)
    };
    let vm = VarMap::new();
    let mut m = Net::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 4)?;
    fuse_modules_qat(&mut m)?;
    let w0 = m.conv.weight().flatten_all()?.to_vec1::<f32>()?;
    load_fails(
        &mut m,
        qat(&vm),
        &[
            "`quant`",
            "saved Prepared, the model's is Float",
            "prepare_qat",
        ],
    )?;
    assert_eq!(w0, m.conv.weight().flatten_all()?.to_vec1::<f32>()?);
    let vm = VarMap::new();
    let mut m = Net::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 4)?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
    load_fails(&mut m, qat(&vm), &["ConvBnReLU2d in the file but Conv2d"])?;
    let vm = VarMap::new();
    let mut m = NetExtra::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    fuse_modules_qat(&mut m)?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
    load_fails(
        &mut m,
        |m| load_qat_checkpoint(m, &vm, &qat_file),
        &["the file has no `extra`"],
    )?;
    // A flipped byte in the QAT file.
    let bad = tmp("structure-qat-bad.safetensors");
    let mut bytes = std::fs::read(&qat_file).map_err(candle_core::Error::wrap)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&bad, bytes).map_err(candle_core::Error::wrap)?;
    let vm = VarMap::new();
    let mut m = prepared(&vm, 4, Backend::X86)?;
    load_fails(&mut m, |m| load_qat_checkpoint(m, &vm, &bad), &["checksum"])?;
    Ok(())
}

/// A 1-D model with a float head: Conv1d converts to int8 and saves; the loaded model's
/// outputs are exact.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu))]
struct Seq1d {
    quant: QuantStub,
    conv: Conv1d,
    bn: BatchNorm1d,
    relu: ReLU,
    flatten: Flatten,
    dequant: DeQuantStub,
    norm: BatchNorm1d,
    head: Linear,
}

impl Seq1d {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let c = ConvConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        Ok(Seq1d {
            quant: QuantStub::new(),
            conv: Conv1d::new(2, 4, 3, c, true, vb.pp("conv"))?,
            bn: BatchNorm1d::new(4, BatchNormConfig::default(), vb.pp("bn"))?,
            relu: ReLU::new(),
            flatten: Flatten::new(1),
            dequant: DeQuantStub::new(),
            norm: BatchNorm1d::new(32, BatchNormConfig::default(), vb.pp("norm"))?,
            head: Linear::new(32, 3, true, vb.pp("head"))?,
        })
    }
}

impl Module for Seq1d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu
            .forward(&self.bn.forward(&self.conv.forward(&x)?)?)?;
        let x = self.dequant.forward(&self.flatten.forward(&x)?)?;
        self.head.forward(&self.norm.forward(&x)?)
    }
}

#[test]
fn conv1d_model_with_float_head_round_trips() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let mut a = Seq1d::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
    fuse_modules_qat(&mut a)?;
    let mapping = QConfigMapping::global(QConfig::default_qat(Backend::X86))
        .set_path("norm", None)
        .set_path("head", None);
    prepare_qat(&mut a, &mapping)?;
    for _ in 0..3 {
        a.forward(&Tensor::randn(0f32, 1., (8, 2, 16), &dev)?)?;
    }
    disable_observer(&mut a)?;
    eval(&mut a)?;
    a.forward(&Tensor::randn(0f32, 1., (2, 2, 16), &dev)?)?;
    convert(&mut a)?;
    let file = tmp("seq1d.safetensors");
    save_int8(&mut a, &file)?;
    let mut b = Seq1d::new(VarBuilder::zeros(DType::F32, &dev))?;
    fuse_modules_qat(&mut b)?;
    load_int8(&mut b, &file)?;
    let x = Tensor::randn(0f32, 1., (5, 2, 16), &dev)?;
    let ya = a.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(ya, b.forward(&x)?.flatten_all()?.to_vec1::<f32>()?);
    assert!(ya.chunks(3).any(|r| r != &ya[..3]));
    Ok(())
}

/// A QAT file with a valid checksum but an invalid fake-quant state is refused before the
/// VarMap or any fake-quant changes.
#[test]
fn qat_load_validates_before_changing_anything() -> candle_qat::Result<()> {
    let va = VarMap::new();
    let mut a = prepared(&va, 4, Backend::X86)?;
    steps(&a, &va, 0, 2)?;
    let file = tmp("qat-valid.safetensors");
    save_qat_checkpoint(&mut a, &va, &file)?;
    let bad = tmp("qat-invalid.safetensors");
    rewrite(
        &file,
        &bad,
        false,
        |n, b| {
            // The last fake-quant loaded, so every earlier one would have been changed by a
            // load that validates as it goes.
            if n == "fc2.activation_post_process.scale" {
                set_f32(b, 0, -1.0);
            }
        },
        |_| {},
    );
    let vb = VarMap::new();
    let mut b = prepared(&vb, 4, Backend::X86)?;
    let before = summary(&b)?;
    let w0 = b.conv.weight().flatten_all()?.to_vec1::<f32>()?;
    let e = load_qat_checkpoint(&mut b, &vb, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc2.activation_post_process"), "{e}");
    assert_eq!(before, summary(&b)?);
    assert_eq!(w0, b.conv.weight().flatten_all()?.to_vec1::<f32>()?);
    // The good file then loads.
    load_qat_checkpoint(&mut b, &vb, &file)?;
    assert_ne!(w0, b.conv.weight().flatten_all()?.to_vec1::<f32>()?);
    Ok(())
}
