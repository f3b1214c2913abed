//! The second main job (examples/shakespeare_qat.rs) shortened, end to end through the same
//! code (examples/common/shakespeare_job.rs): a few float steps, the float control, PTQ,
//! QAT, convert -> GGUF -> candle-transformers' quantized_llama, tokens/s, greedy samples,
//! the table and the summary line; then `--resume` from the float checkpoint with a scheme
//! that stays in fake-quant form.

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
