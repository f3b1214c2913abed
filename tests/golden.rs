//! Parity with PyTorch: runs every golden case (JSON written by PyTorch's own quantization
//! code, see tests/golden/FORMAT.md) and prints one line per case, then `N passed, M failed`.
//!
//! Reads `QAT_GOLDEN_DIR` when set, else `tests/golden/` (and then first runs the harness's
//! self-tests: doctored cases it must fail). Each case runs in its own process (runner.rs). A
//! kind it does not know fails, and so does a handled kind with no case in the directory.
//! Each kind's file lists the fields it compares and the ones FORMAT.md leaves uncompared;
//! `torch_version` (every kind) is informational.

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
#[path = "golden_support/intx.rs"]
mod intx;
#[path = "golden_support/intx_qat.rs"]
mod intx_qat;
#[path = "golden_support/learnable.rs"]
mod learnable;
#[path = "golden_support/model_e2e.rs"]
mod model_e2e;
#[path = "golden_support/model_e2e_mobile.rs"]
mod model_e2e_mobile;
#[path = "golden_support/model_pipeline.rs"]
mod model_pipeline;
#[path = "golden_support/observer.rs"]
mod observer;
#[path = "golden_support/quantized.rs"]
mod quantized;

#[path = "golden_support/runner.rs"]
mod runner;
#[path = "golden_support/selftest.rs"]
mod selftest;

use std::process::ExitCode;

use runner::{Handler, Tally};

/// Every kind the harness handles, with its check. A kind not listed here fails; a listed
/// kind without a case in the directory fails the coverage check. A new kind adds one row
/// (and its cases to tests/golden, never ahead of its row).
const HANDLERS: &[(&str, Handler)] = &[
    ("observer", observer::run),
    ("fake_quant_per_tensor", fake_quant::run_per_tensor),
    ("fake_quant_per_channel", fake_quant::run_per_channel),
    ("learnable_fake_quant", learnable::run),
    ("fake_quantize_module", fake_quantize_module::run),
    ("fuse_conv_bn_eval", |c| fusion::run(c, true)),
    ("fuse_linear_bn_eval", |c| fusion::run(c, false)),
    ("conv_bn_qat", conv_bn_qat::run),
    ("model_e2e", model_e2e::run),
    ("model_e2e_mobile", model_e2e_mobile::run),
    ("quantized_linear", quantized::run_linear),
    ("quantized_conv2d", quantized::run_conv),
    ("intx_fake_quant", intx::run),
    ("intx_qat_linear", intx_qat::run_linear),
    ("intx_qat_embedding", intx_qat::run_embedding),
    ("ggml_fake_quant", ggml::run),
];

fn main() -> ExitCode {
    if let Some(case) = std::env::var_os(runner::CASE_ENV) {
        return runner::child(std::path::Path::new(&case), HANDLERS);
    }
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let custom = std::env::var_os("QAT_GOLDEN_DIR").map(std::path::PathBuf::from);
    let mut tally = Tally::default();
    // The self-tests run the harness on doctored copies of the default corpus; a run on
    // another directory (QAT_GOLDEN_DIR, which the self-tests themselves use) skips them.
    if custom.is_none() {
        selftest::run(&corpus, &mut tally);
    }
    runner::run_dir(custom.as_deref().unwrap_or(&corpus), HANDLERS, &mut tally);
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 || tally.passed == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
