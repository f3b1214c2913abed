//! The float layers a Llama block needs: RmsNorm, LayerNorm, SiLU, GELU, Dropout, Embedding
//! and Linear on (batch, tokens, features) inputs. Values and gradients against candle-nn and
//! direct formulas; under an eager qconfig the converted model equals the fake-quant model
//! code for code on every preset; QAT checkpoint and int8 files with the float layers; ONNX
//! export; errors.

#[path = "common/onnx_op_count.rs"]
mod onnx_op_count;
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{Optimizer, VarBuilder, VarMap, SGD};
use candle_qat::checkpoint::{load_int8, load_qat_checkpoint, save_int8, save_qat_checkpoint};
use candle_qat::model::QuantModule;
use candle_qat::onnx::{to_onnx, ExportOptions};
use candle_qat::passes::convert;
use candle_qat::prelude::*;
use onnx_op_count::op_count;

const TOKENS: usize = 5;
const WIDTH: usize = 16;

/// QuantStub -> Linear -> RmsNorm -> SiLU -> Dropout -> Linear -> LayerNorm -> GELU (tanh)
/// -> Linear -> GELU (erf) -> DeQuantStub -> RmsNorm (kept float by its path).
#[derive(Clone, Quantizable)]
struct Mlp {
    quant: QuantStub,
    fc1: Linear,
    norm: RmsNorm,
    act: SiLU,
    drop: Dropout,
    fc2: Linear,
    ln: LayerNorm,
    gelu: GELU,
    fc3: Linear,
    gelu_erf: GELU,
    dequant: DeQuantStub,
    final_norm: RmsNorm,
}

impl Mlp {
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(Mlp {
            quant: QuantStub::new(),
            fc1: Linear::new(WIDTH, 32, true, vb.pp("fc1"))?,
            norm: RmsNorm::new(32, 1e-6, vb.pp("norm"))?,
            act: SiLU::new(),
            drop: Dropout::new(0.1)?,
            fc2: Linear::new(32, 24, false, vb.pp("fc2"))?,
            ln: LayerNorm::new(24, 1e-5, vb.pp("ln"))?,
            gelu: GELU::new(Gelu::Tanh),
            fc3: Linear::new(24, 8, true, vb.pp("fc3"))?,
            gelu_erf: GELU::new(Gelu::Erf),
            dequant: DeQuantStub::new(),
            final_norm: RmsNorm::new(8, 1e-5, vb.pp("final_norm"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.quant.forward(x)?;
        let x = self.drop.forward(
            &self
                .act
                .forward(&self.norm.forward(&self.fc1.forward(&x)?)?)?,
        )?;
        let x = self
            .gelu
            .forward(&self.ln.forward(&self.fc2.forward(&x)?)?)?;
        let x = self.gelu_erf.forward(&self.fc3.forward(&x)?)?;
        self.final_norm.forward(&self.dequant.forward(&x)?)
    }
}

/// Token ids -> a float Embedding -> the Mlp.
#[derive(Clone, Quantizable)]
struct Lm {
    embed: Embedding,
    body: Mlp,
}

impl Lm {
    const VOCAB: usize = 11;
    fn new(vb: VarBuilder) -> candle_qat::Result<Self> {
        Ok(Lm {
            embed: Embedding::new(Self::VOCAB, WIDTH, vb.pp("embed_tokens"))?,
            body: Mlp::new(vb.pp("body"))?,
        })
    }
}

impl Module for Lm {
    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.body.forward(&self.embed.forward(ids)?)
    }
}

/// The preset everywhere, but Embedding and the final norm (`path`) stay float.
fn mapping(backend: Backend, final_norm: &str) -> QConfigMapping {
    QConfigMapping::global(QConfig::default_qat(backend))
        .set_type::<Embedding>(None)
        .set_path(final_norm, None)
}

/// A deterministic (4, TOKENS, WIDTH) batch in about [-2, 2) times 1..3.
fn input(seed: u64) -> candle_core::Result<Tensor> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..4 * TOKENS * WIDTH)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect();
    let x = Tensor::from_vec(v, (4, TOKENS, WIDTH), &Device::Cpu)?;
    x * (1.0 + (seed % 3) as f64)
}

fn ids(seed: u32) -> candle_core::Result<Tensor> {
    let v: Vec<u32> = (0..4 * TOKENS as u32)
        .map(|i| (i * 7 + seed * 3) % Lm::VOCAB as u32)
        .collect();
    Tensor::from_vec(v, (4, TOKENS), &Device::Cpu)
}

/// A few SGD steps of a mean-square loss on the output (the Dropout in training).
fn train_steps<M: Module>(
    m: &M,
    vm: &VarMap,
    xs: impl Fn(u64) -> candle_core::Result<Tensor>,
    from: u64,
    to: u64,
) -> candle_qat::Result<Vec<f32>> {
    let mut opt = SGD::new(vm.all_vars(), 0.05)?;
    let mut losses = Vec::new();
    for s in from..to {
        let y = m.forward(&xs(s)?)?;
        let target = Tensor::ones(y.dims(), DType::F32, y.device())?;
        let l = (y - target)?.sqr()?.mean_all()?;
        opt.backward_step(&l)?;
        losses.push(l.to_scalar::<f32>()?);
    }
    Ok(losses)
}

/// Prepared with `backend`, trained, observers off, eval, one forward to note the producers.
fn trained_mlp(backend: Backend) -> candle_qat::Result<(Mlp, VarMap)> {
    let vm = VarMap::new();
    let mut m = Mlp::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    train(&mut m)?;
    prepare_qat(&mut m, &mapping(backend, "final_norm"))?;
    train_steps(&m, &vm, input, 0, 6)?;
    disable_observer(&mut m)?;
    eval(&mut m)?;
    m.forward(&input(0)?)?;
    Ok((m, vm))
}

/// A converted clone of `m` (a clone notes its producers in a forward of its own).
fn converted(m: &Mlp) -> candle_qat::Result<Mlp> {
    let mut c = m.clone();
    c.forward(&input(0)?)?;
    convert(&mut c)?;
    Ok(c)
}

fn flat(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

#[test]
fn norms_match_candle_nn_in_values_and_gradients() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let rms = RmsNorm::new(WIDTH, 1e-6, vb.pp("rms"))?;
    let ln = LayerNorm::new(WIDTH, 1e-5, vb.pp("ln"))?;
    // Non-trivial parameters.
    for (name, v) in vm.data().lock().expect("varmap").iter() {
        v.set(&(Tensor::randn(0f32, 1., v.dims(), &dev)? + 1.0)?)?;
        assert!(name.ends_with("weight") || name.ends_with("bias"), "{name}");
    }
    let x = Var::from_tensor(&(Tensor::randn(0f32, 1., (3, TOKENS, WIDTH), &dev)? + 0.5)?)?;
    let r = Tensor::randn(0f32, 1., (3, TOKENS, WIDTH), &dev)?;
    let close = |a: &Tensor, b: &Tensor, what: &str| -> candle_qat::Result<()> {
        for (p, q) in flat(a)?.iter().zip(flat(b)?) {
            assert!(
                (p - q).abs() <= 1e-4 * (1.0 + q.abs()),
                "{what}: {p} vs {q}"
            );
        }
        Ok(())
    };
    // RmsNorm: candle_nn's RmsNorm and the direct formula.
    let ours = rms.forward(&x)?;
    let nn = candle_nn::RmsNorm::new(rms.weight().clone(), 1e-6).forward(&x)?;
    close(&ours, &nn, "rms_norm vs candle_nn")?;
    let direct = x
        .broadcast_div(&(x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?
        .broadcast_mul(rms.weight())?;
    close(&ours, &direct, "rms_norm vs formula")?;
    let g1 = (&ours * &r)?.sum_all()?.backward()?;
    let g2 = (&direct * &r)?.sum_all()?.backward()?;
    close(g1.get(&x).expect("dx"), g2.get(&x).expect("dx"), "rms dx")?;
    close(
        g1.get(rms.weight()).expect("dw"),
        g2.get(rms.weight()).expect("dw"),
        "rms dw",
    )?;
    // LayerNorm: candle_nn's LayerNorm (biased variance, as PyTorch) and its gradients.
    let ours = ln.forward(&x)?;
    let nn = candle_nn::ops::layer_norm_slow(&x, ln.weight(), ln.bias(), 1e-5)?;
    close(&ours, &nn, "layer_norm")?;
    let g1 = (&ours * &r)?.sum_all()?.backward()?;
    let g2 = (&nn * &r)?.sum_all()?.backward()?;
    for (t, what) in [
        (x.as_tensor(), "ln dx"),
        (ln.weight(), "ln dw"),
        (ln.bias(), "ln db"),
    ] {
        close(g1.get(t).expect("grad"), g2.get(t).expect("grad"), what)?;
    }
    // f64 inputs take candle's composite path with the same result.
    let vm64 = VarMap::new();
    let rms64 = RmsNorm::new(4, 1e-6, VarBuilder::from_varmap(&vm64, DType::F64, &dev))?;
    let x64 = Tensor::new(&[[1f64, -2.0, 3.0, 0.5]], &dev)?;
    let want = 1.0 / ((1.0 + 4.0 + 9.0 + 0.25) / 4.0 + 1e-6f64).sqrt();
    let got = rms64.forward(&x64)?.to_vec2::<f64>()?;
    assert!((got[0][0] - want).abs() < 1e-12, "{got:?}");
    Ok(())
}

#[test]
fn silu_and_gelu_match_the_formulas_with_gradients() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (7, 9), &dev)?))?;
    let xs = flat(&x)?;
    let erf = |v: f64| candle_core::cpu::erf::erf_f64(v);
    type Formula = Box<dyn Fn(f64) -> f64>;
    let cases: Vec<(Box<dyn Module>, Formula, &str)> = vec![
        (
            Box::new(SiLU::new()),
            Box::new(|v: f64| v / (1.0 + (-v).exp())),
            "silu",
        ),
        (
            Box::new(GELU::new(Gelu::Erf)),
            Box::new(move |v: f64| 0.5 * v * (1.0 + erf(v / 2f64.sqrt()))),
            "gelu erf",
        ),
        (
            Box::new(GELU::new(Gelu::Tanh)),
            Box::new(|v: f64| {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())
            }),
            "gelu tanh",
        ),
    ];
    for (layer, f, what) in cases {
        let y = layer.forward(&x)?;
        for (a, v) in flat(&y)?.iter().zip(&xs) {
            let want = f(*v as f64);
            assert!(
                (*a as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{what}({v}): {a} vs {want}"
            );
        }
        // The gradient, against a central difference of the formula.
        let g = y.sum_all()?.backward()?;
        let g = flat(g.get(&x).expect("grad"))?;
        for (a, v) in g.iter().zip(&xs) {
            let h = 1e-4;
            let v = *v as f64;
            let want = (f(v + h) - f(v - h)) / (2.0 * h);
            assert!(
                (*a as f64 - want).abs() < 1e-3,
                "{what}'({v}): {a} vs {want}"
            );
        }
    }
    assert_eq!(GELU::default().approximate(), Gelu::Erf);
    Ok(())
}

#[test]
fn dropout_is_the_identity_outside_training_and_drops_in_training() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    for p in [1.0f32, 1.5, -0.1, f32::NAN] {
        let e = Dropout::new(p).unwrap_err().to_string();
        assert!(e.contains("0 <= p < 1"), "{e}");
    }
    let x = (Tensor::randn(0f32, 1., (64, 64), &dev)? + 3.0)?;
    let mut d = Dropout::new(0.25)?;
    assert_eq!(d.p(), 0.25);
    // A layer starts in training mode, as PyTorch's.
    let y = flat(&d.forward(&x)?)?;
    let xs = flat(&x)?;
    let dropped = y.iter().filter(|v| **v == 0.0).count() as f64 / y.len() as f64;
    assert!((dropped - 0.25).abs() < 0.05, "dropped {dropped}");
    for (a, b) in y.iter().zip(&xs) {
        assert!(*a == 0.0 || (a - b / 0.75).abs() < 1e-5, "{a} from {b}");
    }
    d.set_training(false);
    assert_eq!(flat(&d.forward(&x)?)?, xs);
    let mut z = Dropout::new(0.0)?;
    z.set_training(true);
    assert_eq!(flat(&z.forward(&x)?)?, xs);
    Ok(())
}

#[test]
fn embedding_matches_candle_nn_with_backward_and_refuses_bad_ids() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let emb = Embedding::new(
        6,
        3,
        VarBuilder::from_varmap(&vm, DType::F32, &dev).pp("wte"),
    )?;
    assert_eq!((emb.num_embeddings(), emb.dim()), (6, 3));
    assert!(vm.data().lock().expect("varmap").contains_key("wte.weight"));
    let nn = candle_nn::Embedding::new(emb.weight().clone(), 3);
    for ids in [
        Tensor::new(&[[0u32, 5, 2], [2, 2, 1]], &dev)?,
        Tensor::new(&[4i64, 0], &dev)?,
        Tensor::new(&[[[3u8]]], &dev)?,
    ] {
        let y = emb.forward(&ids)?;
        let mut want = ids.dims().to_vec();
        want.push(3);
        assert_eq!(y.dims(), want.as_slice());
        assert_eq!(flat(&y)?, flat(&nn.forward(&ids)?)?);
    }
    // The backward adds the upstream gradient into each selected row, once per occurrence.
    let ids = Tensor::new(&[[0u32, 5, 2], [2, 2, 1]], &dev)?;
    let g = emb.forward(&ids)?.sum_all()?.backward()?;
    let g = g.get(emb.weight()).expect("weight grad").to_vec2::<f32>()?;
    let counts = [1f32, 1., 3., 0., 0., 1.];
    for (row, c) in g.iter().zip(counts) {
        assert_eq!(row, &vec![c; 3]);
    }
    // Ids outside the table, or not integers: errors, not panics.
    for (bad, needle) in [
        (Tensor::new(&[6u32], &dev)?, "the id 6"),
        (Tensor::new(&[1i64, -1], &dev)?, "the id -1"),
        (Tensor::new(&[1f32], &dev)?, "integer ids"),
    ] {
        let e = emb.forward(&bad).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    assert!(Embedding::new(0, 3, VarBuilder::zeros(DType::F32, &dev)).is_err());
    // Inside a model the error names the module.
    let mut lm = Lm::new(VarBuilder::zeros(DType::F32, &dev))?;
    prepare_qat(&mut lm, &mapping(Backend::X86, "body.final_norm"))?;
    let e = lm
        .forward(&Tensor::new(&[[40u32]], &dev)?)
        .unwrap_err()
        .to_string();
    assert!(e.contains("embed") && e.contains("the id 40"), "{e}");
    Ok(())
}

#[test]
fn an_eager_qconfig_on_embedding_is_refused_before_anything_changes() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let mut lm = Lm::new(VarBuilder::zeros(DType::F32, &dev))?;
    let e = prepare_qat(
        &mut lm,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86)),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("embed") && e.contains("Embedding"), "{e}");
    assert!(e.contains("None"), "{e}");
    // Nothing was prepared: the fix the message names works on the same model.
    assert!(named_modules(&lm)?.iter().all(|m| m.stage == Stage::Float));
    prepare_qat(&mut lm, &mapping(Backend::X86, "body.final_norm"))?;
    let s = summary(&lm)?;
    for kind in [
        "Embedding",
        "RmsNorm",
        "LayerNorm",
        "SiLU",
        "GELU",
        "Dropout",
    ] {
        assert!(s.contains(kind), "{kind} missing from\n{s}");
    }
    Ok(())
}

#[test]
fn linear_takes_batch_tokens_features_in_every_stage() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let fc = Linear::new(
        WIDTH,
        8,
        true,
        VarBuilder::from_varmap(&vm, DType::F32, &dev),
    )?;
    let x = input(1)?;
    let y3 = fc.forward(&x)?;
    assert_eq!(y3.dims(), &[4, TOKENS, 8]);
    let y2 = fc.forward(&x.reshape((4 * TOKENS, WIDTH))?)?;
    assert_eq!(flat(&y3)?, flat(&y2)?);
    // Prepared and converted inside the Mlp, on 3-D inputs (the converted one equals the
    // fake-quant one row for row when the rows are flattened too).
    let (m, _) = trained_mlp(Backend::X86)?;
    let c = converted(&m)?;
    let y = c.forward(&x)?;
    assert_eq!(y.dims(), &[4, TOKENS, 8]);
    assert_eq!(flat(&y)?, flat(&m.forward(&x)?)?);
    Ok(())
}

#[test]
fn converted_equals_fake_quant_code_for_code_on_every_preset() -> candle_qat::Result<()> {
    for backend in [Backend::Fbgemm, Backend::X86, Backend::Qnnpack] {
        let (m, _) = trained_mlp(backend)?;
        // Each normalisation and activation got an output fake-quant; Dropout and the
        // None-mapped final norm none.
        for (layer, n) in [
            (m.norm.fake_quants().len(), 1),
            (m.ln.fake_quants().len(), 1),
            (m.act.fake_quants().len(), 1),
            (m.gelu.fake_quants().len(), 1),
            (m.drop.fake_quants().len(), 0),
            (m.final_norm.fake_quants().len(), 0),
        ] {
            assert_eq!(layer, n, "{backend:?}");
        }
        let c = converted(&m)?;
        assert_eq!(c.norm.stage(), Stage::Converted);
        assert_eq!(c.final_norm.stage(), Stage::Float);
        for s in 10..14 {
            let x = input(s)?;
            // The converted body, up to the DeQuantStub, gives codes equal to the
            // fake-quant values' codes: the float outputs are then equal bit for bit.
            let a = flat(&m.forward(&x)?)?;
            let b = flat(&c.forward(&x)?)?;
            let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
            assert_eq!(differ, 0, "{backend:?}: {differ} of {} differ", a.len());
            // Not a constant output.
            assert!(a.iter().any(|v| (v - a[0]).abs() > 1e-3), "{backend:?}");
        }
        // The converted RmsNorm takes codes; a float input is named.
        let e = c
            .norm
            .forward(&Tensor::zeros((1, 32), DType::F32, &Device::Cpu)?)
            .unwrap_err()
            .to_string();
        assert!(e.contains("norm") && e.contains("u8 codes"), "{e}");
    }
    Ok(())
}

#[test]
fn a_none_qconfig_keeps_the_layers_float() -> candle_qat::Result<()> {
    let vm = VarMap::new();
    let mut m = Mlp::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    let before = {
        let mut e = m.clone();
        eval(&mut e)?;
        flat(&e.forward(&input(2)?)?)?
    };
    prepare_qat(
        &mut m,
        &QConfigMapping::global(QConfig::default_qat(Backend::X86))
            .set_type::<RmsNorm>(None)
            .set_type::<LayerNorm>(None)
            .set_type::<SiLU>(None)
            .set_type::<GELU>(None),
    )?;
    for k in [m.norm.stage(), m.ln.stage(), m.act.stage(), m.gelu.stage()] {
        assert_eq!(k, Stage::Float);
    }
    assert!(m.norm.fake_quants().is_empty() && m.gelu.fake_quants().is_empty());
    // Float layers compute as before preparation.
    let mut f = Mlp::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    eval(&mut f)?;
    assert_eq!(flat(&f.forward(&input(2)?)?)?, before);
    Ok(())
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("candle-qat-tlayers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

#[test]
fn qat_checkpoint_with_the_new_layers_resumes_identically() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    let file = tmp("lm-qat.safetensors");
    let prepared = || -> candle_qat::Result<(Lm, VarMap)> {
        let vm = VarMap::new();
        let mut m = Lm::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        prepare_qat(&mut m, &mapping(Backend::X86, "body.final_norm"))?;
        // Dropout's masks are random: resume comparisons run without it.
        m.body.drop.set_training(false);
        Ok((m, vm))
    };
    let (mut a, va) = prepared()?;
    train_steps(&a, &va, |s| ids(s as u32), 0, 4)?;
    save_qat_checkpoint(&mut a, &va, &file)?;
    let (mut b, vb) = prepared()?;
    load_qat_checkpoint(&mut b, &vb, &file)?;
    let la = train_steps(&a, &va, |s| ids(s as u32), 4, 8)?;
    let lb = train_steps(&b, &vb, |s| ids(s as u32), 4, 8)?;
    assert_eq!(la, lb);
    assert!(la[la.len() - 1] < la[0], "loss did not fall: {la:?}");
    Ok(())
}

#[test]
fn int8_file_restores_the_float_embedding_and_norms() -> candle_qat::Result<()> {
    let dev = Device::Cpu;
    for backend in [Backend::X86, Backend::Qnnpack] {
        let vm = VarMap::new();
        let mut a = Lm::new(VarBuilder::from_varmap(&vm, DType::F32, &dev))?;
        prepare_qat(&mut a, &mapping(backend, "body.final_norm"))?;
        train_steps(&a, &vm, |s| ids(s as u32), 0, 5)?;
        disable_observer(&mut a)?;
        eval(&mut a)?;
        a.forward(&ids(0)?)?;
        convert(&mut a)?;
        let file = tmp(&format!("lm-{backend:?}.safetensors"));
        save_int8(&mut a, &file)?;
        let mut b = Lm::new(VarBuilder::zeros(DType::F32, &dev))?;
        load_int8(&mut b, &file)?;
        let (ya, yb) = (flat(&a.forward(&ids(9)?)?)?, flat(&b.forward(&ids(9)?)?)?);
        assert_eq!(ya, yb, "{backend:?}");
        // The float parameters came back (trained, not the zeros the model was built with).
        assert_eq!(flat(b.embed.weight())?, flat(a.embed.weight())?);
        assert_eq!(flat(b.body.norm.weight())?, flat(a.body.norm.weight())?);
        assert_eq!(flat(b.body.ln.bias())?, flat(a.body.ln.bias())?);
        assert_eq!(
            flat(b.body.final_norm.weight())?,
            flat(a.body.final_norm.weight())?
        );
        assert!(flat(b.body.ln.bias())?.iter().any(|v| *v != 0.0));
    }
    Ok(())
}

#[test]
fn the_new_layers_export_to_onnx_as_opset_13_ops() -> candle_qat::Result<()> {
    let (m, _) = trained_mlp(Backend::X86)?;
    let c = converted(&m)?;
    let x = input(3)?;
    let (model, report) = to_onnx(&c, |m, x| m.forward(x), &x, &ExportOptions::default())?;
    let count = |op: &str| op_count(&report, op);
    // Two RmsNorms and a LayerNorm: one ReduceMean each, two for the LayerNorm.
    assert_eq!(count("ReduceMean"), 4, "{:?}", report.op_counts);
    assert_eq!(count("Sqrt"), 3);
    assert_eq!(count("Sigmoid"), 1); // SiLU
    assert_eq!(count("Erf"), 1); // GELU erf
    assert_eq!(count("Tanh"), 1); // GELU tanh
    assert_eq!(count("LayerNormalization"), 0); // opset 17, not ours
    let graph = model.graph.expect("graph");
    // The norm parameters are initializers with the layers' names.
    for name in ["norm.weight", "ln.weight", "ln.bias", "final_norm.weight"] {
        assert!(
            graph
                .initializer
                .iter()
                .any(|t| t.name.as_deref() == Some(name)),
            "{name}"
        );
    }
    Ok(())
}

/// Runs the float ops of an exported graph with candle ops (the subset a float Mlp writes).
fn run_float_graph(
    g: &candle_qat::onnx::proto::GraphProto,
    x: &Tensor,
) -> candle_qat::Result<Tensor> {
    use std::collections::HashMap;
    let dev = Device::Cpu;
    let mut vals: HashMap<String, Tensor> = HashMap::new();
    vals.insert("input".into(), x.clone());
    for t in &g.initializer {
        let raw = t.raw_data.clone().unwrap_or_default();
        let v: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        vals.insert(
            t.name.clone().unwrap_or_default(),
            Tensor::from_vec(v, dims, &dev)?,
        );
    }
    for n in &g.node {
        let op = n.op_type.as_deref().unwrap_or_default();
        let i = |k: usize| vals[&n.input[k]].clone();
        let attr = |name: &str| n.attribute.iter().find(|a| a.name.as_deref() == Some(name));
        let y = match op {
            "Identity" => i(0),
            "Add" => i(0).broadcast_add(&i(1))?,
            "Sub" => i(0).broadcast_sub(&i(1))?,
            "Mul" => i(0).broadcast_mul(&i(1))?,
            "Div" => i(0).broadcast_div(&i(1))?,
            "Sqrt" => i(0).sqrt()?,
            "Sigmoid" => candle_nn::ops::sigmoid(&i(0))?,
            "Tanh" => i(0).tanh()?,
            "Erf" => i(0).erf()?,
            "ReduceMean" => {
                let axes = &attr("axes").expect("axes").ints;
                assert_eq!(axes, &[-1]);
                i(0).mean_keepdim(D::Minus1)?
            }
            "Transpose" => i(0).t()?,
            "MatMul" => i(0).broadcast_matmul(&i(1))?,
            "Gemm" => i(0).matmul(&i(1).t()?)?.broadcast_add(&i(2))?,
            other => panic!("the float graph has an unexpected {other}"),
        };
        vals.insert(n.output[0].clone(), y);
    }
    Ok(vals["output"].clone())
}

#[test]
fn the_onnx_decompositions_compute_the_layers_values() -> candle_qat::Result<()> {
    let vm = VarMap::new();
    let mut m = Mlp::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    // Non-trivial norm parameters.
    for (name, v) in vm.data().lock().expect("varmap").iter() {
        if name.contains("norm") || name.starts_with("ln") {
            v.set(&(Tensor::randn(0f32, 0.5, v.dims(), &Device::Cpu)? + 1.0)?)?;
        }
    }
    eval(&mut m)?;
    let x = input(4)?;
    let (model, report) = to_onnx(&m, |m, x| m.forward(x), &x, &ExportOptions::default())?;
    for op in ["ReduceMean", "Sqrt", "Sigmoid", "Erf", "Tanh", "MatMul"] {
        assert!(
            report.op_counts.iter().any(|(o, _)| o == op),
            "{op}: {:?}",
            report.op_counts
        );
    }
    let got = flat(&run_float_graph(&model.graph.expect("graph"), &x)?)?;
    let want = flat(&m.forward(&x)?)?;
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    Ok(())
}
