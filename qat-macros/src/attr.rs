//! `#[qat(...)]` attributes parsed into a typed model. Every malformed or misplaced entry is
//! reported (all of them, not just the first) and left out of the model.

use std::cell::Cell;

use proc_macro2::Span;
use quote::ToTokens;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Attribute, Ident, LitInt, Meta, Token};

use crate::ctxt::Ctxt;

const FUSE: &str = "fuse";
const AUTO_FUSE: &str = "auto_fuse";
const SKIP: &str = "skip";

const USAGE: &str = "the struct takes #[qat(fuse(a, b, ...))] and #[qat(auto_fuse)], a field \
                     takes #[qat(skip)]";

/// A field named in a `fuse(...)` group, as written.
pub struct MemberRef {
    /// `conv1`, or `0` for a tuple struct's field.
    pub name: String,
    pub span: Span,
}

/// One `fuse(a, b, c)`.
pub struct Group {
    /// The `fuse` keyword.
    pub keyword: Ident,
    /// The parenthesised list.
    pub paren: Span,
    pub members: Vec<MemberRef>,
    /// Cleared by a check that reports an error about this group: such a group is left out of
    /// the generated code so that its error is the only one the user sees about it.
    pub valid: Cell<bool>,
}

impl Group {
    pub fn invalidate(&self) {
        self.valid.set(false);
    }

    /// `fuse(conv1, bn1, relu1)`, for messages.
    pub fn display(&self) -> String {
        let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
        format!("fuse({})", names.join(", "))
    }
}

/// What `#[qat(...)]` says on the struct.
#[derive(Default)]
pub struct StructAttrs {
    /// Declared groups, in declaration order.
    pub groups: Vec<Group>,
    /// The `auto_fuse` keyword, when given.
    pub auto_fuse: Option<Ident>,
}

/// What `#[qat(...)]` says on a field.
#[derive(Default)]
pub struct FieldAttrs {
    /// The `skip` keyword, when given.
    pub skip: Option<Ident>,
    /// Some `qat` attribute of the field was wrong: the field is left out of the generated
    /// code (so its error does not cascade into others).
    pub poisoned: bool,
}

/// One entry of a fuse group: a field name or a tuple field's index.
enum MemberToken {
    Ident(Ident),
    Index(LitInt),
}

impl Parse for MemberToken {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let lookahead = input.lookahead1();
        if lookahead.peek(Ident) {
            input.parse().map(MemberToken::Ident)
        } else if lookahead.peek(LitInt) {
            input.parse().map(MemberToken::Index)
        } else {
            Err(syn::Error::new(
                input.span(),
                "expected a field name (or a tuple struct's field index) in fuse(...), e.g. \
                 fuse(conv1, bn1, relu1)",
            ))
        }
    }
}

impl MemberToken {
    fn into_ref(self) -> syn::Result<MemberRef> {
        match self {
            MemberToken::Ident(i) => Ok(MemberRef {
                name: syn::ext::IdentExt::unraw(&i).to_string(),
                span: i.span(),
            }),
            MemberToken::Index(l) => {
                if !l.suffix().is_empty() || l.base10_parse::<u32>().is_err() {
                    return Err(syn::Error::new(
                        l.span(),
                        "expected a tuple field index such as `0` in fuse(...)",
                    ));
                }
                Ok(MemberRef {
                    name: l.base10_digits().to_string(),
                    span: l.span(),
                })
            }
        }
    }
}

/// The entries of every `#[qat(...)]` among `attrs`, each parsed on its own so that one bad
/// entry does not hide the others. Returns whether all parsed.
fn qat_entries(cx: &Ctxt, attrs: &[Attribute]) -> (Vec<Meta>, bool) {
    let mut metas = Vec::new();
    let mut ok = true;
    for attr in attrs.iter().filter(|a| a.path().is_ident("qat")) {
        let list = match &attr.meta {
            Meta::List(list) => list,
            other => {
                cx.error_spanned_by(other, format_args!("expected a list: #[qat(...)]; {USAGE}"));
                ok = false;
                continue;
            }
        };
        match list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated) {
            Ok(entries) => metas.extend(entries),
            Err(e) => {
                cx.syn_error(e);
                ok = false;
            }
        }
    }
    (metas, ok)
}

fn entry_name(meta: &Meta) -> String {
    meta.path().to_token_stream().to_string().replace(' ', "")
}

fn flag(cx: &Ctxt, meta: &Meta, slot: &mut Option<Ident>) -> bool {
    let name = entry_name(meta);
    if !matches!(meta, Meta::Path(_)) {
        cx.error_spanned_by(
            meta,
            format_args!("`{name}` takes no value: write #[qat({name})]"),
        );
        return false;
    }
    let ident = meta
        .path()
        .get_ident()
        .cloned()
        .expect("checked by the caller");
    if slot.is_some() {
        cx.error_at(
            ident.span(),
            format_args!("`{name}` is given twice; give it once"),
        );
        return false;
    }
    *slot = Some(ident);
    true
}

fn parse_group(cx: &Ctxt, meta: &Meta) -> Option<Group> {
    let Meta::List(list) = meta else {
        cx.error_spanned_by(
            meta,
            "`fuse` needs the fields to fuse, in forward order: #[qat(fuse(conv1, bn1, relu1))]",
        );
        return None;
    };
    if !matches!(list.delimiter, syn::MacroDelimiter::Paren(_)) {
        cx.error_spanned_by(
            meta,
            "`fuse` needs the fields to fuse in parentheses: #[qat(fuse(conv1, bn1, relu1))]",
        );
        return None;
    }
    let parsed = list
        .parse_args_with(Punctuated::<MemberToken, Token![,]>::parse_terminated)
        .and_then(|p| p.into_iter().map(MemberToken::into_ref).collect());
    match parsed {
        Ok(members) => Some(Group {
            keyword: list
                .path
                .get_ident()
                .cloned()
                .expect("checked by the caller"),
            paren: list.delimiter.span().join(),
            members,
            valid: Cell::new(true),
        }),
        Err(e) => {
            cx.syn_error(e);
            None
        }
    }
}

/// Parses the struct's `#[qat(...)]`.
pub fn struct_attrs(cx: &Ctxt, attrs: &[Attribute]) -> StructAttrs {
    let mut out = StructAttrs::default();
    for meta in qat_entries(cx, attrs).0 {
        let path = meta.path();
        if path.is_ident(FUSE) {
            out.groups.extend(parse_group(cx, &meta));
        } else if path.is_ident(AUTO_FUSE) {
            flag(cx, &meta, &mut out.auto_fuse);
        } else if path.is_ident(SKIP) {
            cx.error_spanned_by(
                path,
                "`skip` goes on a field, not on the struct: put #[qat(skip)] on each field \
                 that holds no layers",
            );
        } else {
            unknown(cx, &meta);
        }
    }
    out
}

/// Parses a field's `#[qat(...)]`.
pub fn field_attrs(cx: &Ctxt, attrs: &[Attribute]) -> FieldAttrs {
    let mut out = FieldAttrs::default();
    let (metas, ok) = qat_entries(cx, attrs);
    out.poisoned = !ok;
    for meta in metas {
        let path = meta.path();
        if path.is_ident(SKIP) {
            out.poisoned |= !flag(cx, &meta, &mut out.skip);
        } else if path.is_ident(FUSE) || path.is_ident(AUTO_FUSE) {
            cx.error_spanned_by(
                path,
                format_args!(
                    "`{}` goes on the struct, not on a field: declare groups above the struct, \
                     e.g. #[qat(fuse(conv1, bn1, relu1))] or #[qat(auto_fuse)]",
                    entry_name(&meta)
                ),
            );
            out.poisoned = true;
        } else {
            unknown(cx, &meta);
            out.poisoned = true;
        }
    }
    out
}

fn unknown(cx: &Ctxt, meta: &Meta) {
    cx.error_spanned_by(
        meta.path(),
        format_args!("unknown qat attribute `{}`; {USAGE}", entry_name(meta)),
    );
}
