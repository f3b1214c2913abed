//! The derive input as a typed model: the struct, its fields and its `qat` attributes.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, Generics, Ident, Member, Type};

use crate::attr::{self, StructAttrs};
use crate::ctxt::Ctxt;

/// A struct the derive can implement `Quantizable` for.
pub struct Container<'a> {
    pub ident: &'a Ident,
    pub generics: &'a Generics,
    pub fields: Vec<Field<'a>>,
    pub attrs: StructAttrs,
}

pub struct Field<'a> {
    /// How the generated code reaches the field: `self.#member`.
    pub member: Member,
    /// The module path segment: the field's name, or its index in a tuple struct.
    pub name: String,
    pub ty: &'a Type,
    /// `#[qat(skip)]`.
    pub skip: Option<Span>,
    /// One of its `qat` attributes was wrong (already reported): leave it out.
    pub poisoned: bool,
}

impl Field<'_> {
    /// Whether the generated code walks this field.
    pub fn walked(&self) -> bool {
        self.skip.is_none() && !self.poisoned
    }
}

impl<'a> Container<'a> {
    /// The model of `input`, or `None` (with the error reported) for an enum or a union.
    pub fn from_ast(cx: &Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let attrs = attr::struct_attrs(cx, &input.attrs);
        let fields = match &input.data {
            Data::Struct(s) => match &s.fields {
                Fields::Named(f) => fields(cx, f.named.iter()),
                Fields::Unnamed(f) => fields(cx, f.unnamed.iter()),
                Fields::Unit => Vec::new(),
            },
            Data::Enum(e) => {
                cx.error_at(
                    e.enum_token.span,
                    "#[derive(Quantizable)] works on structs only, not on enums: put the \
                     layers in a struct's fields (use Option<Layer> for a layer that may be \
                     absent)",
                );
                return None;
            }
            Data::Union(u) => {
                cx.error_at(
                    u.union_token.span,
                    "#[derive(Quantizable)] works on structs only, not on unions: put the \
                     layers in a struct's fields",
                );
                return None;
            }
        };
        Some(Container {
            ident: &input.ident,
            generics: &input.generics,
            fields,
            attrs,
        })
    }

    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&Field<'a>> {
        self.fields.iter().find(|f| f.name == name)
    }
}

fn fields<'a>(cx: &Ctxt, fields: impl Iterator<Item = &'a syn::Field>) -> Vec<Field<'a>> {
    fields
        .enumerate()
        .map(|(i, f)| {
            let attrs = attr::field_attrs(cx, &f.attrs);
            let (member, name) = match &f.ident {
                Some(ident) => (
                    Member::Named(ident.clone()),
                    syn::ext::IdentExt::unraw(ident).to_string(),
                ),
                None => (
                    Member::Unnamed(syn::Index {
                        index: i as u32,
                        span: f.ty.span(),
                    }),
                    i.to_string(),
                ),
            };
            Field {
                member,
                name,
                ty: &f.ty,
                skip: attrs.skip.map(|s| s.span()),
                poisoned: attrs.poisoned,
            }
        })
        .collect()
}
