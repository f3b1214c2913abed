//! QAT end to end on a synthetic task: fuse, prepare, train with AdamW, and check that the
//! loss falls, weights and scales move, and observers / BN statistics freeze when told.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{loss, AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_qat::passes::convert;
use candle_qat::prelude::*;

#[derive(Quantizable)]
#[qat(fuse(conv1, bn1, relu1), fuse(conv2, bn2, relu2), fuse(fc1, relu3))]
struct SmallCnn {
    quant: QuantStub,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    relu2: ReLU,
    pool: MaxPool2d,
    flatten: Flatten,
    fc1: Linear,
    relu3: ReLU,
    fc2: Linear,
    dequant: DeQuantStub,
}

impl SmallCnn {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let cfg = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(SmallCnn {
            quant: QuantStub::new(),
            conv1: Conv2d::new(1, 8, 3, cfg, true, vb.pp("conv1"))?,
            bn1: BatchNorm2d::new(8, BatchNormConfig::default(), vb.pp("bn1"))?,
            relu1: ReLU::new(),
            conv2: Conv2d::new(8, 8, 3, cfg, true, vb.pp("conv2"))?,
            bn2: BatchNorm2d::new(8, BatchNormConfig::default(), vb.pp("bn2"))?,
            relu2: ReLU::new(),
            pool: MaxPool2d::new(2, 2)?,
            flatten: Flatten::new(1),
            fc1: Linear::new(8 * 4 * 4, 32, true, vb.pp("fc1"))?,
            relu3: ReLU::new(),
            fc2: Linear::new(32, 4, true, vb.pp("fc2"))?,
            dequant: DeQuantStub::new(),
        })
    }
}

impl Module for SmallCnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu1
            .forward(&self.bn1.forward(&self.conv1.forward(&x)?)?)?;
        let x = self
            .relu2
            .forward(&self.bn2.forward(&self.conv2.forward(&x)?)?)?;
        let x = self.flatten.forward(&self.pool.forward(&x)?)?;
        let x = self.relu3.forward(&self.fc1.forward(&x)?)?;
        self.dequant.forward(&self.fc2.forward(&x)?)
    }
}

/// 8x8 images with a bright 3x3 blob in one of four quadrants (the label), plus noise.
fn batch(n: usize, seed: u64, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let mut xs = vec![0f32; n * 64];
    let mut ys = vec![0u32; n];
    for i in 0..n {
        let label = next() % 4;
        ys[i] = label;
        let (r0, c0) = (
            ((label / 2) * 4 + next() % 2) as usize,
            ((label % 2) * 4 + next() % 2) as usize,
        );
        for (j, v) in xs[i * 64..(i + 1) * 64].iter_mut().enumerate() {
            *v = (next() % 1000) as f32 / 4000.0;
            let (r, c) = (j / 8, j % 8);
            if (r0..r0 + 3).contains(&r) && (c0..c0 + 3).contains(&c) {
                *v += 1.0;
            }
        }
    }
    Ok((
        Tensor::from_vec(xs, (n, 1, 8, 8), dev)?,
        Tensor::from_vec(ys, n, dev)?,
    ))
}

fn accuracy(model: &SmallCnn, x: &Tensor, y: &Tensor) -> candle_core::Result<f32> {
    let pred = model.forward(x)?.argmax(D::Minus1)?;
    pred.eq(y)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()
}

fn act_scale(model: &SmallCnn, path: &str) -> f32 {
    let info = named_modules(model).unwrap();
    let m = info.iter().find(|m| m.path == path).unwrap();
    let f = m
        .fake_quants
        .iter()
        .find(|f| f.role == "activation")
        .unwrap();
    f.qparams.scales()[0]
}

/// A SmallCnn on `varmap`, in training mode, fused for QAT and prepared with the x86 preset.
fn prepared(varmap: &VarMap) -> candle_qat::Result<SmallCnn> {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let mut model = SmallCnn::new(vb)?;
    train(&mut model)?;
    fuse_modules_qat(&mut model)?;
    prepare_qat(
        &mut model,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
    Ok(model)
}

#[test]
fn qat_trains_and_freezes() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let mut model = prepared(&varmap)?;

    let w0 = model.conv1.weight().flatten_all()?.to_vec1::<f32>()?;
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    let (xt, yt) = batch(256, 999, &dev)?;
    let mut losses = Vec::new();
    for step in 0..200u64 {
        let (x, y) = batch(32, step, &dev)?;
        let logits = model.forward(&x)?;
        let l = loss::cross_entropy(&logits, &y)?;
        opt.backward_step(&l)?;
        losses.push(l.to_scalar::<f32>()?);
    }
    let first: f32 = losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = losses[180..].iter().sum::<f32>() / 20.0;
    assert!(last < 0.5 * first, "loss did not fall: {first} -> {last}");
    let w1 = model.conv1.weight().flatten_all()?.to_vec1::<f32>()?;
    assert!(
        w0.iter().zip(&w1).any(|(a, b)| a != b),
        "weights did not move"
    );

    // Freeze observers and BN statistics: qparams and running stats stop moving.
    disable_observer(&mut model)?;
    freeze_bn_stats(&mut model)?;
    let s_frozen = act_scale(&model, "conv1");
    let (rm_frozen, _) = model.conv1.bn_running_stats().unwrap();
    let rm_frozen = rm_frozen.to_vec1::<f32>()?;
    for step in 200..230u64 {
        let (x, y) = batch(32, step, &dev)?;
        let l = loss::cross_entropy(&model.forward(&x)?, &y)?;
        opt.backward_step(&l)?;
    }
    assert_eq!(
        act_scale(&model, "conv1"),
        s_frozen,
        "observer kept updating"
    );
    let (rm, _) = model.conv1.bn_running_stats().unwrap();
    assert_eq!(rm.to_vec1::<f32>()?, rm_frozen, "BN stats kept updating");
    // train() does not unfreeze BN.
    train(&mut model)?;
    model.forward(&batch(8, 5000, &dev)?.0)?;
    assert_eq!(
        model.conv1.bn_running_stats().unwrap().0.to_vec1::<f32>()?,
        rm_frozen
    );

    eval(&mut model)?;
    let acc = accuracy(&model, &xt, &yt)?;
    assert!(acc > 0.9, "held-out accuracy {acc}");
    // Scales moved away from the initial 1.0 and the summary shows the qparams.
    assert_ne!(s_frozen, 1.0);
    let text = summary(&model)?;
    assert!(
        text.contains("ConvBnReLU2d") && text.contains("scale="),
        "{text}"
    );
    Ok(())
}

/// The weight scales of a layer's fake-quant.
fn weight_scales(model: &SmallCnn, path: &str) -> Vec<f32> {
    let info = named_modules(model).unwrap();
    let m = info.iter().find(|m| m.path == path).unwrap();
    let f = m.fake_quants.iter().find(|f| f.role == "weight").unwrap();
    f.qparams.scales().to_vec()
}

#[test]
fn lsq_from_the_model_trains_its_scales() -> candle_qat::Result<()> {
    use candle_qat::qconfig::LearnableSpec;
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let mut model = prepared(&varmap)?;
    // Before any forward, the per-channel weight fake-quants do not know their channel count:
    // an error naming the first of them, and nothing changed.
    let e = make_learnable(&mut model, LearnableSpec::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("in module `conv1.weight_fake_quant`"), "{e}");
    assert!(e.contains("run a calibration forward"), "{e}");
    assert!(learnable_parameters(&mut model)?.is_empty());

    // Calibrate, then make learnable: the observers' qparams are kept.
    for step in 0..5u64 {
        model.forward(&batch(32, 100 + step, &dev)?.0)?;
    }
    let calibrated = act_scale(&model, "conv1");
    make_learnable(&mut model, LearnableSpec::default())?;
    assert_eq!(act_scale(&model, "conv1"), calibrated);
    assert!(summary(&model)?.contains(" lsq "), "{}", summary(&model)?);
    enable_param_learning(&mut model)?;
    let text = summary(&model)?;
    assert!(text.contains("obs-off fq lsq-learning"), "{text}");

    let lsq = learnable_parameters(&mut model)?;
    let names: Vec<&str> = lsq.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "quant.activation_post_process.scale",
        "conv1.weight_fake_quant.scale",
        "conv1.weight_fake_quant.zero_point",
        "conv1.activation_post_process.scale",
        "fc2.activation_post_process.zero_point",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let w_scales0 = weight_scales(&model, "conv1");
    let a_scale0 = act_scale(&model, "fc1");
    let mut vars = varmap.all_vars();
    vars.extend(lsq.into_iter().map(|(_, v)| v));
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 3e-3,
            ..Default::default()
        },
    )?;
    let mut losses = Vec::new();
    for step in 0..120u64 {
        let (x, y) = batch(32, step, &dev)?;
        let l = loss::cross_entropy(&model.forward(&x)?, &y)?;
        opt.backward_step(&l)?;
        losses.push(l.to_scalar::<f32>()?);
    }
    let first: f32 = losses[..20].iter().sum::<f32>() / 20.0;
    let last: f32 = losses[100..].iter().sum::<f32>() / 20.0;
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");
    // The scales moved by gradient (the observers are off).
    let w_scales1 = weight_scales(&model, "conv1");
    assert!(
        w_scales0.iter().zip(&w_scales1).any(|(a, b)| a != b),
        "weight scales did not move"
    );
    assert_ne!(
        act_scale(&model, "fc1"),
        a_scale0,
        "activation scale did not move"
    );
    // The LSQ model converts (its learnt qparams count as calibrated); a converted model's
    // fake-quants never run again, so make_learnable refuses it and changes nothing.
    eval(&mut model)?;
    let mut int8 = model;
    int8.forward(&batch(8, 7, &dev)?.0)?;
    convert(&mut int8)?;
    let e = make_learnable(&mut int8, LearnableSpec::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("make_learnable on a converted"), "{e}");
    assert!(e.contains("before convert"), "{e}");
    int8.forward(&batch(8, 7, &dev)?.0)?;
    Ok(())
}
