//! The structure a checkpoint records: each layer's path, kind and stage, whether it was
//! saved in int8 form, the names of its float tensors and the layers its inputs came from;
//! compared with the model before anything is loaded, so a model of another structure is an
//! error naming the first difference.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{ModulePath, ModuleVisitor, QuantModule, Quantizable, Stage};
use crate::record::Int8State;

/// One layer as a file records it.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Layer {
    pub path: String,
    pub kind: String,
    pub stage: Stage,
    /// Saved with its int8 state.
    pub int8: bool,
    /// The names of the float tensors saved for it (under `path.`).
    pub params: Vec<String>,
    /// For each input of an int8 layer, the path of the layer whose output fake-quant
    /// produced it, where known.
    pub producers: Vec<Option<String>>,
}

/// One layer of a model, read without changing it.
pub(super) struct ModelLayer {
    pub path: String,
    pub kind: String,
    pub stage: Stage,
    pub float: Vec<(&'static str, Tensor)>,
    pub int8: Option<Int8State>,
    pub keys: (Option<usize>, Vec<Option<usize>>),
    /// Converted to candle's GGML runtime (deploys as GGUF).
    pub ggml: bool,
}

impl ModelLayer {
    pub fn float_shape(&self, name: &str) -> Option<&[usize]> {
        self.float
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t.dims())
    }
}

struct Walk(Vec<ModelLayer>);

impl ModuleVisitor for Walk {
    fn layer(&mut self, path: &ModulePath, m: &dyn QuantModule) -> Result<()> {
        self.0.push(ModelLayer {
            path: path.dotted(),
            kind: m.kind(),
            stage: m.stage(),
            float: m.float_params(),
            int8: m.int8_state(),
            keys: m.producer_keys(),
            ggml: m.ggml_converted(),
        });
        Ok(())
    }
}

/// Every layer of `model`, in walk order.
pub(super) fn walk<M: Quantizable>(model: &M) -> Result<Vec<ModelLayer>> {
    let mut w = Walk(Vec::new());
    model.visit(&mut ModulePath::root(), &mut w)?;
    Ok(w.0)
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Float => "Float",
        Stage::Fused => "Fused",
        Stage::Prepared => "Prepared",
        Stage::Converted => "Converted",
    }
}

fn parse_stage(s: &str) -> Option<Stage> {
    Some(match s {
        "Float" => Stage::Float,
        "Fused" => Stage::Fused,
        "Prepared" => Stage::Prepared,
        "Converted" => Stage::Converted,
        _ => return None,
    })
}

/// A path as messages show it.
pub(super) fn shown(path: &str) -> &str {
    if path.is_empty() {
        "<root>"
    } else {
        path
    }
}

/// The structure as text: one tab-separated line per layer (path, kind, stage, `int8` or
/// `float`, float tensor names, producers; lists comma-separated, `-` for none).
pub(super) fn encode(layers: &[Layer]) -> Result<String> {
    let mut out = String::new();
    for l in layers {
        let bad = |s: &str| s.contains(['\t', '\n', ',']) || s == "-";
        if bad(&l.path) || bad(&l.kind) || l.params.iter().any(|p| bad(p)) {
            return Err(Error::write(
                format!(
                    "a checkpoint: the layer `{}` ({}) has a name a checkpoint cannot record",
                    l.path, l.kind
                ),
                "use module paths and kinds without tabs, newlines or commas",
            ));
        }
        let list = |v: Vec<&str>| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        let producers = l
            .producers
            .iter()
            .map(|p| match p {
                Some(p) if p.is_empty() => "<root>",
                Some(p) => p.as_str(),
                None => "?",
            })
            .collect();
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            l.path,
            l.kind,
            stage_name(l.stage),
            if l.int8 { "int8" } else { "float" },
            list(l.params.iter().map(String::as_str).collect()),
            list(producers),
        ));
    }
    Ok(out)
}

/// Reads what [`encode`] wrote.
pub(super) fn decode(text: &str) -> Result<Vec<Layer>> {
    let bad = |n: usize, line: &str| {
        Error::state(
            format!(
                "line {} of the structure record is not valid: {line:?}",
                n + 1
            ),
            "load a checkpoint written by candle-qat",
        )
    };
    let list = |s: &str| -> Vec<String> {
        if s == "-" {
            Vec::new()
        } else {
            s.split(',').map(str::to_string).collect()
        }
    };
    text.lines()
        .enumerate()
        .map(|(n, line)| {
            let f: Vec<&str> = line.split('\t').collect();
            let &[path, kind, stage, form, params, producers] = f.as_slice() else {
                return Err(bad(n, line));
            };
            let int8 = match form {
                "int8" => true,
                "float" => false,
                _ => return Err(bad(n, line)),
            };
            Ok(Layer {
                path: path.to_string(),
                kind: kind.to_string(),
                stage: parse_stage(stage).ok_or_else(|| bad(n, line))?,
                int8,
                params: list(params),
                producers: list(producers)
                    .into_iter()
                    .map(|p| match p.as_str() {
                        "?" => None,
                        "<root>" => Some(String::new()),
                        _ => Some(p),
                    })
                    .collect(),
            })
        })
        .collect()
}

/// Compares the file's layers with the model's, in order: the same paths, kinds, and stages
/// that `stage_fits(file, model)` accepts (it returns the fix otherwise). The error names the
/// first difference.
pub(super) fn compare(
    file: &[Layer],
    model: &[ModelLayer],
    stage_fits: impl Fn(Stage, Stage) -> Option<String>,
) -> Result<()> {
    let same_struct = "load into a model of the same struct as the saved one (the same fields \
                       and layers, in the same order)";
    for (i, (f, m)) in file.iter().zip(model).enumerate() {
        if f.path != m.path {
            return Err(Error::state(
                format!(
                    "layer {i} is `{}` ({}) in the file but `{}` ({}) in the model",
                    shown(&f.path),
                    f.kind,
                    shown(&m.path),
                    m.kind
                ),
                same_struct,
            ));
        }
        if f.kind != m.kind {
            return Err(Error::state(
                format!(
                    "the layer is {} in the file but {} in the model",
                    f.kind, m.kind
                ),
                "build and fuse the model as the saved one was (fuse_modules_qat or \
                 fuse_modules, before loading)",
            )
            .in_module(f.path.clone()));
        }
        if let Some(fix) = stage_fits(f.stage, m.stage) {
            return Err(Error::state(
                format!(
                    "the layer was saved {:?}, the model's is {:?}",
                    f.stage, m.stage
                ),
                fix,
            )
            .in_module(f.path.clone()));
        }
    }
    if let Some(f) = file.get(model.len()) {
        return Err(Error::state(
            format!(
                "the file has {} layers, the model {}: the model has no `{}` ({})",
                file.len(),
                model.len(),
                shown(&f.path),
                f.kind
            ),
            same_struct,
        ));
    }
    if let Some(m) = model.get(file.len()) {
        return Err(Error::state(
            format!(
                "the file has {} layers, the model {}: the file has no `{}` ({})",
                file.len(),
                model.len(),
                shown(&m.path),
                m.kind
            ),
            same_struct,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_refuse_garbage() {
        let layers = vec![
            Layer {
                path: String::new(),
                kind: "Linear".into(),
                stage: Stage::Converted,
                int8: true,
                params: Vec::new(),
                producers: vec![Some(String::new()), None, Some("blocks.0.skip".into())],
            },
            Layer {
                path: "blocks.0.bn".into(),
                kind: "BatchNorm2d".into(),
                stage: Stage::Fused,
                int8: false,
                params: vec!["weight".into(), "running_var".into()],
                producers: Vec::new(),
            },
        ];
        let text = encode(&layers).unwrap();
        assert_eq!(decode(&text).unwrap(), layers);
        for bad in [
            "a\tLinear\tConverted\tint8\t-",
            "a\tLinear\tDone\tint8\t-\t-",
            "a\tLinear\tFloat\tint4\t-\t-",
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
        let mut odd = layers[1].clone();
        odd.path = "a,b".into();
        let e = encode(&[odd]).unwrap_err();
        assert!(matches!(e, Error::Write { .. }), "{e}");
        assert!(
            e.to_string().starts_with("cannot write a checkpoint"),
            "{e}"
        );
    }
}
