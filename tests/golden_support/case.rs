//! Loading golden cases and comparing with FORMAT.md's tolerances.

use std::path::{Path, PathBuf};

use serde_json::Value;

pub struct Case {
    pub kind: String,
    pub name: String,
    pub json: Value,
}

/// Every `*.json` of `dir`, sorted by file name.
pub fn json_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("cannot read golden dir: {e}"))? {
        let p = entry
            .map_err(|e| format!("cannot read golden dir: {e}"))?
            .path();
        if p.extension().is_some_and(|x| x == "json") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// The file name without `.json`.
pub fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One case file. FORMAT.md: `name` equals the file name and is `<kind>-<nnn>-<short>`.
pub fn load(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("bad JSON: {e}"))?;
    let kind = string(&json["kind"], "kind")?.to_string();
    let name = string(&json["name"], "name")?.to_string();
    if name != stem(path) {
        return Err(format!("name `{name}` is not the file name"));
    }
    if !name.starts_with(&format!("{kind}-")) {
        return Err(format!(
            "name `{name}` does not start with its kind `{kind}`"
        ));
    }
    Ok(Case { kind, name, json })
}

pub type R<T> = Result<T, String>;

/// A tensor field: (shape, data as f64). The data must hold exactly as many values as the
/// shape says.
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
    let n: usize = shape.iter().product();
    if data.len() != n {
        return Err(format!(
            "{what}: shape {shape:?} holds {n} values, data has {}",
            data.len()
        ));
    }
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

pub fn boolean(v: &Value, what: &str) -> R<bool> {
    v.as_bool().ok_or(format!("{what}: not a bool"))
}

pub fn string<'a>(v: &'a Value, what: &str) -> R<&'a str> {
    v.as_str().ok_or(format!("{what}: not a string"))
}

pub fn array<'a>(v: &'a Value, what: &str) -> R<&'a Vec<Value>> {
    v.as_array().ok_or(format!("{what}: not a list"))
}

/// Two lists that go in step (inputs and expected states, steps and expected results): both
/// as long, or an error naming the two counts.
pub fn paired<'a>(
    a: &'a Value,
    a_name: &str,
    b: &'a Value,
    b_name: &str,
) -> R<Vec<(&'a Value, &'a Value)>> {
    let (a, b) = (array(a, a_name)?, array(b, b_name)?);
    if a.len() != b.len() || a.is_empty() {
        return Err(format!(
            "{} {a_name} and {} {b_name}: want as many of each, at least one",
            a.len(),
            b.len()
        ));
    }
    Ok(a.iter().zip(b).collect())
}

/// The integer-code tolerance (FORMAT.md): every code within 1 of the reference, at most
/// max(1, floor(1% of n)) of them differ.
pub fn check_codes(what: &str, got: &[i64], want: &[i64]) -> R<()> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} codes, want {}", got.len(), want.len()));
    }
    let mut off = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > 1 {
            return Err(format!(
                "{what}[{i}] = {g}, want {w} (more than one code apart)"
            ));
        }
        off += usize::from(g != w);
    }
    let allowed = (got.len() / 100).max(1);
    if off > allowed {
        return Err(format!(
            "{what}: {off} of {} codes differ by one (at most {allowed} may)",
            got.len()
        ));
    }
    Ok(())
}

/// Float values as codes `round(v / scale)`; a NaN or infinite value fails.
pub fn as_codes(what: &str, v: &[f32], scale: f32) -> R<Vec<i64>> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = (x / scale).round();
            if c.is_finite() {
                Ok(c as i64)
            } else {
                Err(format!("{what}[{i}] = {x}: not a finite value"))
            }
        })
        .collect()
}

/// Float outputs (FORMAT.md): abs <= 1e-4 + 1e-4 |ref| for every element, no exemptions.
pub fn check_float(what: &str, got: &[f32], want: &[f32]) -> R<()> {
    same_len(what, got, want)?;
    match got
        .iter()
        .zip(want)
        .position(|(&g, &w)| !((g - w).abs() as f64 <= 1e-4 + 1e-4 * (w as f64).abs()))
    {
        Some(i) => Err(format!("{what}[{i}] = {}, want {}", got[i], want[i])),
        None => Ok(()),
    }
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
    same_len(what, got, want)?;
    if got != want {
        return Err(format!("{what} = {got:?}, want {want:?}"));
    }
    Ok(())
}

pub fn same_len<T>(what: &str, got: &[T], want: &[T]) -> R<()> {
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
