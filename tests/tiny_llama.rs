//! The tiny Llama of examples/common/tiny_llama.rs: Meta Llama's module and variable names,
//! loading from its own variables, the reference's initialisation, gradients into every
//! parameter (through the differentiable rotary embedding and softmax), the context limit,
//! and that it learns a task only attention with positions can solve. (Its agreement with
//! candle-transformers' quantized_llama is in tests/gguf_llama.rs.)

#[path = "common/llama_fixture.rs"]
mod llama_fixture;
#[path = "../examples/common/tiny_llama.rs"]
mod tiny_llama;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use candle_qat::passes::named_modules;
use llama_fixture::{drawn_model, ids, Res, Rng};
use tiny_llama::{TinyLlama, TinyLlamaConfig};

fn model(cfg: TinyLlamaConfig, seed: u64) -> Res<(TinyLlama, VarMap)> {
    drawn_model(cfg, &mut Rng(seed), 1.0)
}

fn max_abs(t: &Tensor) -> Res<f32> {
    Ok(t.abs()?.max_all()?.to_scalar::<f32>()?)
}

#[test]
fn modules_and_variables_carry_meta_llama_names() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (m, vm) = model(cfg, 1)?;
    let paths: Vec<String> = named_modules(&m)?
        .into_iter()
        .map(|i| format!("{} {}", i.path, i.kind))
        .collect();
    let mut want = vec!["tok_embeddings Embedding".to_string()];
    for i in 0..cfg.n_layers {
        for (p, k) in [
            ("attention_norm", "RmsNorm"),
            ("attention.wq", "Linear"),
            ("attention.wk", "Linear"),
            ("attention.wv", "Linear"),
            ("attention.wo", "Linear"),
            ("ffn_norm", "RmsNorm"),
            ("feed_forward.w1", "Linear"),
            ("feed_forward.w2", "Linear"),
            ("feed_forward.w3", "Linear"),
            ("feed_forward.act", "SiLU"),
        ] {
            want.push(format!("layers.{i}.{p} {k}"));
        }
    }
    want.extend(["norm RmsNorm".to_string(), "output Linear".to_string()]);
    assert_eq!(paths, want);
    let mut vars: Vec<String> = vm
        .data()
        .lock()
        .map_err(|e| e.to_string())?
        .keys()
        .cloned()
        .collect();
    vars.sort();
    let mut params: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    params.sort();
    assert_eq!(vars, params);
    assert!(params.contains(&"layers.1.feed_forward.w3.weight".to_string()));
    Ok(())
}

#[test]
fn a_model_loads_from_its_own_variables() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (a, _vm) = model(cfg, 2)?;
    let tensors: HashMap<String, Tensor> = a.named_parameters().into_iter().collect();
    let b = TinyLlama::new(
        cfg,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )?;
    let x = ids(&cfg, 2, 3)?;
    assert_eq!(max_abs(&(a.forward(&x)? - b.forward(&x)?)?)?, 0.0);
    // A missing variable is an error naming it.
    let mut partial: HashMap<String, Tensor> = a.named_parameters().into_iter().collect();
    partial.remove("layers.0.attention.wk.weight");
    let e = TinyLlama::new(
        cfg,
        VarBuilder::from_tensors(partial, DType::F32, &Device::Cpu),
    )
    .err()
    .ok_or("loaded without wk")?
    .to_string();
    assert!(e.contains("layers.0.attention.wk.weight"), "{e}");
    Ok(())
}

#[test]
fn initialisation_is_the_references() -> Res<()> {
    let cfg = TinyLlamaConfig::shakespeare();
    let (m, _vm) = model(cfg, 3)?;
    let std_of = |t: &Tensor| -> Res<f64> {
        let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        Ok((v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt())
    };
    let small = 0.02 / (2.0 * cfg.n_layers as f64).sqrt();
    for (name, t) in m.named_parameters() {
        if t.rank() == 1 {
            assert_eq!(t.to_vec1::<f32>()?, vec![1f32; cfg.dim], "{name}");
            continue;
        }
        let want = if name.ends_with("wo.weight") || name.ends_with("w2.weight") {
            small
        } else {
            0.02
        };
        let s = std_of(&t)?;
        // At least 8,320 draws per tensor: the sample std is within 4% (5 sigma).
        assert!(
            (s / want - 1.0).abs() < 0.04,
            "{name}: std {s}, want {want}"
        );
    }
    // The same seed gives the same model.
    let (m2, _vm) = model(cfg, 3)?;
    let w = |m: &TinyLlama| m.layers[3].feed_forward.w2.weight().clone();
    assert_eq!(max_abs(&(w(&m) - w(&m2))?)?, 0.0);
    Ok(())
}

#[test]
fn gradients_reach_every_parameter() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (m, _vm) = model(cfg, 5)?;
    let x = ids(&cfg, 2, 1)?;
    let target = ids(&cfg, 2, 2)?.flatten_all()?;
    let loss = candle_nn::loss::cross_entropy(&m.forward(&x)?.reshape(((), cfg.vocab))?, &target)?;
    let grads = loss.backward()?;
    for (name, t) in m.named_parameters() {
        let g = grads.get(&t).ok_or(format!("no gradient for {name}"))?;
        assert!(max_abs(g)? > 0.0, "zero gradient for {name}");
    }
    Ok(())
}

#[test]
fn forward_is_causal_and_refuses_windows_longer_than_the_context() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (m, _vm) = model(cfg, 1)?;
    let long = Tensor::zeros((1, cfg.ctx + 1), DType::U32, &Device::Cpu)?;
    let e = m.forward(&long).unwrap_err().to_string();
    assert!(e.contains("context"), "{e}");
    let x = ids(&cfg, 2, 4)?;
    let full = m.forward(&x)?;
    assert_eq!(full.dims(), &[2, cfg.ctx, cfg.vocab]);
    // A prefix gives the prefix's logits; changing a later token changes nothing before it.
    let short = m.forward(&x.i((.., ..5))?)?;
    assert!(max_abs(&(short - full.i((.., ..5))?)?)? <= 1e-6);
    let mut v: Vec<u32> = x.flatten_all()?.to_vec1()?;
    v[9] = (v[9] + 1) % cfg.vocab as u32;
    let y = m.forward(&Tensor::from_vec(v, x.dims(), &Device::Cpu)?)?;
    assert!(max_abs(&(y.i((0, ..9))? - full.i((0, ..9))?)?)? <= 1e-6);
    assert!(max_abs(&(y.i((0, 9))? - full.i((0, 9))?)?)? > 0.0);
    Ok(())
}

/// Windows of a random period-3 pattern (a b c a b c ...): from the third position on, the
/// next token is the one two positions back, which only attention over positions finds.
fn periodic(cfg: &TinyLlamaConfig, batch: usize, rng: &mut Rng) -> Res<Tensor> {
    let mut v = Vec::with_capacity(batch * (cfg.ctx + 1));
    for _ in 0..batch {
        let p: Vec<u32> = (0..3)
            .map(|_| (rng.next_u64() % cfg.vocab as u64) as u32)
            .collect();
        v.extend((0..=cfg.ctx).map(|t| p[t % 3]));
    }
    Ok(Tensor::from_vec(v, (batch, cfg.ctx + 1), &Device::Cpu)?)
}

/// Mean cross-entropy of the predictions from position 2 on (the predictable ones).
fn loss_from_2(m: &TinyLlama, w: &Tensor, cfg: &TinyLlamaConfig) -> Res<Tensor> {
    let logits = m.forward(&w.i((.., ..cfg.ctx))?)?.i((.., 2..))?;
    let target = w.i((.., 3..))?.contiguous()?.flatten_all()?;
    Ok(candle_nn::loss::cross_entropy(
        &logits.contiguous()?.reshape(((), cfg.vocab))?,
        &target,
    )?)
}

#[test]
fn learns_a_task_that_needs_attention_over_positions() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (m, vm) = model(cfg, 6)?;
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = Rng(7);
    let eval = periodic(&cfg, 64, &mut Rng(99))?;
    let before = loss_from_2(&m, &eval, &cfg)?.to_scalar::<f32>()?;
    for _ in 0..300 {
        let w = periodic(&cfg, 16, &mut rng)?;
        opt.backward_step(&loss_from_2(&m, &w, &cfg)?)?;
    }
    let after = loss_from_2(&m, &eval, &cfg)?.to_scalar::<f32>()?;
    eprintln!("held-out loss from position 2: {before:.3} -> {after:.3}");
    assert!(before > 2.5, "{before}"); // about ln(17) = 2.83 at init
    assert!(after < 0.3, "{after}");
    Ok(())
}
