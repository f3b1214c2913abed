//! Writes the `Quantizable` and `Named` impls. Structure only: what fusing, walking and
//! naming mean lives in qat-core.

use proc_macro2::{Delimiter, Group, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{DeriveInput, Ident};

use crate::ast::{Container, Field};
use crate::bound::{self, TypeParams};
use crate::ctxt::Ctxt;
use crate::{auto_fuse, check};

/// The derive: the impls, preceded by every error found. With errors, the impls still come
/// (leaving out the parts in error) so that the user sees those errors and not a cascade of
/// "`Net` is not quantizable" at every use of the model.
pub fn derive(input: &DeriveInput) -> TokenStream {
    let cx = Ctxt::new();
    let name = crate_name();
    let krate = crate_path(&name, Span::call_site());
    let impls = match Container::from_ast(&cx, input) {
        Some(cont) => {
            check::check(&cx, &cont);
            impl_struct(&cont, &name, &krate)
        }
        None => impl_fallback(input, &krate),
    };
    let errors = cx.finish();
    quote!(#errors #impls)
}

/// Where the traits live: `::candle_qat` (also inside candle-qat itself, whose tests and
/// examples are the only users there), else `::qat_core` for a crate that depends on
/// qat-core only.
fn crate_name() -> String {
    use proc_macro_crate::{crate_name, FoundCrate};
    match crate_name("candle-qat") {
        Ok(FoundCrate::Name(n)) => n,
        Ok(FoundCrate::Itself) => "candle_qat".to_string(),
        Err(_) => match crate_name("qat-core") {
            Ok(FoundCrate::Name(n)) => n,
            Ok(FoundCrate::Itself) => "qat_core".to_string(),
            Err(_) => "candle_qat".to_string(),
        },
    }
}

/// `::name`, all its tokens at `span` (so that a path built on it is reported there).
fn crate_path(name: &str, span: Span) -> TokenStream {
    let ident = Ident::new(name, span);
    quote_spanned!(span=> ::#ident)
}

/// One group to fuse: its members and where its errors point.
struct FuseCall<'c, 'a> {
    members: Vec<&'c Field<'a>>,
    /// The `fuse` (or `auto_fuse`) keyword: the called function.
    keyword: Span,
    /// The member list: the argument, where an unsupported pattern is reported.
    list: Span,
}

fn fuse_calls<'c, 'a>(cont: &'c Container<'a>) -> Vec<FuseCall<'c, 'a>> {
    let declared = cont
        .attrs
        .groups
        .iter()
        .filter(|g| g.valid.get())
        .map(|g| FuseCall {
            members: g
                .members
                .iter()
                .map(|m| cont.field(&m.name).expect("checked"))
                .collect(),
            keyword: g.keyword.span(),
            list: g.paren,
        });
    // A group auto_fuse found is reported at `auto_fuse` and its first field.
    let auto = cont.attrs.auto_fuse.iter().flat_map(|kw| {
        auto_fuse::groups(cont).into_iter().map(|idx| {
            let members: Vec<&Field> = idx.into_iter().map(|i| &cont.fields[i]).collect();
            FuseCall {
                keyword: kw.span(),
                list: members[0].member.span(),
                members,
            }
        })
    });
    declared.chain(auto).collect()
}

fn impl_struct(cont: &Container, crate_name: &str, krate: &TokenStream) -> TokenStream {
    let ident = cont.ident;
    let type_name = syn::ext::IdentExt::unraw(ident).to_string();
    let q = quote!(#krate::model::Quantizable);
    let walked: Vec<&Field> = cont.fields.iter().filter(|f| f.walked()).collect();
    let groups = fuse_calls(cont);

    // where-clause bounds for what mentions a type parameter
    let params = TypeParams::new(cont.generics);
    let mut bounds: Vec<TokenStream> = walked
        .iter()
        .filter(|f| params.mentioned_in(f.ty))
        .map(|f| {
            let ty = f.ty;
            quote!(#ty: #q)
        })
        .collect();
    bounds.extend(
        groups
            .iter()
            .filter(|g| g.members.iter().any(|f| params.mentioned_in(f.ty)))
            .map(|g| {
                let tys = g.members.iter().map(|f| f.ty);
                quote!(for<'__qat> (#(&'__qat mut #tys,)*): #krate::fuse::Fusable)
            }),
    );
    let (impl_generics, ty_generics, where_clause) = cont.generics.split_for_impl();
    let named_where = where_clause;
    let where_clause = bound::with_bounds(where_clause, bounds);

    // each walked field, at its type so that a type that is not quantizable is reported there
    let walk = |method: &str, borrow: TokenStream, args: TokenStream| -> Vec<TokenStream> {
        let method = format_ident!("{method}");
        walked
            .iter()
            .map(|f| {
                let (ty, member, name) = (f.ty, &f.member, &f.name);
                quote_spanned! {ty.span()=>
                    path.scoped(#name, |path| <#ty as #q>::#method(#borrow self.#member, path, #args))?;
                }
            })
            .collect()
    };
    let visit = walk("visit", quote!(&), quote!(visitor));
    let visit_mut = walk("visit_mut", quote!(&mut), quote!(visitor));
    let fuse_fields = walk("fuse", quote!(&mut), quote!(mode));

    let fuse_groups = groups.iter().map(|g| {
        // Every token of the argument at the member list, so that an unsupported pattern is
        // reported there and not across the lines up to the first field.
        let members = g.members.iter().map(|f| {
            let mut m = f.member.clone();
            match &mut m {
                syn::Member::Named(ident) => ident.set_span(g.list),
                syn::Member::Unnamed(index) => index.span = g.list,
            }
            m
        });
        let names = g.members.iter().map(|f| &f.name);
        let mut tuple = Group::new(
            Delimiter::Parenthesis,
            quote_spanned!(g.list=> #(&mut self.#members),*),
        );
        tuple.set_span(g.list);
        let callee = crate_path(crate_name, g.keyword);
        let callee = quote_spanned!(g.keyword=> #callee::fuse::Fusable::fuse);
        quote_spanned! {g.list=>
            #callee(#tuple, &#krate::fuse::FuseGroup { path, members: &[#(#names),*], mode })?;
        }
    });
    let group_names = groups.iter().map(|g| {
        let names = g.members.iter().map(|f| &f.name);
        quote!(::std::vec![#(#names),*])
    });
    let (path, mode) = if walked.is_empty() && groups.is_empty() {
        (quote!(_path), quote!(_mode))
    } else {
        (quote!(path), quote!(mode))
    };
    let fusion_groups = if groups.is_empty() {
        quote!(::std::vec::Vec::new())
    } else {
        quote!(::std::vec![#(#group_names),*])
    };

    quote! {
        #[automatically_derived]
        impl #impl_generics #q for #ident #ty_generics #where_clause {
            fn visit(
                &self,
                path: &mut #krate::model::ModulePath,
                visitor: &mut dyn #krate::model::ModuleVisitor,
            ) -> #krate::Result<()> {
                visitor.enter(path, #type_name)?;
                #(#visit)*
                ::core::result::Result::Ok(())
            }

            fn visit_mut(
                &mut self,
                path: &mut #krate::model::ModulePath,
                visitor: &mut dyn #krate::model::ModuleVisitorMut,
            ) -> #krate::Result<()> {
                visitor.enter(path, #type_name)?;
                #(#visit_mut)*
                visitor.leave(path)
            }

            fn fuse(
                &mut self,
                #path: &mut #krate::model::ModulePath,
                #mode: #krate::model::FuseMode,
            ) -> #krate::Result<()> {
                #(#fuse_groups)*
                #(#fuse_fields)*
                ::core::result::Result::Ok(())
            }

            fn fusion_groups(&self) -> ::std::vec::Vec<::std::vec::Vec<&'static str>> {
                #fusion_groups
            }
        }

        #[automatically_derived]
        impl #impl_generics #krate::qconfig_mapping::Named for #ident #ty_generics #named_where {
            const TYPE_NAME: &'static str = #type_name;
        }
    }
}

/// For an enum or a union (already reported): impls that walk nothing, so that the derive's
/// error is the only one.
fn impl_fallback(input: &DeriveInput, krate: &TokenStream) -> TokenStream {
    let ident = &input.ident;
    let type_name = syn::ext::IdentExt::unraw(ident).to_string();
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let where_clause = where_clause.map(ToTokens::to_token_stream);
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::model::Quantizable for #ident #ty_generics #where_clause {
            fn visit(
                &self,
                _path: &mut #krate::model::ModulePath,
                _visitor: &mut dyn #krate::model::ModuleVisitor,
            ) -> #krate::Result<()> {
                ::core::result::Result::Ok(())
            }

            fn visit_mut(
                &mut self,
                _path: &mut #krate::model::ModulePath,
                _visitor: &mut dyn #krate::model::ModuleVisitorMut,
            ) -> #krate::Result<()> {
                ::core::result::Result::Ok(())
            }
        }

        #[automatically_derived]
        impl #impl_generics #krate::qconfig_mapping::Named for #ident #ty_generics #where_clause {
            const TYPE_NAME: &'static str = #type_name;
        }
    }
}
