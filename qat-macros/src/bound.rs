//! Where-clause bounds for generic structs, as thiserror adds them: only for the walked fields
//! (and fuse groups) whose types mention one of the struct's type parameters.

use std::collections::HashSet;

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::visit::Visit;
use syn::{Generics, Ident, Type, WhereClause};

/// The struct's type parameters.
pub struct TypeParams<'a>(HashSet<&'a Ident>);

impl<'a> TypeParams<'a> {
    pub fn new(generics: &'a Generics) -> Self {
        TypeParams(generics.type_params().map(|p| &p.ident).collect())
    }

    /// Whether `ty` mentions one of them.
    pub fn mentioned_in(&self, ty: &Type) -> bool {
        struct Finder<'p, 'a> {
            params: &'p HashSet<&'a Ident>,
            found: bool,
        }
        impl<'ast> Visit<'ast> for Finder<'_, '_> {
            fn visit_type_path(&mut self, tp: &'ast syn::TypePath) {
                if tp.qself.is_none() && tp.path.leading_colon.is_none() {
                    if let Some(first) = tp.path.segments.first() {
                        self.found |= self.params.contains(&first.ident);
                    }
                }
                syn::visit::visit_type_path(self, tp);
            }
            fn visit_type_macro(&mut self, _: &'ast syn::TypeMacro) {
                // A macro could expand to anything that mentions a parameter.
                self.found = true;
            }
        }
        if self.0.is_empty() {
            return false;
        }
        let mut f = Finder {
            params: &self.0,
            found: false,
        };
        f.visit_type(ty);
        f.found
    }
}

/// The struct's where clause with `bounds` appended (each once).
pub fn with_bounds(existing: Option<&WhereClause>, bounds: Vec<TokenStream>) -> TokenStream {
    let mut seen = HashSet::new();
    let bounds: Vec<TokenStream> = bounds
        .into_iter()
        .filter(|b| seen.insert(b.to_string()))
        .collect();
    if bounds.is_empty() {
        return existing.map(ToTokens::to_token_stream).unwrap_or_default();
    }
    let predicates = existing.map(|w| {
        let p = w.predicates.iter();
        quote!(#(#p,)*)
    });
    quote!(where #predicates #(#bounds,)*)
}
