//! `#[qat(auto_fuse)]`: finds runs of consecutive fields whose types form one of PyTorch's
//! fusion patterns, by the last segment of each field's type path. The match is only a
//! proposal: the generated `Fusable::fuse` call still type-checks it.

use std::collections::HashSet;

use syn::{Type, TypePath};

use crate::ast::Container;

/// The patterns, longest first so that the match is greedy.
const PATTERNS: &[&[&[&str]]] = &[
    &[&["Conv1d"], &["BatchNorm1d"], &["ReLU"]],
    &[&["Conv2d"], &["BatchNorm2d"], &["ReLU"]],
    &[&["Conv3d"], &["BatchNorm3d"], &["ReLU"]],
    &[&["Conv1d"], &["BatchNorm1d"]],
    &[&["Conv2d"], &["BatchNorm2d"]],
    &[&["Conv3d"], &["BatchNorm3d"]],
    &[&["Conv1d", "Conv2d", "Conv3d"], &["ReLU"]],
    &[&["Linear"], &["BatchNorm1d"]],
    &[&["Linear"], &["ReLU"]],
    &[&["BatchNorm2d", "BatchNorm3d"], &["ReLU"]],
];

/// The last segment of a plain type path (`nn::Conv2d` -> `Conv2d`).
fn last_segment(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(TypePath { qself: None, path }) => {
            let seg = path.segments.last()?;
            seg.arguments.is_none().then(|| seg.ident.to_string())
        }
        Type::Group(g) => last_segment(&g.elem),
        Type::Paren(p) => last_segment(&p.elem),
        _ => None,
    }
}

/// The groups `auto_fuse` finds, as field indices, in field order. Fields that are skipped,
/// had a bad attribute, or are in a declared group break a run and are never taken.
pub fn groups(cont: &Container) -> Vec<Vec<usize>> {
    let declared: HashSet<&str> = cont
        .attrs
        .groups
        .iter()
        .flat_map(|g| g.members.iter().map(|m| m.name.as_str()))
        .collect();
    let kinds: Vec<Option<String>> = cont
        .fields
        .iter()
        .map(|f| {
            if f.walked() && !declared.contains(f.name.as_str()) {
                last_segment(f.ty)
            } else {
                None
            }
        })
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < kinds.len() {
        let found = PATTERNS.iter().find(|p| {
            i + p.len() <= kinds.len()
                && p.iter()
                    .zip(&kinds[i..])
                    .all(|(alts, k)| k.as_deref().is_some_and(|k| alts.contains(&k)))
        });
        match found {
            Some(p) => {
                out.push((i..i + p.len()).collect());
                i += p.len();
            }
            None => i += 1,
        }
    }
    out
}
