//! Transformer QAT end to end on a 2-block Llama-style model (examples/common/tiny_llama.rs:
//! RmsNorm, rotary attention in llama's interleaved-pair convention, SwiGLU, untied output)
//! prepared with torchao's 8da4w: it trains on a synthetic next-token task (the loss falls,
//! the per-group weight scales move with the weights), the norms and the Embedding stay
//! float, the outputs are exactly intx(x) @ intx(w)^T per Linear; and with range learning
//! the learned scales train beside the weights.

#[path = "../examples/common/idx.rs"]
mod idx;
#[path = "../examples/common/tiny_llama.rs"]
mod tiny_llama;
#[path = "../examples/common/trainer.rs"]
mod trainer;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_qat::passes::for_each_layer;
use candle_qat::prelude::*;
use tiny_llama::{TinyLlama, TinyLlamaConfig};
use trainer::Rng;

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn model(seed: u64) -> Res<(TinyLlama, VarMap)> {
    let cfg = TinyLlamaConfig::tiny();
    let vm = VarMap::new();
    let m = TinyLlama::new(cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let mut rng = Rng::new(seed);
    m.init_weights(&vm, || rng.normal())?;
    Ok((m, vm))
}

/// Sequences where each token determines the next: `next = (3 t + 1) mod vocab`, from a
/// random first token. (b, ctx + 1): inputs are the first ctx, targets the last ctx.
fn batch(cfg: &TinyLlamaConfig, b: usize, rng: &mut Rng) -> Res<(Tensor, Tensor)> {
    let mut v = Vec::with_capacity(b * (cfg.ctx + 1));
    for _ in 0..b {
        let mut t = rng.below(cfg.vocab) as u32;
        for _ in 0..=cfg.ctx {
            v.push(t);
            t = (3 * t + 1) % cfg.vocab as u32;
        }
    }
    let all = Tensor::from_vec(v, (b, cfg.ctx + 1), &Device::Cpu)?;
    Ok((all.narrow(1, 0, cfg.ctx)?, all.narrow(1, 1, cfg.ctx)?))
}

fn loss(m: &TinyLlama, x: &Tensor, y: &Tensor) -> Res<Tensor> {
    let logits = m.forward(x)?;
    let (b, t, v) = logits.dims3()?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.reshape((b * t, v))?,
        &y.flatten_all()?,
    )?)
}

/// The scale every intx weight quantizer holds now, by module path.
fn weight_scales(m: &mut TinyLlama) -> Res<Vec<(String, Vec<f32>)>> {
    let mut out = Vec::new();
    for_each_layer(m, |path, layer| {
        layer.for_each_intx_quantizer(&mut |role, q, _| {
            if role == "weight_fake_quantizer" {
                if let Some(s) = q.scale() {
                    out.push((path.join(role), s.flatten_all()?.to_vec1::<f32>()?));
                }
            }
            Ok(())
        })
    })?;
    Ok(out)
}

fn train(m: &TinyLlama, opt: &mut AdamW, steps: usize, seed: u64) -> Res<(f32, f32)> {
    let cfg = *m.config();
    let mut rng = Rng::new(seed);
    let (mut first, mut last) = (f32::NAN, f32::NAN);
    for step in 0..steps {
        let (x, y) = batch(&cfg, 8, &mut rng)?;
        let l = loss(m, &x, &y)?;
        let v = l.to_scalar::<f32>()?;
        if step == 0 {
            first = v;
        }
        last = v;
        opt.backward_step(&l)?;
    }
    Ok((first, last))
}

fn adamw(vars: Vec<candle_core::Var>) -> Res<AdamW> {
    Ok(AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?)
}

#[test]
fn a_llama_trains_with_8da4w_and_its_scales_move() -> Res<()> {
    let (mut m, vm) = model(0)?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::int8_dynamic_activation_int4_weight(32)?),
    )?;
    // Every Linear (4 attention + 3 SwiGLU per block, the output) takes 8da4w; the norms
    // and the Embedding stay float.
    let mods = named_modules(&m)?;
    let prepared: Vec<&str> = mods
        .iter()
        .filter(|i| i.stage == Stage::Prepared)
        .map(|i| i.path.as_str())
        .collect();
    assert_eq!(prepared.len(), 2 * 7 + 1, "{prepared:?}");
    assert!(prepared
        .iter()
        .all(|p| !p.contains("norm") && !p.contains("tok_")));

    let (x, _) = batch(m.config(), 2, &mut Rng::new(9))?;
    m.forward(&x)?;
    let before = weight_scales(&mut m)?;
    assert_eq!(before.len(), 15);
    // wq's scales: one per output row and group of 32 inputs (32 x 1).
    assert_eq!(before[0].1.len(), 32);

    let mut opt = adamw(vm.all_vars())?;
    let (first, last) = train(&m, &mut opt, 40, 1)?;
    eprintln!("8da4w: loss {first:.3} -> {last:.3}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    m.forward(&x)?;
    let after = weight_scales(&mut m)?;
    for ((p, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "{p}: scales did not move");
    }
    Ok(())
}

#[test]
fn range_learning_trains_the_scales_beside_the_weights() -> Res<()> {
    let (mut m, vm) = model(1)?;
    let w4 = IntxSpec::builder(4)
        .per_group(32)
        .dynamic(false)
        .range_learning(true)
        .build()?;
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::intx(Some(IntxSpec::int8_per_token_asym()), w4)),
    )?;
    initialize_fake_quantizers(&mut m)?;
    let learned = learnable_parameters(&mut m)?;
    assert_eq!(
        learned.len(),
        15,
        "one scale per Linear (symmetric: no zero point)"
    );
    assert!(learned[0]
        .0
        .ends_with("attention.wq.weight_fake_quantizer.scale"));
    let before: Vec<Vec<f32>> = learned
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().and_then(|t| t.to_vec1()))
        .collect::<candle_core::Result<_>>()?;
    let mut vars = vm.all_vars();
    vars.extend(learned.iter().map(|(_, v)| v.clone()));
    let mut opt = adamw(vars)?;
    let (first, last) = train(&m, &mut opt, 40, 2)?;
    eprintln!("range learning: loss {first:.3} -> {last:.3}");
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    for ((name, v), b) in learned.iter().zip(&before) {
        let a = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        assert_ne!(&a, b, "{name} did not train");
    }
    Ok(())
}
