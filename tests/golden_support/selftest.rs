//! The harness's own tests: it must fail on doctored cases.
//!
//! Copies a few cases of the corpus into a temporary directory, each changed in one way the
//! harness must catch (a truncated expected array, a wrong zero point, a NaN, a panic and an
//! abort inside a case, an unknown kind, ...), plus one unchanged control case after them;
//! runs this same binary on that directory (`QAT_GOLDEN_DIR`) and checks that every doctored
//! case is reported as failed, with the expected reason, that the control case still passes,
//! that the coverage check names the kinds the directory lacks, and that the run fails.
//! Removing any of those checks from the harness makes its self-test here fail.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::case::R;
use crate::learnable::check_signs;
use crate::runner::{Tally, INJECT_ENV};

/// One doctored copy: the corpus case it starts from, its new name, the change, and a
/// fragment of the FAIL line the harness must print for it.
struct Doctored {
    from: &'static str,
    name: &'static str,
    change: fn(&mut Value),
    want: &'static str,
}

const DOCTORED: &[Doctored] = &[
    Doctored {
        from: "fake_quant_per_tensor-000-u8-rand",
        name: "fake_quant_per_tensor-900-truncated-expected",
        // Shape and data agree, one element short: only a length check catches it.
        change: |j| truncate(&mut j["expected"]["y"]),
        want: "y: 256 elements, want 255",
    },
    Doctored {
        from: "fake_quant_per_tensor-001-i8-rand",
        name: "fake_quant_per_tensor-901-panics",
        change: |_| {},
        want: "panicked: injected panic",
    },
    Doctored {
        from: "fake_quant_per_tensor-002-u8-reduced",
        name: "fake_quant_per_tensor-902-aborts",
        change: |_| {},
        want: "crashed",
    },
    Doctored {
        from: "fake_quant_per_tensor-003-i8-zp-neg",
        name: "fake_quant_per_tensor-903-control",
        change: |_| {},
        want: "",
    },
    Doctored {
        from: "observer-003-minmax-qint8-aff",
        name: "observer-900-short-expected",
        change: |j| {
            if let Some(a) = j["expected"].as_array_mut() {
                a.pop();
            }
        },
        want: "want as many of each",
    },
    Doctored {
        from: "observer-000-minmax-quint8-aff",
        name: "observer-901-scale-missing",
        change: |j| j["expected"][0]["scale"] = Value::Null,
        want: "scale",
    },
    Doctored {
        from: "conv_bn_qat-000-convbn2d-fbgemm-tte",
        name: "conv_bn_qat-900-wrong-weight-zero-point",
        change: |j| j["expected"][0]["weight_zero_point"]["data"][1] = 1.into(),
        want: "step 0 weight_zero_point",
    },
    Doctored {
        from: "conv_bn_qat-000-convbn2d-fbgemm-tte",
        name: "conv_bn_qat-901-running-mean-missing",
        change: |j| j["expected"][1]["running_mean"] = Value::Null,
        want: "step 1 running_mean",
    },
    Doctored {
        from: "fuse_linear_bn_eval-000-bias",
        name: "fuse_linear_bn_eval-900-nan",
        // A negative variance: rsqrt gives NaN, which no tolerance may accept.
        change: |j| j["running_var"]["data"][0] = (-2.0).into(),
        want: "= NaN",
    },
    Doctored {
        from: "learnable_fake_quant-007-pc-i8-ax0",
        name: "learnable_fake_quant-900-zero-point-sign",
        // -0.0026 -> +0.0026: within the old slack (sized for grad_scale), not the new one.
        change: |j| {
            let v = &mut j["expected"]["grad_zero_point"]["data"][1];
            *v = (-v.as_f64().unwrap_or(0.0)).into();
        },
        want: "grad_zero_point",
    },
    Doctored {
        from: "model_e2e-000-tinynet-fbgemm",
        name: "model_e2e-900-wrong-int8-zero-point",
        change: |j| {
            let v = &mut j["expected"]["int8_zero_point"];
            *v = (v.as_i64().unwrap_or(0) + 1).into();
        },
        want: "int8_zero_point",
    },
    Doctored {
        from: "fake_quant_per_tensor-000-u8-rand",
        name: "no_such_kind-900-unknown",
        change: |j| j["kind"] = "no_such_kind".into(),
        want: "unknown kind `no_such_kind`",
    },
];

/// Kinds the doctored directory holds no case of: the coverage check must name them.
const UNCOVERED: &[&str] = &[
    "fake_quant_per_channel",
    "fake_quantize_module",
    "fuse_conv_bn_eval",
    "quantized_linear",
    "quantized_conv2d",
];

/// FORMAT.md's sign rule for `grad_zero_point`, on values where only the sign decides (the
/// corpus has none: its gradients are far from zero or within the slack).
fn sign_rule() -> R<()> {
    let slack = 1e-6;
    let must_fail: [(f32, f32); 3] = [(0.0, 3e-6), (-1e-7, 3e-6), (1e-7, -2e-6)];
    let must_pass: [(f32, f32); 3] = [(4e-6, 3e-6), (-1e-7, 5e-7), (0.0, -1e-6)];
    for (got, want) in must_fail {
        if check_signs("g", &[got], &[want], slack).is_ok() {
            return Err(format!("accepted {got} for {want}"));
        }
    }
    for (got, want) in must_pass {
        check_signs("g", &[got], &[want], slack)?;
    }
    Ok(())
}

fn truncate(t: &mut Value) {
    if let Some(d) = t["data"].as_array_mut() {
        d.pop();
        let n = d.len();
        t["shape"] = Value::from(vec![n]);
    }
}

pub fn run(corpus: &Path, tally: &mut Tally) {
    let dir = std::env::temp_dir().join(format!("qat-golden-selftest-{}", std::process::id()));
    let out = write(corpus, &dir).and_then(|()| run_on(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let (stdout, success) = match out {
        Ok(o) => o,
        Err(e) => return tally.report("self-test setup", Err(e)),
    };
    let line = |label: &str| {
        stdout
            .lines()
            .find(|l| {
                l.strip_prefix("ok ")
                    .or_else(|| l.strip_prefix("FAIL "))
                    .is_some_and(|rest| rest.split(':').next() == Some(label))
            })
            .map(str::to_string)
    };
    for d in DOCTORED {
        let kind = d.name.split('-').next().unwrap_or("");
        let label = format!("{kind} {}", d.name);
        let outcome = match line(&label) {
            None => Err("no line for it".to_string()),
            Some(l) if d.want.is_empty() => {
                if l.starts_with("ok ") {
                    Ok(())
                } else {
                    Err(format!("the control case must pass after the others: {l}"))
                }
            }
            Some(l) if l.starts_with("FAIL ") && l.contains(d.want) => Ok(()),
            Some(l) => Err(format!("want FAIL containing `{}`, got: {l}", d.want)),
        };
        tally.report(&format!("self-test {}", d.name), outcome);
        if let Some(l) = line(&label) {
            println!("    the harness said: {l}");
        }
    }
    tally.report("self-test grad_zero_point sign rule", sign_rule());
    let coverage = stdout.lines().find(|l| l.starts_with("FAIL coverage "));
    let outcome = match coverage {
        Some(l) if UNCOVERED.iter().all(|k| l.contains(k)) => Ok(()),
        l => Err(format!(
            "want a coverage failure naming {UNCOVERED:?}, got {l:?}"
        )),
    };
    tally.report("self-test coverage", outcome);
    let passed = DOCTORED.iter().filter(|d| d.want.is_empty()).count();
    let summary = format!("{passed} passed, {} failed", DOCTORED.len() - passed + 1);
    let last = stdout.lines().last().unwrap_or("");
    let outcome = if last == summary && !success {
        Ok(())
    } else {
        Err(format!(
            "want `{summary}` and a failed run, got `{last}` (exit ok: {success})"
        ))
    };
    tally.report("self-test summary", outcome);
}

fn write(corpus: &Path, dir: &Path) -> R<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for d in DOCTORED {
        let src: PathBuf = corpus.join(format!("{}.json", d.from));
        let text = std::fs::read_to_string(&src)
            .map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let mut j: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", d.from))?;
        (d.change)(&mut j);
        j["name"] = d.name.into();
        let dst = dir.join(format!("{}.json", d.name));
        std::fs::write(&dst, j.to_string())
            .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
    }
    Ok(())
}

/// Runs this binary on `dir`: (stdout, whether it exited successfully).
fn run_on(dir: &Path) -> R<(String, bool)> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let out = Command::new(exe)
        .env("QAT_GOLDEN_DIR", dir)
        .env(
            INJECT_ENV,
            "panic:fake_quant_per_tensor-901-panics,abort:fake_quant_per_tensor-902-aborts",
        )
        .output()
        .map_err(|e| format!("cannot run the harness: {e}"))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    ))
}
