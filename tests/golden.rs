//! Parity with PyTorch: runs every golden case (JSON written by PyTorch's own quantization
//! code, see tests/golden/FORMAT.md) and prints one line per case, then `N passed, M failed`.
//!
//! Reads `QAT_GOLDEN_DIR` when set, else `tests/golden/`. A kind it does not know fails.

// Tolerance checks are written `!(diff <= tol)` so that a NaN fails them.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

#[path = "golden_support/case.rs"]
mod case;
#[path = "golden_support/conv_bn_qat.rs"]
mod conv_bn_qat;
#[path = "golden_support/fake_quant.rs"]
mod fake_quant;
#[path = "golden_support/fake_quantize_module.rs"]
mod fake_quantize_module;
#[path = "golden_support/fusion.rs"]
mod fusion;
#[path = "golden_support/ggml.rs"]
mod ggml;
#[path = "golden_support/learnable.rs"]
mod learnable;
#[path = "golden_support/model_e2e.rs"]
mod model_e2e;
#[path = "golden_support/observer.rs"]
mod observer;
#[path = "golden_support/quantized.rs"]
mod quantized;

use case::{Case, Outcome};

/// Kinds whose issue has not landed yet: reported as `pending`, never silently skipped.
const PENDING: &[&str] = &[];

fn run(case: &Case) -> Outcome {
    match case.kind.as_str() {
        "observer" => observer::run(case).into(),
        "fake_quant_per_tensor" => fake_quant::run_per_tensor(case).into(),
        "fake_quant_per_channel" => fake_quant::run_per_channel(case).into(),
        "learnable_fake_quant" => learnable::run(case).into(),
        "fake_quantize_module" => fake_quantize_module::run(case).into(),
        "fuse_conv_bn_eval" => fusion::run(case, true).into(),
        "fuse_linear_bn_eval" => fusion::run(case, false).into(),
        "conv_bn_qat" => conv_bn_qat::run(case).into(),
        "model_e2e" => model_e2e::run(case),
        "quantized_linear" => quantized::run_linear(case).into(),
        "quantized_conv2d" => quantized::run_conv(case).into(),
        "ggml_fake_quant" => ggml::run(case).into(),
        k if PENDING.contains(&k) => Outcome::Pending,
        k => Outcome::Fail(format!("unknown kind `{k}`")),
    }
}

fn main() {
    let dir = std::env::var_os("QAT_GOLDEN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"));
    let cases = match case::load_dir(&dir) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL golden {}: {e}", dir.display());
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    let (mut passed, mut failed, mut pending) = (0, 0, 0);
    for case in &cases {
        let outcome = match case {
            Ok(c) => (c.kind.clone(), c.name.clone(), run(c)),
            Err((file, e)) => ("?".into(), file.clone(), Outcome::Fail(e.clone())),
        };
        match outcome {
            (kind, name, Outcome::Ok) => {
                passed += 1;
                println!("ok {kind} {name}");
            }
            (kind, name, Outcome::Pending) => {
                pending += 1;
                println!("pending {kind} {name}");
            }
            (kind, name, Outcome::Fail(why)) => {
                failed += 1;
                println!("FAIL {kind} {name}: {why}");
            }
        }
    }
    if pending > 0 {
        println!("({pending} cases pending: kinds of issues not landed yet)");
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
