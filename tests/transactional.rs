//! Passes and loads are transactional: `prepare_qat`, `convert`, `load_int8` and
//! `load_qat_checkpoint` check every layer before they change any, so each failure below
//! leaves the model exactly as it was (same outputs bit for bit, same summary, same
//! parameters), and the pass succeeds once the fix its message names is applied.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::checkpoint::{load_int8, load_qat_checkpoint, save_int8, save_qat_checkpoint};
use candle_qat::model::QuantModule;
use candle_qat::passes::{convert, for_each_layer};
use candle_qat::prelude::*;

#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu))]
struct Net {
    quant: QuantStub,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
    pool: MaxPool2d,
    flatten: Flatten,
    fc: Linear,
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
            fc: Linear::new(width * 16, 4, true, vb.pp("fc"))?,
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
        self.dequant.forward(&self.fc.forward(&x)?)
    }
}

/// A 3-D convolution between stubs: the QuantStub comes first (it has an int8 form), the
/// Conv3d second (it has none).
#[derive(Clone, Quantizable)]
struct Net3d {
    quant: QuantStub,
    conv: Conv3d,
    dequant: DeQuantStub,
}

impl Module for Net3d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dequant
            .forward(&self.conv.forward(&self.quant.forward(x)?)?)
    }
}

fn input() -> candle_core::Result<Tensor> {
    Tensor::arange(0f32, 4. * 64., &Device::Cpu)?
        .reshape((4, 1, 8, 8))?
        .affine(0.29, -3.0)?
        .sin()
}

fn qconfig() -> QConfigMapping {
    QConfigMapping::global(QConfig::default_qat(Backend::X86))
}

/// Fused and prepared, in training mode, nothing observed yet.
fn prepared(varmap: &VarMap, width: usize) -> candle_qat::Result<Net> {
    let mut m = Net::new(
        VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu),
        width,
    )?;
    fuse_modules_qat(&mut m)?;
    prepare_qat(&mut m, &qconfig())?;
    Ok(m)
}

/// Runs calibration data through a prepared model in eval mode (observers on; BatchNorm
/// uses and keeps its running statistics), then turns the observers off, so that forwards
/// change nothing.
fn calibrate_and_freeze<M: Quantizable + Module>(m: &mut M, x: &Tensor) -> candle_qat::Result<()> {
    eval(m)?;
    freeze_bn_stats(m)?;
    enable_observer(m)?;
    m.forward(x)?;
    disable_observer(m)
}

/// Everything a failed pass must leave as it was: the outputs bit for bit (a forward of a
/// frozen model changes nothing) and the summary (stages, kinds, qparams, toggles).
fn snapshot<M: Quantizable + Module>(m: &M, x: &Tensor) -> candle_qat::Result<(Vec<u32>, String)> {
    let y = m.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
    Ok((y.iter().map(|v| v.to_bits()).collect(), summary(m)?))
}

fn stages<M: Quantizable>(m: &M) -> candle_qat::Result<Vec<Stage>> {
    Ok(named_modules(m)?.into_iter().map(|i| i.stage).collect())
}

fn var_values(varmap: &VarMap) -> candle_qat::Result<Vec<(String, Vec<u32>)>> {
    let mut v: Vec<_> = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("poisoned".into()))?
        .iter()
        .map(|(k, var)| {
            let bits = var
                .as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|f| f.to_bits())
                .collect();
            Ok((k.clone(), bits))
        })
        .collect::<candle_core::Result<_>>()?;
    v.sort();
    Ok(v)
}

fn temp_dir(name: &str) -> candle_qat::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("candle-qat-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(candle_core::Error::wrap)?;
    Ok(dir)
}

#[test]
fn a_layer_without_int8_form_is_refused_before_any_layer_changes() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let vb = VarBuilder::zeros(DType::F32, &dev);
    let build = |vb: VarBuilder| -> candle_qat::Result<Net3d> {
        Ok(Net3d {
            quant: QuantStub::new(),
            conv: Conv3d::new(1, 2, 3, ConvConfig::default(), true, vb.pp("conv"))?,
            dequant: DeQuantStub::new(),
        })
    };
    let x = Tensor::randn(0f32, 1., (2, 1, 4, 5, 5), &dev)?;
    let mut m = build(vb)?;
    let before = snapshot(&m, &x)?;
    let stages_before = stages(&m)?;
    // prepare_qat refuses the qconfig on the Conv3d (it has no int8 kernel, so convert could
    // never succeed) before it changes any layer.
    let e = prepare_qat(&mut m, &qconfig()).unwrap_err().to_string();
    assert!(e.contains("`conv`") && e.contains("no int8 form"), "{e}");
    assert!(e.contains("None"), "the fix is named: {e}");
    // The QuantStub, checked before the Conv3d failed, was not prepared.
    assert_eq!(stages(&m)?, stages_before);
    assert_eq!(m.quant.stage(), Stage::Float);
    assert_eq!(snapshot(&m, &x)?, before);
    // The fix the message names: the Conv3d stays float.
    prepare_qat(&mut m, &qconfig().set_type::<Conv3d>(None))?;
    assert_eq!(m.quant.stage(), Stage::Prepared);
    assert_eq!(m.conv.stage(), Stage::Float);
    calibrate_and_freeze(&mut m, &x)?;
    // Convert then fails at the DeQuantStub, the last layer (its input comes from the float
    // Conv3d, not from a fake-quant), after the QuantStub was staged: nothing is converted.
    let before = snapshot(&m, &x)?;
    let stages_before = stages(&m)?;
    let e = convert(&mut m).unwrap_err().to_string();
    // Its input is noted as coming from no live fake-quant (a region error), not left
    // pointing at an earlier producer.
    assert!(
        e.contains("`dequant`") && e.contains("input 0 was not the output of any live fake-quant"),
        "{e}"
    );
    assert_eq!(stages(&m)?, stages_before);
    assert_eq!(m.quant.stage(), Stage::Prepared);
    assert_eq!(snapshot(&m, &x)?, before);
    // The model is as usable as before: it trains and evaluates on.
    train(&mut m)?;
    m.forward(&x)?;
    Ok(())
}

#[test]
fn convert_without_calibration_changes_nothing_and_works_after_calibration(
) -> candle_qat::Result<()> {
    let varmap = VarMap::new();
    let mut m = prepared(&varmap, 4)?;
    let x = input()?;
    // Nothing went through yet: the observers never saw a tensor (and a per-channel weight
    // fake-quant cannot even run before it has). A twin shows what the model was.
    let twin = m.clone();
    let before = summary(&m)?;
    let vars = var_values(&varmap)?;
    let e = convert(&mut m).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::InModule { ref path, .. } if path == "quant"),
        "{msg}"
    );
    assert!(msg.contains("never observed"), "{msg}");
    assert!(msg.contains("run calibration data"), "{msg}");
    assert_eq!(summary(&m)?, before);
    assert_eq!(var_values(&varmap)?, vars);
    assert!(stages(&m)?.iter().all(|&s| s != Stage::Converted));
    // The fix: calibration data through the prepared model. It computes exactly what it
    // computes on the untouched twin.
    let mut twin = twin;
    calibrate_and_freeze(&mut m, &x)?;
    calibrate_and_freeze(&mut twin, &x)?;
    let fq = snapshot(&m, &x)?;
    assert_eq!(fq, snapshot(&twin, &x)?);
    convert(&mut m)?;
    let int8 = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(int8.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), fq.0);
    Ok(())
}

#[test]
fn an_empty_batch_is_not_calibration() -> candle_qat::Result<()> {
    let varmap = VarMap::new();
    let mut m = prepared(&varmap, 4)?;
    let empty = Tensor::zeros((0, 1, 8, 8), DType::F32, &Device::Cpu)?;
    // The empty batch goes through the fake-quants without marking them as observed.
    m.quant.forward(&empty)?;
    let mut observed = Vec::new();
    for_each_layer(&mut m, |path, l| {
        l.for_each_fake_quant(&mut |role, fq| {
            observed.push((path.dotted(), role.to_string(), fq.is_calibrated()))
        });
        Ok(())
    })?;
    assert!(!observed.is_empty());
    assert!(observed.iter().all(|(_, _, c)| !c), "{observed:?}");
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(e.contains("`quant`") && e.contains("never observed"), "{e}");
    Ok(())
}

#[test]
fn a_weight_fake_quant_observes_the_weight_at_convert() -> candle_qat::Result<()> {
    let varmap = VarMap::new();
    let mut m = prepared(&varmap, 4)?;
    let x = input()?;
    eval(&mut m)?;
    freeze_bn_stats(&mut m)?;
    // The weight fake-quants are off during calibration (observer and fake quantization):
    // they never see the weights.
    for_each_layer(&mut m, |_, l| {
        l.for_each_fake_quant(&mut |role, fq| {
            if role == "weight" {
                fq.disable_observer();
                fq.disable_fake_quant();
            }
        });
        Ok(())
    })?;
    m.forward(&x)?;
    disable_observer(&mut m)?;
    let weight_fq = |m: &Net| {
        m.fc.fake_quants()
            .into_iter()
            .find(|(r, _)| r == "weight")
            .map(|(_, fq)| fq)
    };
    assert!(!weight_fq(&m).is_some_and(|fq| fq.is_calibrated()));
    let before = snapshot(&m, &x)?;
    // Off, the observer cannot see the weight at convert either.
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(
        e.contains("`conv`") && e.contains("weight fake-quant"),
        "{e}"
    );
    assert!(e.contains("enable_observer"), "{e}");
    assert_eq!(snapshot(&m, &x)?, before);
    // On, convert passes the weight through it first, as PyTorch's convert calls
    // `weight_fake_quant(weight)`: the int8 weights get the observer's qparams.
    enable_observer(&mut m)?;
    convert(&mut m)?;
    let fq = weight_fq(&m).expect("the converted layer keeps its weight fake-quant");
    assert!(fq.is_calibrated());
    let w_max = m.fc.weight().abs()?.max(1)?.to_vec1::<f32>()?;
    let scales = fq.scale();
    assert_eq!(scales.len(), w_max.len());
    for (s, w) in scales.iter().zip(&w_max) {
        assert!((s * 127.5 - w).abs() <= 1e-6 * w.max(1.0), "{s} {w}");
    }
    Ok(())
}

#[test]
fn convert_with_an_input_of_unknown_producer_changes_nothing() -> candle_qat::Result<()> {
    let varmap = VarMap::new();
    let mut m = prepared(&varmap, 4)?;
    let x = input()?;
    calibrate_and_freeze(&mut m, &x)?;
    // A clone keeps the calibrated fake-quants but not the notes of which fed which.
    let mut c = m.clone();
    let e = convert(&mut c).unwrap_err().to_string();
    assert!(e.contains("`conv`") && e.contains("no record"), "{e}");
    assert!(e.contains("run the prepared model forward once"), "{e}");
    assert_eq!(c.quant.stage(), Stage::Prepared);
    assert_eq!(summary(&c)?, summary(&m)?);
    let before = snapshot(&c, &x)?;
    assert_eq!(before, snapshot(&m, &x)?);
    // The fix: the forward just run noted the producers.
    convert(&mut c)?;
    let y = c.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), before.0);
    Ok(())
}

#[test]
fn failed_int8_loads_change_nothing() -> candle_qat::Result<()> {
    let dir = temp_dir("tx-int8")?;
    let x = input()?;
    let converted = |width: usize| -> candle_qat::Result<Net> {
        let varmap = VarMap::new();
        let mut m = prepared(&varmap, width)?;
        calibrate_and_freeze(&mut m, &x)?;
        convert(&mut m)?;
        Ok(m)
    };
    let mut narrow = converted(4)?;
    let mut wide = converted(8)?;
    let narrow_file = dir.join("narrow.safetensors");
    let wide_file = dir.join("wide.safetensors");
    save_int8(&mut narrow, &narrow_file)?;
    save_int8(&mut wide, &wide_file)?;
    let corrupt = dir.join("corrupt.safetensors");
    let mut bytes = std::fs::read(&wide_file).map_err(candle_core::Error::wrap)?;
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).map_err(candle_core::Error::wrap)?;

    let varmap = VarMap::new();
    let mut m = Net::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        8,
    )?;
    fuse_modules_qat(&mut m)?;
    eval(&mut m)?;
    let before = snapshot(&m, &x)?;
    let vars = var_values(&varmap)?;
    // Another architecture: the QuantStub matches, the conv does not.
    let e = load_int8(&mut m, &narrow_file).unwrap_err().to_string();
    assert!(e.contains("`conv`") && e.contains("shape"), "{e}");
    assert_eq!(m.quant.stage(), Stage::Float);
    assert_eq!(snapshot(&m, &x)?, before);
    assert_eq!(var_values(&varmap)?, vars);
    // A file cut short.
    assert!(load_int8(&mut m, &corrupt).is_err());
    assert_eq!(snapshot(&m, &x)?, before);
    // The right file loads and reproduces the converted model.
    load_int8(&mut m, &wide_file)?;
    let a = wide.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let b = m.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    // Loading twice is an error that changes nothing either.
    let converted_summary = summary(&m)?;
    let e = load_int8(&mut m, &wide_file).unwrap_err().to_string();
    assert!(e.contains("already converted"), "{e}");
    assert_eq!(summary(&m)?, converted_summary);
    Ok(())
}

#[test]
fn a_qat_checkpoint_of_another_model_changes_nothing() -> candle_qat::Result<()> {
    let dir = temp_dir("tx-qat")?;
    let x = input()?;
    // The source keeps `fc` float: its file has no fake-quant state for `fc`, which comes
    // after every parameter and every other fake-quant in the walk, and records `fc` float.
    let source_vars = VarMap::new();
    let mut source = Net::new(
        VarBuilder::from_varmap(&source_vars, DType::F32, &Device::Cpu),
        4,
    )?;
    fuse_modules_qat(&mut source)?;
    prepare_qat(&mut source, &qconfig().set_path("fc", None))?;
    calibrate_and_freeze(&mut source, &x)?;
    let other = dir.join("other.safetensors");
    save_qat_checkpoint(&mut source, &source_vars, &other)?;

    let varmap = VarMap::new();
    let mut m = prepared(&varmap, 4)?;
    calibrate_and_freeze(&mut m, &(&x * 2.0)?)?;
    let before = snapshot(&m, &x)?;
    let vars = var_values(&varmap)?;
    // The structure the file records names the first difference: `fc`, float in the file.
    let e = load_qat_checkpoint(&mut m, &varmap, &other)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`fc`") && e.contains("saved Float"), "{e}");
    assert_eq!(
        snapshot(&m, &x)?,
        before,
        "fake-quants restored before `fc`"
    );
    assert_eq!(
        var_values(&varmap)?,
        vars,
        "parameters restored before `fc`"
    );
    let right = dir.join("right.safetensors");
    let same_vars = VarMap::new();
    let mut same = prepared(&same_vars, 4)?;
    calibrate_and_freeze(&mut same, &x)?;
    save_qat_checkpoint(&mut same, &same_vars, &right)?;
    // A model of the same structure prepared otherwise: its `fc` has a per-tensor weight
    // fake-quant (QNNPACK), the file's is per-channel. Only `fc`'s fake-quant state tells.
    let tensor_vars = VarMap::new();
    let mut tensor_fc = Net::new(
        VarBuilder::from_varmap(&tensor_vars, DType::F32, &Device::Cpu),
        4,
    )?;
    fuse_modules_qat(&mut tensor_fc)?;
    prepare_qat(
        &mut tensor_fc,
        &qconfig().set_path("fc", QConfig::default_qat(Backend::Qnnpack)),
    )?;
    calibrate_and_freeze(&mut tensor_fc, &(&x * 2.0)?)?;
    let tensor_before = snapshot(&tensor_fc, &x)?;
    let tensor_vars_before = var_values(&tensor_vars)?;
    let e = load_qat_checkpoint(&mut tensor_fc, &tensor_vars, &right)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fc.weight_fake_quant"), "{e}");
    assert_eq!(
        snapshot(&tensor_fc, &x)?,
        tensor_before,
        "fake-quants restored before `fc`"
    );
    assert_eq!(
        var_values(&tensor_vars)?,
        tensor_vars_before,
        "parameters restored before `fc`"
    );
    // The right file (a model prepared the same way) loads.
    load_qat_checkpoint(&mut m, &varmap, &right)?;
    assert_eq!(snapshot(&m, &x)?, snapshot(&same, &x)?);
    Ok(())
}

#[test]
fn fake_quant_calibration_state_and_detached_copies() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let x = Tensor::new(&[-1.0f32, 0.5, 2.0], &dev)?;
    // Fixed qparams are calibrated by construction.
    assert!(FakeQuantizeSpec::fixed_sigmoid().build()?.is_calibrated());
    let mut fq = QConfig::default_qat(Backend::X86).activation.build()?;
    assert!(!fq.is_calibrated());
    fq.forward(&Tensor::zeros(0, DType::F32, &dev)?)?;
    assert!(!fq.is_calibrated(), "an empty tensor is not calibration");
    // A state that fails its check leaves the fake-quant as it was.
    let saved = fq.state();
    let mut bad = saved.clone();
    bad.scale = vec![f32::NAN];
    assert!(fq.check_state(&bad).is_err());
    assert!(fq.load_state(&bad).is_err());
    assert_eq!(fq.state(), saved);
    fq.forward(&x)?;
    assert!(fq.is_calibrated());
    // LSQ: a detached copy observes without moving the original's learnable scale (so does
    // a plain clone: a cloned learnable fake-quant has its own Vars).
    let spec = FakeQuantizeSpec::builder().learnable(true).build()?;
    let lsq = spec.build()?;
    let scale = lsq.scale();
    let mut copy = lsq.detached_copy()?;
    copy.forward(&x)?;
    assert_ne!(copy.scale(), scale);
    assert_eq!(lsq.scale(), scale);
    assert!(copy.is_calibrated() && !lsq.is_calibrated());
    let mut other = lsq.clone();
    other.forward(&x)?;
    assert_ne!(other.scale(), scale);
    assert_eq!(lsq.scale(), scale, "a clone does not share the LSQ Vars");
    Ok(())
}
