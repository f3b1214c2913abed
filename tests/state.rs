//! State that belongs to one model stays in it: clones and threads do not share the
//! fusion-order notes or the provenance notes (which fake-quant produced a layer's input), and
//! a provenance lookup that fails is an error at convert, not a stale source.

use std::sync::Barrier;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::model::QuantModule;
use candle_qat::passes::convert;
use candle_qat::prelude::*;

/// QuantStub -> Conv2d+BN+ReLU (fused) -> Flatten -> Linear -> DeQuantStub, on 1x6x6 inputs.
#[derive(Clone, Quantizable)]
#[qat(fuse(conv, bn, relu))]
struct Tiny {
    quant: QuantStub,
    conv: Conv2d,
    bn: BatchNorm2d,
    relu: ReLU,
    flatten: Flatten,
    fc: Linear,
    dequant: DeQuantStub,
}

impl Tiny {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        let c = ConvConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Tiny {
            quant: QuantStub::new(),
            conv: Conv2d::new(1, 4, 3, c, true, vb.pp("conv"))?,
            bn: BatchNorm2d::new(4, BatchNormConfig::default(), vb.pp("bn"))?,
            relu: ReLU::new(),
            flatten: Flatten::new(1),
            fc: Linear::new(4 * 6 * 6, 3, true, vb.pp("fc"))?,
            dequant: DeQuantStub::new(),
        })
    }

    /// The float part up to the Linear's input (run on the producer's thread in a test).
    fn features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self
            .relu
            .forward(&self.bn.forward(&self.conv.forward(&x)?)?)?;
        self.flatten.forward(&x)
    }

    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.dequant.forward(&self.fc.forward(x)?)
    }
}

impl Module for Tiny {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head(&self.features(x)?)
    }
}

fn prepared() -> candle_qat::Result<(Tiny, VarMap)> {
    let varmap = VarMap::new();
    let mut m = Tiny::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    fuse_modules_qat(&mut m)?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )?;
    Ok((m, varmap))
}

fn input(n: usize, seed: u32) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..n * 36)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    Tensor::from_vec(v, (n, 1, 6, 6), &Device::Cpu)
}

/// Freezes the fake-quant model, converts a clone of it and checks that both agree code for
/// code.
fn converts_and_agrees(mut fq: Tiny) -> candle_qat::Result<()> {
    disable_observer(&mut fq)?;
    freeze_bn_stats(&mut fq)?;
    eval(&mut fq)?;
    let mut int8 = fq.clone();
    int8.forward(&input(2, 7)?)?;
    convert(&mut int8)?;
    let x = input(8, 11)?;
    let a = fq.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    let b = int8.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(a, b);
    Ok(())
}

#[test]
fn interleaved_clones_do_not_trip_each_others_fusion_order_check() -> candle_qat::Result<()> {
    let (a, _vm) = prepared()?;
    let b = a.clone();
    let x = input(2, 1)?;
    // Both heads run before either placeholder: each placeholder must find its own head's
    // output (the shared trace of old recorded only the latest head output).
    let qa = a.quant.forward(&x)?;
    let qb = b.quant.forward(&x)?;
    let ya = a.conv.forward(&qa)?;
    let yb = b.conv.forward(&qb)?;
    a.relu.forward(&a.bn.forward(&ya)?)?;
    b.relu.forward(&b.bn.forward(&yb)?)?;
    // The order check itself still works: a placeholder fed something else is an error.
    let e = a.bn.forward(&qa).unwrap_err().to_string();
    assert!(e.contains("was not applied to the output of `conv`"), "{e}");
    Ok(())
}

#[test]
fn two_clones_train_in_two_threads_and_each_converts() -> candle_qat::Result<()> {
    let (m, varmap) = prepared()?;
    let clones = [m.clone(), m];
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles: Vec<_> = clones
            .into_iter()
            .enumerate()
            .map(|(k, mut model)| {
                let (varmap, barrier) = (&varmap, &barrier);
                s.spawn(move || -> candle_qat::Result<()> {
                    train(&mut model)?;
                    let mut opt = SGD::new(varmap.all_vars(), 0.01)?;
                    for step in 0..25u32 {
                        let x = input(4, step * 2 + k as u32)?;
                        let y = model.forward(&x)?;
                        opt.backward_step(&y.sqr()?.mean_all()?)?;
                    }
                    // The weights are shared by the clones: convert once both stopped moving
                    // them.
                    barrier.wait();
                    converts_and_agrees(model)
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("training thread panicked"))
    })
}

#[test]
fn producer_and_consumer_on_two_threads_convert_with_the_producers_qparams(
) -> candle_qat::Result<()> {
    let (mut m, _vm) = prepared()?;
    for seed in 0..3 {
        // The QuantStub, conv group and flatten run on one thread, the Linear on another.
        let feats = std::thread::scope(|s| s.spawn(|| m.features(&input(4, seed)?)).join());
        let feats = feats.expect("producer thread panicked")?;
        std::thread::scope(|s| s.spawn(|| m.head(&feats)).join())
            .expect("consumer thread panicked")?;
    }
    let relu_out = named_modules(&m)?
        .into_iter()
        .find(|i| i.path == "conv")
        .and_then(|i| i.fake_quants.into_iter().find(|f| f.role == "activation"))
        .expect("the fused conv has an output fake-quant")
        .qparams;
    convert(&mut m)?;
    let fc_in = m.fc.int8_state().expect("fc is converted").inputs[0];
    assert_eq!(
        relu_out,
        QParams::PerTensor {
            scale: fc_in.scale,
            zero_point: fc_in.zero_point
        }
    );
    Ok(())
}

#[test]
fn a_lookup_that_fails_after_a_good_forward_is_an_error_at_convert() -> candle_qat::Result<()> {
    let (mut m, _vm) = prepared()?;
    m.forward(&input(4, 3)?)?;
    // The Linear now gets a tensor no fake-quant produced: its earlier source is stale.
    m.fc.forward(&Tensor::ones((2, 144), DType::F32, &Device::Cpu)?)?;
    let e = convert(&mut m).unwrap_err().to_string();
    assert!(e.contains("in module `fc`"), "{e}");
    assert!(
        e.contains("input 0 was not the output of any live fake-quant"),
        "{e}"
    );
    assert!(e.contains("insert a QuantStub"), "{e}");
    // Convert is transactional: the failed one changed nothing, so the model is still
    // prepared, and after a forward that feeds the Linear from its fake-quants again it
    // converts, with the Linear's input qparams those of the conv's output fake-quant.
    assert_eq!(m.fc.stage(), Stage::Prepared);
    assert_eq!(m.conv.stage(), Stage::Prepared);
    m.forward(&input(4, 5)?)?;
    convert(&mut m)?;
    assert_eq!(m.fc.stage(), Stage::Converted);
    assert_eq!(m.conv.stage(), Stage::Converted);
    let conv_out = m
        .conv
        .int8_state()
        .and_then(|s| s.output)
        .expect("conv output qparams");
    let fc_in = m.fc.int8_state().map(|s| s.inputs).expect("fc int8 state");
    assert_eq!(fc_in, vec![conv_out]);
    m.forward(&input(2, 9)?)?;
    Ok(())
}

#[test]
fn a_cloned_learnable_fake_quant_trains_its_own_scale() -> candle_qat::Result<()> {
    use candle_qat::qconfig::LearnableSpec;
    let mut fq = QConfig::default_qat(Backend::X86).activation.build()?;
    fq.forward(&Tensor::new(&[0.0f32, 2.54], &Device::Cpu)?)?;
    fq.make_learnable(LearnableSpec::default())?;
    let copy = fq.clone();
    copy.learnable_vars()[0].set(&Tensor::new(&[0.5f32], &Device::Cpu)?)?;
    assert_eq!(copy.scale(), vec![0.5]);
    assert_eq!(fq.scale(), vec![0.02]);
    Ok(())
}
