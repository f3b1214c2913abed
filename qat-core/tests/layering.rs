//! The module layering of qat-core (ARCHITECTURE.md), checked from the `use` lines: every
//! top-level module belongs to one layer, imports only modules of its own layer or below, and
//! the module graph has no cycle. A new module must be placed in [`LAYERS`] (and in
//! ARCHITECTURE.md) before this test passes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers, lowest first, and the top-level modules of each.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaf data",
        &[
            "error",
            "qparams",
            "geometry",
            "record",
            "sync",
            "host",
            "recent",
            "x86_lanes",
        ],
    ),
    (
        "numerics and kernels",
        &[
            "observer",
            "fake_quant",
            "kernels",
            "quantized",
            "ggml",
            "qconfig",
            "qconfig_mapping",
        ],
    ),
    ("model", &["model", "provenance"]),
    ("layers", &["nn"]),
    (
        "consumers",
        &["fuse", "passes", "checkpoint", "onnx", "gguf"],
    ),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

/// The top-level module a source file belongs to (`nn/conv.rs` -> `nn`).
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .map(|c| c.as_os_str().to_string_lossy().to_string());
    first
        .unwrap_or_default()
        .trim_end_matches(".rs")
        .to_string()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read qat-core/src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `from -> {to}` for every `crate::to` named outside comments in the files of `from`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src").to_path_buf();
        let from = module_of(&rel);
        if from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read source");
        let deps = g.entry(from.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                let tail = &rest[i + "crate::".len()..];
                let name: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // `$crate::` in macros counts too; `crate::` inside identifiers does not occur.
                if !name.is_empty() && name != from && name.chars().all(|c| !c.is_uppercase()) {
                    deps.insert(name.clone());
                }
                rest = &tail[name.len()..];
            }
        }
    }
    g
}

#[test]
fn every_module_imports_only_its_layer_or_below() {
    let g = graph();
    let mut errors = Vec::new();
    for (from, deps) in &g {
        let Some(lf) = layer_of(from) else {
            errors.push(format!(
                "module `{from}` is in no layer: add it to LAYERS here and to ARCHITECTURE.md"
            ));
            continue;
        };
        for to in deps {
            match layer_of(to) {
                None => errors.push(format!("`{from}` imports `{to}`, which is in no layer")),
                Some(lt) if lt > lf => errors.push(format!(
                    "`{from}` ({}) imports `{to}` ({}), a layer above it",
                    LAYERS[lf].0, LAYERS[lt].0
                )),
                Some(_) => {}
            }
        }
    }
    assert!(errors.is_empty(), "{}\ngraph: {g:#?}", errors.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    // Depth-first search with colours; a grey node met again closes a cycle.
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<&'a str, u8>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match colour.get(n) {
            Some(1) => {
                let at = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut cycle: Vec<String> = stack[at..].iter().map(|s| s.to_string()).collect();
                cycle.push(n.to_string());
                return Some(cycle);
            }
            Some(2) => return None,
            _ => {}
        }
        colour.insert(n, 1);
        stack.push(n);
        if let Some(deps) = g.get(n) {
            for d in deps {
                if let Some(c) = visit(d, g, colour, stack) {
                    return Some(c);
                }
            }
        }
        stack.pop();
        colour.insert(n, 2);
        None
    }
    let mut colour = BTreeMap::new();
    for n in g.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(n, &g, &mut colour, &mut stack) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_scanner_sees_imports() {
    // The check above would pass vacuously if the scan found nothing.
    let g = graph();
    assert!(g
        .get("nn")
        .is_some_and(|d| d.contains("model") && d.contains("record")));
    assert!(g.get("passes").is_some_and(|d| d.contains("model")));
}
