//! Collects every error the derive finds, so they are all reported together (serde's `Ctxt`).

use std::cell::RefCell;
use std::fmt::Display;

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;

/// The errors found so far. Checks take `&Ctxt` and push; [`Ctxt::finish`] hands them over
/// combined into one [`syn::Error`].
#[derive(Default)]
pub struct Ctxt {
    errors: RefCell<Vec<syn::Error>>,
}

impl Ctxt {
    pub fn new() -> Self {
        Self::default()
    }

    /// An error at `span`.
    pub fn error_at(&self, span: Span, msg: impl Display) {
        self.errors.borrow_mut().push(syn::Error::new(span, msg));
    }

    /// An error spanning all of `tokens`.
    pub fn error_spanned_by(&self, tokens: impl ToTokens, msg: impl Display) {
        self.errors
            .borrow_mut()
            .push(syn::Error::new_spanned(tokens.into_token_stream(), msg));
    }

    /// An error syn produced while parsing.
    pub fn syn_error(&self, e: syn::Error) {
        self.errors.borrow_mut().push(e);
    }

    /// All the errors, as `compile_error!` invocations (empty when there are none).
    pub fn finish(self) -> TokenStream {
        let mut all = self.errors.into_inner().into_iter();
        match all.next() {
            None => TokenStream::new(),
            Some(mut first) => {
                for e in all {
                    first.combine(e);
                }
                first.to_compile_error()
            }
        }
    }
}
