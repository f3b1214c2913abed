//! GGUF export of the tiny Llama (examples/common/tiny_llama.rs), proved in candle-transformers:
//! a 2-block random float model written as F32 GGUF by `LlamaGguf`, loaded by
//! `quantized_llama::ModelWeights::from_gguf`, gives our forward's logits at every position
//! (tokens fed one at a time through its KV cache, and a whole prompt at once). Also: the
//! file's metadata keys and value types, and the writer's errors. (The model's own tests are
//! in tests/tiny_llama.rs.)
//!
//! The test leaves the file and what it should hold in `QAT_GGUF_DIR` (default: a
//! directory under the target dir), which `tools/gguf-check/check_gguf.py` (run by
//! `.ci/run`) reads with llama.cpp's `gguf` package.

#[path = "common/llama_fixture.rs"]
mod llama_fixture;
#[path = "../examples/common/tiny_llama.rs"]
mod tiny_llama;

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use candle_qat::gguf::{LlamaBlock, LlamaGguf, LlamaHparams};
use candle_qat::prelude::*;
use candle_transformers::models::quantized_llama::ModelWeights;
use llama_fixture::{drawn_model, ids, Res, Rng};
use tiny_llama::{TinyLlama, TinyLlamaConfig};

fn out_dir() -> PathBuf {
    std::env::var_os("QAT_GGUF_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gguf-check"))
}

/// The tiny config with weights 15x the reference's init (std 0.3: sharp attention, so
/// the rotary phases and the mask matter) and RmsNorm weights drawn around 1 (so a norm
/// written under another norm's name shows).
fn random_model(cfg: TinyLlamaConfig, seed: u64) -> Res<(TinyLlama, VarMap)> {
    let mut rng = Rng(seed);
    let (model, vm) = drawn_model(cfg, &mut rng, 15.0)?;
    // In name order: the VarMap is a HashMap, whose order changes from run to run.
    let mut vars: Vec<(String, candle_core::Var)> = vm
        .data()
        .lock()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in &vars {
        if var.rank() == 1 {
            let v: Vec<f32> = (0..var.elem_count())
                .map(|_| (1.0 + 0.3 * rng.normal()) as f32)
                .collect();
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu)?)?;
            assert!(name.ends_with("norm.weight"), "{name}");
        }
    }
    Ok((model, vm))
}

/// Writes `<name>.expect.json` beside `<name>.gguf` in `dir`: what the file holds (metadata
/// with GGUF value types, tensors with types, shapes and value sums), for
/// tools/gguf-check/check_gguf.py.
fn write_expect(model: &TinyLlama, dir: &std::path::Path, name: &str) -> Res<()> {
    let cfg = *model.config();
    let tensors = model.gguf().tensors()?;
    let mut entries = Vec::new();
    for (name, t) in &tensors {
        let v = t
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let sumsq: f64 = v.iter().map(|&x| (x as f64) * (x as f64)).sum();
        entries.push(serde_json::json!({
            "name": name,
            "shape": t.shape().dims(),
            "type": format!("{:?}", t.dtype()),
            "sum": sum,
            "sum_sq": sumsq,
        }));
    }
    let expect = serde_json::json!({
        "file": format!("{name}.gguf"),
        "metadata": {
            "general.architecture": ["STRING", "llama"],
            "general.name": ["STRING", "candle-qat tiny llama"],
            "llama.context_length": ["UINT32", cfg.ctx],
            "llama.embedding_length": ["UINT32", cfg.dim],
            "llama.block_count": ["UINT32", cfg.n_layers],
            "llama.feed_forward_length": ["UINT32", cfg.hidden],
            "llama.attention.head_count": ["UINT32", cfg.n_heads],
            "llama.attention.head_count_kv": ["UINT32", cfg.n_heads],
            "llama.rope.dimension_count": ["UINT32", cfg.head_dim()],
            "llama.vocab_size": ["UINT32", cfg.vocab],
            "llama.attention.layer_norm_rms_epsilon": ["FLOAT32", cfg.norm_eps as f32],
            "llama.rope.freq_base": ["FLOAT32", cfg.rope_base],
        },
        "tensors": entries,
    });
    std::fs::write(
        dir.join(format!("{name}.expect.json")),
        serde_json::to_string_pretty(&expect)?,
    )?;
    Ok(())
}

fn load(path: &std::path::Path) -> Res<ModelWeights> {
    let mut f = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut f)?;
    Ok(ModelWeights::from_gguf(content, &mut f, &Device::Cpu)?)
}

/// max |a - b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok(d / m)
}

#[test]
fn f32_export_runs_in_quantized_llama_with_our_logits_at_every_position() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (model, _vm) = random_model(cfg, 7)?;
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("tiny_llama_f32.gguf");
    model.gguf().write(&path)?;
    assert!(!dir.join("tiny_llama_f32.gguf.partial").exists());

    let batch = ids(&cfg, 2, 11)?;
    let ours = model.forward(&batch)?; // (2, ctx, vocab)
    assert_eq!(ours.dims(), &[2, cfg.ctx, cfg.vocab]);
    let mut worst = 0f32;
    for s in 0..2 {
        let seq = batch.i(s..s + 1)?;
        // One token at a time through the KV cache: quantized_llama returns the last
        // position, so position p's logits come from the call with index_pos p.
        let mut q = load(&path)?;
        for p in 0..cfg.ctx {
            let theirs = q.forward(&seq.i((.., p..p + 1))?, p)?.squeeze(0)?;
            let r = rel_diff(&theirs, &ours.i((s, p))?)?;
            worst = worst.max(r);
            assert!(
                r <= 1e-4,
                "sequence {s} position {p}: relative difference {r}"
            );
        }
        // The whole prompt at once (its causal mask path) gives the last position.
        let mut q = load(&path)?;
        let last = q.forward(&seq, 0)?.squeeze(0)?;
        let r = rel_diff(&last, &ours.i((s, cfg.ctx - 1))?)?;
        assert!(
            r <= 1e-4,
            "sequence {s}, whole prompt: relative difference {r}"
        );
    }
    eprintln!("worst per-position max|dlogit|/max|logit|: {worst:.2e}");
    // The logits depend on the positions (rotary phases) and are far from uniform: the
    // comparison above would catch a wrong rotation or mask.
    let spread = ours.max_all()?.to_scalar::<f32>()? - ours.min_all()?.to_scalar::<f32>()?;
    assert!(spread > 1.0, "logit spread {spread}");

    // What the file holds, for tools/gguf-check/check_gguf.py.
    write_expect(&model, &dir, "tiny_llama_f32")?;
    Ok(())
}

#[test]
fn the_file_holds_the_keys_and_value_types_quantized_llama_reads() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (model, _vm) = random_model(cfg, 3)?;
    let mut buf = std::io::Cursor::new(Vec::new());
    model.gguf().write_to(&mut buf)?;
    buf.set_position(0);
    let c = gguf_file::Content::read(&mut buf)?;
    let md = |k: &str| c.metadata.get(k).ok_or(format!("no {k}"));
    assert_eq!(md("general.architecture")?.to_string()?, "llama");
    for (k, v) in [
        ("llama.attention.head_count", cfg.n_heads),
        ("llama.attention.head_count_kv", cfg.n_heads),
        ("llama.block_count", cfg.n_layers),
        ("llama.embedding_length", cfg.dim),
        ("llama.rope.dimension_count", cfg.head_dim()),
        ("llama.context_length", cfg.ctx),
        ("llama.feed_forward_length", cfg.hidden),
    ] {
        assert_eq!(md(k)?.to_u32()? as usize, v, "{k}");
    }
    assert_eq!(
        md("llama.attention.layer_norm_rms_epsilon")?.to_f32()?,
        1e-5f32
    );
    assert_eq!(md("llama.rope.freq_base")?.to_f32()?, 10000f32);
    let mut names: Vec<&String> = c.tensor_infos.keys().collect();
    names.sort();
    assert_eq!(names.len(), 2 + 9 * cfg.n_layers + 1);
    for (name, info) in &c.tensor_infos {
        assert_eq!(info.ggml_dtype, GgmlDType::F32, "{name}");
    }
    let shape = |n: &str| c.tensor_infos[n].shape.dims().to_vec();
    assert_eq!(shape("token_embd.weight"), [cfg.vocab, cfg.dim]);
    assert_eq!(shape("output.weight"), [cfg.vocab, cfg.dim]);
    assert_eq!(shape("blk.1.ffn_gate.weight"), [cfg.hidden, cfg.dim]);
    assert_eq!(shape("blk.1.ffn_down.weight"), [cfg.dim, cfg.hidden]);
    assert_eq!(shape("blk.0.attn_norm.weight"), [cfg.dim]);
    // The values are the layers' own: blk.1.ffn_up is layers.1.feed_forward.w3.
    let up = c
        .tensor(&mut buf, "blk.1.ffn_up.weight", &Device::Cpu)?
        .dequantize(&Device::Cpu)?;
    let w3 = model.layers[1].feed_forward.w3.weight();
    assert_eq!(rel_diff(&up, w3)?, 0.0);
    Ok(())
}

/// The tiny model's hyper-parameters, for hand-built writers.
fn hparams(cfg: &TinyLlamaConfig) -> LlamaHparams {
    LlamaHparams {
        head_count: cfg.n_heads,
        head_count_kv: cfg.n_heads,
        block_count: cfg.n_layers,
        embedding_length: cfg.dim,
        context_length: cfg.ctx,
        rms_norm_eps: cfg.norm_eps,
        rope_freq_base: cfg.rope_base,
    }
}

fn block(b: &tiny_llama::Block) -> LlamaBlock<'_> {
    LlamaBlock {
        attn_norm: &b.attention_norm,
        attn_q: &b.attention.wq,
        attn_k: &b.attention.wk,
        attn_v: &b.attention.wv,
        attn_output: &b.attention.wo,
        ffn_norm: &b.ffn_norm,
        ffn_gate: &b.feed_forward.w1,
        ffn_down: &b.feed_forward.w2,
        ffn_up: &b.feed_forward.w3,
    }
}

/// The writer of `m` with every role but the output; `hp` for the hyper-parameters.
fn without_output(m: &TinyLlama, hp: LlamaHparams) -> LlamaGguf<'_> {
    let mut g = LlamaGguf::new(hp).token_embd(&m.tok_embeddings);
    for (i, b) in m.layers.iter().enumerate() {
        g = g.block(i, block(b));
    }
    g.output_norm(&m.norm)
}

fn err(g: &LlamaGguf) -> String {
    g.tensors().map(|_| ()).unwrap_err().to_string()
}

#[test]
fn the_writer_refuses_models_it_cannot_name_and_writes_nothing() -> Res<()> {
    let cfg = TinyLlamaConfig::tiny();
    let (m, _vm) = random_model(cfg, 2)?;
    let hp = hparams(&cfg);
    let dir = out_dir().join("refused");
    std::fs::create_dir_all(&dir)?;

    // No output: the loader would tie it to token_embd; refused, and no file appears.
    let g = without_output(&m, hp.clone());
    let e = err(&g);
    assert!(e.contains("`output`") && e.contains("token_embd"), "{e}");
    let path = dir.join("no_output.gguf");
    assert!(g.write(&path).is_err());
    assert!(!path.exists() && !dir.join("no_output.gguf.partial").exists());

    // A missing block, one given twice, one beyond block_count.
    let mut g = LlamaGguf::new(hp.clone()).token_embd(&m.tok_embeddings);
    g = g.block(0, block(&m.layers[0]));
    let g = g.output_norm(&m.norm).output(&m.output);
    let e = err(&g);
    assert!(e.contains("block 1") && e.contains("missing"), "{e}");
    let e = err(&g.clone().block(0, block(&m.layers[1])));
    assert!(e.contains("block 0 given twice"), "{e}");
    let e = err(&g
        .clone()
        .block(1, block(&m.layers[1]))
        .block(2, block(&m.layers[0])));
    assert!(e.contains("block 2 given but block_count is 2"), "{e}");
    // An absurd block count is a missing block, not an allocation.
    let huge = LlamaHparams {
        block_count: usize::MAX,
        ..hp.clone()
    };
    let e = err(&without_output(&m, huge).output(&m.output));
    assert!(e.contains("block 2 (`blk.2.*`) is missing"), "{e}");

    // Head counts that do not divide.
    let e = err(&without_output(
        &m,
        LlamaHparams {
            head_count: 3,
            head_count_kv: 3,
            ..hp.clone()
        },
    )
    .output(&m.output));
    assert!(
        e.contains("embedding_length 32") && e.contains("head_count 3"),
        "{e}"
    );
    let e = err(&without_output(
        &m,
        LlamaHparams {
            head_count_kv: 3,
            ..hp.clone()
        },
    )
    .output(&m.output));
    assert!(
        e.contains("head_count_kv 3 does not divide head_count 2"),
        "{e}"
    );
    // Grouped-query metadata whose k/v projections are full width: the shapes disagree.
    let e = err(&without_output(
        &m,
        LlamaHparams {
            head_count_kv: 1,
            ..hp.clone()
        },
    )
    .output(&m.output));
    assert!(
        e.contains("`blk.0.attn_k.weight` (Meta Llama's `layers.0.attention.wk`)")
            && e.contains("(16, 32) is needed"),
        "{e}"
    );
    // A width that is not the embedding's.
    let e = err(&without_output(
        &m,
        LlamaHparams {
            embedding_length: 64,
            head_count: 2,
            ..hp.clone()
        },
    )
    .output(&m.output));
    assert!(e.contains("`token_embd.weight`") && e.contains("64"), "{e}");
    // The norms' eps must be the file's one value.
    let e = err(&without_output(
        &m,
        LlamaHparams {
            rms_norm_eps: 1e-6,
            ..hp.clone()
        },
    )
    .output(&m.output));
    assert!(
        e.contains("`blk.0.attn_norm.weight`") && e.contains("eps"),
        "{e}"
    );

    // An output of another vocabulary, and one with a bias.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let other = Linear::new(cfg.dim, cfg.vocab + 1, false, vb.clone())?;
    let e = err(&without_output(&m, hp.clone()).output(&other));
    assert!(
        e.contains("`output.weight`") && e.contains("(17, 32) is needed"),
        "{e}"
    );
    let biased = Linear::new(cfg.dim, cfg.vocab, true, vb)?;
    let e = err(&without_output(&m, hp.clone()).output(&biased));
    assert!(e.contains("bias"), "{e}");

    // A model prepared for eager int8 QAT: refused at its first prepared layer, by path.
    let mut prepared = m.clone();
    prepare_qat(
        &mut prepared,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)).set_type::<Embedding>(None),
    )?;
    let e = err(&prepared.gguf());
    assert!(
        e.contains("layers.0.attention_norm") && e.contains("prepared for QAT"),
        "{e}"
    );

    // An unwritable path: an error naming it, nothing left behind.
    let bad = dir.join("no/such/dir/model.gguf");
    let e = m.gguf().write(&bad).unwrap_err().to_string();
    assert!(e.contains("no/such/dir"), "{e}");
    Ok(())
}

/// Mean next-token cross-entropy over every position of `logits` (b, t, v) for `ids` (b, t)
/// (the last position has no target and is skipped), and the argmax at every position.
fn next_token_stats(logits: &Tensor, ids: &Tensor) -> Res<(f64, Vec<u32>)> {
    let (b, t, v) = logits.dims3()?;
    let l = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let y = ids.narrow(1, 1, t - 1)?.flatten_all()?;
    let ce = candle_nn::loss::cross_entropy(&l, &y)?.to_scalar::<f32>()? as f64;
    let argmax = logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    Ok((ce, argmax))
}

/// Per-position logits of the GGUF file in quantized_llama, teacher-forced one token at a
/// time through its KV cache: (b, t, v).
fn gguf_logits(path: &std::path::Path, ids: &Tensor) -> Res<Tensor> {
    let (b, t) = ids.dims2()?;
    let mut rows = Vec::with_capacity(b);
    for s in 0..b {
        let mut q = load(path)?;
        let mut pos = Vec::with_capacity(t);
        for p in 0..t {
            pos.push(q.forward(&ids.i((s..s + 1, p..p + 1))?, p)?.squeeze(0)?);
        }
        rows.push(Tensor::stack(&pos, 0)?);
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// How `got` departs from `want` (both (b, t, v)): relative cross-entropy difference,
/// fraction of positions with the same argmax, and the quantiles of the per-position
/// max|dlogit| / max|logit|.
fn agreement(got: &Tensor, want: &Tensor, ids: &Tensor) -> Res<(f64, f64, [f32; 3])> {
    let (ce_got, am_got) = next_token_stats(got, ids)?;
    let (ce_want, am_want) = next_token_stats(want, ids)?;
    let same = am_got.iter().zip(&am_want).filter(|(a, b)| a == b).count();
    let (b, t, v) = want.dims3()?;
    let d = (got - want)?.abs()?.reshape((b * t, v))?.max(D::Minus1)?;
    let m = want.abs()?.reshape((b * t, v))?.max(D::Minus1)?;
    let mut r = (d / m)?.to_vec1::<f32>()?;
    r.sort_by(f32::total_cmp);
    let q = |f: f64| r[((r.len() - 1) as f64 * f) as usize];
    Ok((
        (ce_got - ce_want).abs() / ce_want,
        same as f64 / am_got.len() as f64,
        [q(0.5), q(0.99), q(1.0)],
    ))
}

/// Greedy decoding from `prompt` for `n` tokens, ours (the whole window each step) and the
/// file's (its KV cache): the index of the first token where they part, if any.
fn greedy_divergence(
    model: &TinyLlama,
    path: &std::path::Path,
    prompt: &[u32],
    n: usize,
) -> Res<Option<usize>> {
    let mut ours = prompt.to_vec();
    let mut theirs = prompt.to_vec();
    let mut q = load(path)?;
    let mut last = None;
    for (p, &tok) in prompt.iter().enumerate() {
        last = Some(q.forward(&Tensor::new(&[[tok]], &Device::Cpu)?, p)?);
    }
    for k in 0..n {
        let x = Tensor::new(ours.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&x)?;
        let next = logits
            .i((0, ours.len() - 1))?
            .argmax(0)?
            .to_scalar::<u32>()?;
        ours.push(next);
        let l = last.take().ok_or("no logits")?;
        let t = l.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        theirs.push(t);
        if next != t {
            return Ok(Some(k));
        }
        last = Some(q.forward(&Tensor::new(&[[t]], &Device::Cpu)?, theirs.len() - 1)?);
    }
    Ok(None)
}

#[test]
fn ggml_qat_model_converts_exports_and_runs_in_quantized_llama_as_trained() -> Res<()> {
    use candle_nn::Optimizer;
    let cfg = TinyLlamaConfig::tiny();
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    for (ty, name) in [
        (BlockType::Q4_0, "tiny_llama_q4_0"),
        (BlockType::Q8_0, "tiny_llama_q8_0"),
    ] {
        let (mut model, vm) = random_model(cfg, 21)?;
        prepare_qat(&mut model, &QConfigMapping::global(QConfig::ggml(ty)))?;
        // A few QAT steps of next-token training (the weights move off their draw).
        let mut opt = candle_nn::AdamW::new_lr(vm.all_vars(), 1e-3)?;
        for step in 0..3 {
            let x = ids(&cfg, 4, 100 + step)?;
            let logits = model.forward(&x)?;
            let (ce, _) = next_token_stats(&logits, &x)?;
            let l = logits
                .narrow(1, 0, cfg.ctx - 1)?
                .reshape(((cfg.ctx - 1) * 4, cfg.vocab))?;
            let y = x.narrow(1, 1, cfg.ctx - 1)?.flatten_all()?;
            opt.backward_step(&candle_nn::loss::cross_entropy(&l, &y)?)?;
            assert!(ce.is_finite());
        }
        let test = ids(&cfg, 64, 500)?;
        let fq = model.forward(&test)?;
        let prepared = model.clone();
        candle_qat::passes::convert(&mut model)?;
        let converted = model.forward(&test)?;
        let path = dir.join(format!("{name}.gguf"));
        model.gguf().write(&path)?;
        write_expect(&model, &dir, name)?;
        // The file's Linears are the converted model's blocks, in the block type.
        let mut f = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut f)?;
        assert_eq!(
            content.tensor_infos["blk.0.attn_q.weight"].ggml_dtype,
            ty.dtype()
        );
        assert_eq!(content.tensor_infos["output.weight"].ggml_dtype, ty.dtype());
        assert_eq!(
            content.tensor_infos["token_embd.weight"].ggml_dtype,
            GgmlDType::F32
        );
        let deployed = gguf_logits(&path, &test)?;
        for (what, got) in [("converted", &converted), ("GGUF", &deployed)] {
            let (ce, same, q) = agreement(got, &fq, &test)?;
            eprintln!(
                "{name} {what} vs fake-quant: cross-entropy {ce:.1e} relative, argmax {:.2}% \
                 of positions, max|dlogit|/max|logit| median {:.1e} p99 {:.1e} max {:.1e}",
                100.0 * same,
                q[0],
                q[1],
                q[2]
            );
            assert!(ce <= 1e-4, "{name} {what}: cross-entropy {ce:e} relative");
            assert!(same >= 0.99, "{name} {what}: argmax agreement {same}");
        }
        let prompt: Vec<u32> = (0..4).map(|i| (i * 5 % cfg.vocab) as u32).collect();
        let part = greedy_divergence(&prepared, &path, &prompt, cfg.ctx - prompt.len())?;
        eprintln!(
            "{name}: greedy decoding parts at generated token {part:?} of {}",
            cfg.ctx - 4
        );
    }
    Ok(())
}
