//! The rules a declared fuse group must follow, one function each. Every rule reports all
//! its violations and marks the offending groups invalid (left out of the generated code).

use std::collections::HashMap;

use crate::ast::Container;
use crate::ctxt::Ctxt;

/// Runs every check.
pub fn check(cx: &Ctxt, cont: &Container) {
    check_group_size(cx, cont);
    check_unknown_members(cx, cont);
    check_repeated_member(cx, cont);
    check_skipped_member(cx, cont);
    check_member_in_two_groups(cx, cont);
    drop_groups_with_poisoned_fields(cont);
}

/// A group fuses at least two layers.
fn check_group_size(cx: &Ctxt, cont: &Container) {
    for g in &cont.attrs.groups {
        match g.members.len() {
            0 => cx.error_at(
                g.paren,
                "empty fuse group; list the layers to fuse in forward order, e.g. \
                 fuse(conv1, bn1, relu1)",
            ),
            1 => cx.error_at(
                g.paren,
                format_args!(
                    "{} has one layer, there is nothing to fuse it with; a group lists two or \
                     more layers applied one after another, e.g. fuse(conv1, bn1, relu1)",
                    g.display()
                ),
            ),
            _ => continue,
        }
        g.invalidate();
    }
}

/// Every member names a field of the struct.
fn check_unknown_members(cx: &Ctxt, cont: &Container) {
    let fields = if cont.fields.is_empty() {
        "the struct has no fields".to_string()
    } else {
        let names: Vec<&str> = cont.fields.iter().map(|f| f.name.as_str()).collect();
        format!("the struct's fields are: {}", names.join(", "))
    };
    for g in &cont.attrs.groups {
        for m in &g.members {
            if cont.field(&m.name).is_none() {
                cx.error_at(
                    m.span,
                    format_args!("unknown field `{}` in fuse group; {fields}", m.name),
                );
                g.invalidate();
            }
        }
    }
}

/// No member appears twice in one group.
fn check_repeated_member(cx: &Ctxt, cont: &Container) {
    for g in &cont.attrs.groups {
        for (i, m) in g.members.iter().enumerate() {
            if g.members[..i].iter().any(|p| p.name == m.name) {
                cx.error_at(
                    m.span,
                    format_args!(
                        "field `{}` appears twice in {}; list each layer once, in forward order",
                        m.name,
                        g.display()
                    ),
                );
                g.invalidate();
            }
        }
    }
}

/// No member is a `#[qat(skip)]` field.
fn check_skipped_member(cx: &Ctxt, cont: &Container) {
    for g in &cont.attrs.groups {
        for m in &g.members {
            if cont.field(&m.name).is_some_and(|f| f.skip.is_some()) {
                cx.error_at(
                    m.span,
                    format_args!(
                        "field `{}` is marked #[qat(skip)], so it cannot be fused; remove it \
                         from {} or remove its #[qat(skip)]",
                        m.name,
                        g.display()
                    ),
                );
                g.invalidate();
            }
        }
    }
}

/// No field is in two groups (the first group that names it keeps it).
fn check_member_in_two_groups(cx: &Ctxt, cont: &Container) {
    let mut owner: HashMap<&str, usize> = HashMap::new();
    for (gi, g) in cont.attrs.groups.iter().enumerate() {
        for m in &g.members {
            match owner.get(m.name.as_str()) {
                Some(&first) if first != gi => {
                    cx.error_at(
                        m.span,
                        format_args!(
                            "field `{}` is already in the group {}; a layer can be fused into \
                             one group only",
                            m.name,
                            cont.attrs.groups[first].display()
                        ),
                    );
                    g.invalidate();
                }
                Some(_) => {}
                None => {
                    owner.insert(&m.name, gi);
                }
            }
        }
    }
}

/// A group naming a field whose own attribute was wrong is left out silently: the field's
/// error says what to fix.
fn drop_groups_with_poisoned_fields(cont: &Container) {
    for g in &cont.attrs.groups {
        if g.members
            .iter()
            .any(|m| cont.field(&m.name).is_some_and(|f| f.poisoned))
        {
            g.invalidate();
        }
    }
}
