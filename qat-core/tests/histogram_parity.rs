//! HistogramObserver against PyTorch 2.15: fixtures written by `tests/data/gen_histogram.py`.
//!
//! Each fixture feeds a sequence of inputs; after each one min_val/max_val must be equal,
//! the histogram equal where the fixture holds it, the scale within 1e-4 relative and the
//! zero point within 1 of PyTorch's `calculate_qparams`.
//!
//! `QAT_HISTOGRAM_FIXTURES=<dir>` runs the same checks on another directory of fixtures
//! (for instance a large random batch written with `gen_histogram.run_case(..., out_dir=...)`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use qat_core::observer::{HistogramObserver, Observer, ObserverConfig};
use qat_core::{QDType, QParams, QScheme};
use serde_json::Value;

fn fixtures() -> Vec<PathBuf> {
    let dir = match std::env::var_os("QAT_HISTOGRAM_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/histogram"),
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    files
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn f32_of(v: &Value) -> f32 {
    v.as_f64().expect("number") as f32
}

fn config(c: &Value) -> (ObserverConfig, usize) {
    let dtype = match c["dtype"].as_str() {
        Some("quint8") => QDType::QUINT8,
        Some("qint8") => QDType::QINT8,
        d => panic!("unknown dtype {d:?}"),
    };
    let qscheme = match c["qscheme"].as_str() {
        Some("per_tensor_affine") => QScheme::PerTensorAffine,
        Some("per_tensor_symmetric") => QScheme::PerTensorSymmetric,
        q => panic!("unknown qscheme {q:?}"),
    };
    let mut cfg = ObserverConfig::new(dtype, qscheme)
        .with_reduce_range(c["reduce_range"].as_bool().expect("reduce_range"))
        .with_eps(f32_of(&c["eps"]));
    if let (Some(lo), Some(hi)) = (c["quant_min"].as_i64(), c["quant_max"].as_i64()) {
        cfg = cfg.with_range(lo as i32, hi as i32);
    }
    let bins = c["bins"].as_u64().expect("bins") as usize;
    (cfg, bins)
}

#[test]
fn histogram_observer_matches_pytorch() {
    let files = fixtures();
    assert!(
        files.len() >= 8,
        "expected the fixtures, found {}",
        files.len()
    );
    let (mut steps, mut exact, mut hist_checked) = (0, 0, 0);
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("fixture");
        let fx: Value = serde_json::from_str(&text).expect("fixture JSON");
        let name = fx["name"].as_str().unwrap_or("?").to_string();
        let (cfg, bins) = config(&fx["config"]);
        let mut obs = HistogramObserver::new(cfg, bins).expect("observer");
        for (i, step) in fx["steps"].as_array().expect("steps").iter().enumerate() {
            let shape: Vec<usize> = step["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            let x = Tensor::from_vec(f32s(&step["values"]), shape, &Device::Cpu).unwrap();
            obs.observe(&x).unwrap();
            steps += 1;
            let at = format!("{name} step {i}");

            let (mn, mx) = obs.min_max().expect("observed");
            let (want_mn, want_mx) = (f32_of(&step["min_val"]), f32_of(&step["max_val"]));
            if (mn[0], mx[0]) != (want_mn, want_mx) {
                failures.push(format!(
                    "{at}: min/max ({}, {}) != torch ({want_mn}, {want_mx})",
                    mn[0], mx[0]
                ));
            }
            if !step["histogram"].is_null() {
                hist_checked += 1;
                let want = f32s(&step["histogram"]);
                if obs.histogram() != want.as_slice() {
                    let diff = want
                        .iter()
                        .zip(obs.histogram())
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    failures.push(format!(
                        "{at}: histogram differs first at bin {diff}: {} != torch {}",
                        obs.histogram()[diff],
                        want[diff]
                    ));
                }
            }

            let QParams::PerTensor { scale, zero_point } = obs.calculate_qparams().unwrap() else {
                panic!("{at}: per-tensor qparams expected");
            };
            let want_scale = f32_of(&step["scale"]);
            let want_zp = step["zero_point"].as_i64().expect("zero_point") as i32;
            let rel = ((scale - want_scale) / want_scale).abs();
            if scale == want_scale && zero_point == want_zp {
                exact += 1;
            }
            let scale_ok = rel <= 1e-4; // false for NaN
            if !scale_ok || (zero_point - want_zp).abs() > 1 {
                failures.push(format!(
                    "{at}: qparams ({scale:e}, {zero_point}) vs torch ({want_scale:e}, {want_zp}), \
                     rel {rel:e}"
                ));
            }
        }
    }
    println!(
        "histogram parity: {} fixtures, {steps} steps, {exact} with scale and zero point \
         bit-identical to PyTorch, {hist_checked} histograms compared",
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
