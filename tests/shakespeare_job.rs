//! The second main job (examples/shakespeare_qat.rs) shortened, end to end through the same
//! code (examples/common/shakespeare_job.rs): a few float steps, the float control, PTQ,
//! QAT, convert -> GGUF -> candle-transformers' quantized_llama, tokens/s, greedy samples,
//! the table and the summary line; then `--resume` from the float checkpoint with a scheme
//! that stays in fake-quant form.

#[path = "../examples/common/fused_adamw.rs"]
mod fused_adamw;
#[path = "../examples/common/idx.rs"]
mod idx;
#[path = "../examples/common/lm_training.rs"]
mod lm_training;
#[path = "../examples/common/shakespeare.rs"]
mod shakespeare;
#[path = "../examples/common/shakespeare_job.rs"]
mod shakespeare_job;
#[path = "../examples/common/tiny_llama.rs"]
mod tiny_llama;
#[path = "../examples/common/trainer.rs"]
mod trainer;

use candle_core::Device;
use shakespeare_job::{recovery, JobConfig, SchemeArg};

fn short(scheme: SchemeArg, out: &std::path::Path, resume: bool) -> JobConfig {
    JobConfig {
        float_steps: 20,
        qat_steps: 4,
        batch_size: 4,
        out: Some(out.to_path_buf()),
        resume,
        progress_windows: 8,
        eval_every: 0,
        final_windows: Some(24),
        sample_chars: 12,
        speed_windows: 1,
        verbose: false,
        ..JobConfig::default_for(scheme, 3)
    }
}

#[test]
fn the_shortened_job_trains_quantizes_deploys_and_resumes() -> trainer::AnyResult<()> {
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("shakespeare_job");
    let _ = std::fs::remove_dir_all(&out);
    let dev = Device::Cpu;

    let r = shakespeare_job::run(&short(SchemeArg::Q4_0, &out, false), &dev)?;
    r.print();
    let uniform = (65f64).ln();
    for (name, l) in [
        ("float", r.float),
        ("control", r.control),
        ("PTQ", r.ptq),
        ("QAT", r.qat),
    ] {
        assert!(
            l.full.is_finite() && l.progress.is_finite(),
            "{name}: {l:?}"
        );
        assert!(l.full < uniform - 0.1, "{name} did not train: {l:?}");
    }
    // The control and QAT trained beyond the float model.
    assert!(
        r.control.full < r.float.full,
        "{:?} {:?}",
        r.control,
        r.float
    );
    assert!(r.qat.full < r.float.full, "{:?} {:?}", r.qat, r.float);
    assert_eq!((r.final_windows, r.progress_windows), (24, 8));
    // The GGUF in quantized_llama gives the QAT model's loss (within 0.2%).
    let d = r.deployed.ok_or("q4_0 must deploy")?;
    for (got, want) in [(d.full, r.qat.full), (d.progress, r.qat.progress)] {
        assert!(
            (got - want).abs() <= 2e-3 * want,
            "deployed {got} vs QAT {want}"
        );
    }
    let (tensors, file) = r.gguf_bytes.ok_or("no GGUF size")?;
    assert!(tensors * 5 < r.f32_bytes, "{tensors} vs {}", r.f32_bytes);
    assert!(file as usize >= tensors);
    let (q, f) = r.tokens_per_s.ok_or("no tokens/s")?;
    assert!(q > 0.0 && f > 0.0);
    assert!(r.deployed_parts_at.is_some());
    assert_eq!(r.samples.len(), 3);
    for (label, text) in &r.samples {
        assert!(text.starts_with("ROMEO:"), "{label}: {text:?}");
        assert_eq!(text.chars().count(), 6 + 12, "{label}: {text:?}");
    }
    let line = r.summary_line();
    assert!(
        line.starts_with(&format!(
            "summary: scheme=q4_0 float={:.4} control={:.4} ptq={:.4} qat={:.4} deployed={:.4} \
             recovery=",
            r.float.full, r.control.full, r.ptq.full, r.qat.full, d.full
        )),
        "{line}"
    );
    for f in ["float.safetensors", "qat_q4_0.safetensors", "model.gguf"] {
        assert!(out.join(f).is_file(), "{f} not written");
    }
    let steps = r.float_steps.as_ref().ok_or("float phase not timed")?;
    assert_eq!((steps.steps, r.qat_steps.steps), (20, 4));

    // --resume: the float model is the checkpoint's (same loss, no float training);
    // int3-g32 has no GGUF type and stays fake-quant.
    let r2 = shakespeare_job::run(&short(SchemeArg::Int3G32, &out, true), &dev)?;
    r2.print();
    assert_eq!(r2.float, r.float);
    assert!(r2.float_steps.is_none());
    // The control is the same training from the same weights and batches.
    assert!((r2.control.full - r.control.full).abs() < 1e-6);
    assert!(r2.deployed.is_none() && r2.gguf_bytes.is_none() && r2.tokens_per_s.is_none());
    assert!(r2.summary_line().contains("deployed=n/a"));
    assert!(r2.samples.iter().any(|(l, _)| l.contains("no GGUF")));
    assert!(r2.qat.full.is_finite() && r2.ptq.full.is_finite());
    assert!(out.join("qat_int3-g32.safetensors").is_file());

    // Resuming from a directory without a float checkpoint is an error naming the fix.
    let empty = out.join("empty");
    let e = shakespeare_job::run(&short(SchemeArg::Q8_0, &empty, true), &dev)
        .err()
        .ok_or("resume without a checkpoint must fail")?
        .to_string();
    assert!(
        e.contains("float.safetensors") && e.contains("without --resume"),
        "{e}"
    );
    Ok(())
}

#[test]
fn recovery_is_na_when_the_ptq_gap_is_under_0_001() {
    assert_eq!(
        recovery(1.6193, 1.6143, 1.6140),
        Some((1.6193 - 1.6143) / (1.6193 - 1.6140))
    );
    assert_eq!(recovery(1.6145, 1.6143, 1.6140), None);
    assert_eq!(recovery(1.6130, 1.6143, 1.6140), None);
}

/// The fused AdamW gives candle's AdamW values bit for bit: parameters of several sizes
/// (one split over rayon's pool), a schedule of rates, weight decay, gradients of mixed
/// signs and magnitudes, and a parameter without a gradient that both leave alone.
#[test]
fn fused_adamw_equals_candle_adamw_bit_for_bit() -> trainer::AnyResult<()> {
    use candle_core::{Tensor, Var};
    use candle_nn::Optimizer;
    let dev = Device::Cpu;
    let mut rng = trainer::Rng::new(5);
    let shapes: [&[usize]; 4] = [&[128], &[65, 128], &[352, 128], &[7]];
    let init: Vec<Vec<f32>> = shapes
        .iter()
        .map(|s| {
            (0..s.iter().product::<usize>())
                .map(|_| (0.05 * rng.normal()) as f32)
                .collect()
        })
        .collect();
    let make = || -> candle_core::Result<Vec<Var>> {
        shapes
            .iter()
            .zip(&init)
            .map(|(s, v)| Var::from_tensor(&Tensor::from_slice(v, *s, &dev)?))
            .collect()
    };
    let (a, b) = (make()?, make()?);
    let params = lm_training::adamw_params(3e-3);
    let mut ours = fused_adamw::FusedAdamW::new(a.clone(), params.clone())?;
    let mut theirs = candle_nn::AdamW::new(b.clone(), params)?;
    // Loss: sum of c * p^3 + p over the first three parameters (the last gets no gradient).
    let loss = |vars: &[Var], c: f64| -> candle_core::Result<Tensor> {
        let mut l = Tensor::zeros((), candle_core::DType::F32, &dev)?;
        for v in &vars[..3] {
            l = (l + ((v.as_tensor().powf(3.0)? * c)? + v.as_tensor())?.sum_all()?)?;
        }
        Ok(l)
    };
    for step in 0..6 {
        let lr = 3e-3 * (1.0 + step as f64) / 6.0;
        let c = if step % 2 == 0 { 40.0 } else { -25.0 };
        ours.set_learning_rate(lr);
        theirs.set_learning_rate(lr);
        ours.backward_step(&loss(&a, c)?)?;
        theirs.backward_step(&loss(&b, c)?)?;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let x = x.flatten_all()?.to_vec1::<f32>()?;
            let y = y.flatten_all()?.to_vec1::<f32>()?;
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "step {step}, parameter {i}: the values differ");
        }
    }
    // The parameters moved (all but the one without a gradient).
    let moved = |i: usize| -> candle_core::Result<bool> {
        let v = a[i].flatten_all()?.to_vec1::<f32>()?;
        Ok(v.iter().zip(&init[i]).any(|(p, q)| p != q))
    };
    assert!(moved(0)? && moved(1)? && moved(2)? && !moved(3)?);
    Ok(())
}
