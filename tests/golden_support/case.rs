//! Loading golden cases and comparing with FORMAT.md's tolerances.

use serde_json::Value;

pub struct Case {
    pub kind: String,
    pub name: String,
    pub json: Value,
}

pub enum Outcome {
    Ok,
    Pending,
    Fail(String),
}

impl From<Result<(), String>> for Outcome {
    fn from(r: Result<(), String>) -> Self {
        match r {
            Ok(()) => Outcome::Ok,
            Err(e) => Outcome::Fail(e),
        }
    }
}

pub type Loaded = Result<Case, (String, String)>;

/// Every `*.json` of `dir`, sorted by file name.
pub fn load_dir(dir: &std::path::Path) -> Result<Vec<Loaded>, String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read golden dir: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    Ok(files
        .iter()
        .map(|p| {
            let file = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(p).map_err(|e| (file.clone(), e.to_string()))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| (file.clone(), format!("bad JSON: {e}")))?;
            let kind = json["kind"].as_str().unwrap_or("?").to_string();
            let name = json["name"].as_str().unwrap_or(&file).to_string();
            Ok(Case { kind, name, json })
        })
        .collect())
}

pub type R<T> = Result<T, String>;

/// A tensor field: (shape, data as f64).
pub fn tensor(v: &Value, what: &str) -> R<(Vec<usize>, Vec<f64>)> {
    let shape = v["shape"]
        .as_array()
        .ok_or(format!("{what}: no shape"))?
        .iter()
        .map(|d| {
            d.as_u64()
                .map(|d| d as usize)
                .ok_or(format!("{what}: bad shape"))
        })
        .collect::<R<Vec<_>>>()?;
    let data = v["data"]
        .as_array()
        .ok_or(format!("{what}: no data"))?
        .iter()
        .map(|x| x.as_f64().ok_or(format!("{what}: bad value")))
        .collect::<R<Vec<_>>>()?;
    Ok((shape, data))
}

pub fn f32s(v: &Value, what: &str) -> R<Vec<f32>> {
    Ok(tensor(v, what)?.1.into_iter().map(|x| x as f32).collect())
}

pub fn i32s(v: &Value, what: &str) -> R<Vec<i32>> {
    Ok(tensor(v, what)?.1.into_iter().map(|x| x as i32).collect())
}

pub fn candle(v: &Value, what: &str) -> R<candle_core::Tensor> {
    let (shape, data) = tensor(v, what)?;
    let data: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    candle_core::Tensor::from_vec(data, shape, &candle_core::Device::Cpu).map_err(|e| e.to_string())
}

pub fn to_vec(t: &candle_core::Tensor) -> R<Vec<f32>> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())
}

pub fn int(v: &Value, what: &str) -> R<i64> {
    v.as_i64().ok_or(format!("{what}: not an integer"))
}

pub fn num(v: &Value, what: &str) -> R<f64> {
    v.as_f64().ok_or(format!("{what}: not a number"))
}

fn exempt(n: usize) -> usize {
    n / 1000
}

/// Fake-quantized output: within one step (`step[i]`) + 1e-6 everywhere, and at most 0.1% of
/// elements off by more than 1e-6.
pub fn check_fq(what: &str, got: &[f32], want: &[f32], step: impl Fn(usize) -> f32) -> R<()> {
    same_len(what, got, want)?;
    let mut off = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d > step(i) + 1e-6 || d.is_nan() {
            return Err(format!(
                "{what}[{i}] = {g}, want {w} (more than one step apart)"
            ));
        }
        if d > 1e-6 {
            off += 1;
        }
    }
    if off > exempt(got.len()) {
        return Err(format!(
            "{what}: {off} of {} elements differ by a step",
            got.len()
        ));
    }
    Ok(())
}

/// Gradients: |got - want| <= 1e-5 + 1e-4 |want| + extra(i), 0.1% exempt.
pub fn check_grad_with(
    what: &str,
    got: &[f32],
    want: &[f32],
    atol: f64,
    extra: impl Fn(usize) -> f64,
) -> R<()> {
    same_len(what, got, want)?;
    let mut bad = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g as f64, w as f64);
        let d = (g - w).abs();
        if !(d <= atol + 1e-4 * w.abs() + extra(i)) {
            bad.push(format!("{what}[{i}] = {g}, want {w}"));
        }
    }
    if bad.len() > exempt(got.len()) {
        return Err(format!(
            "{} of {} off: {}",
            bad.len(),
            got.len(),
            bad[..bad.len().min(3)].join("; ")
        ));
    }
    Ok(())
}

pub fn check_grad(what: &str, got: &[f32], want: &[f32]) -> R<()> {
    check_grad_with(what, got, want, 1e-5, |_| 0.0)
}

pub fn check_rel(what: &str, got: &[f32], want: &[f32], rel: f64) -> R<()> {
    same_len(what, got, want)?;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if !((g as f64 - w as f64).abs() <= rel * (w as f64).abs()) {
            return Err(format!("{what}[{i}] = {g:e}, want {w:e}"));
        }
    }
    Ok(())
}

pub fn check_exact<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> R<()> {
    if got != want {
        return Err(format!("{what} = {got:?}, want {want:?}"));
    }
    Ok(())
}

fn same_len(what: &str, got: &[f32], want: &[f32]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, want {}",
            got.len(),
            want.len()
        ));
    }
    Ok(())
}

pub fn err<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}
