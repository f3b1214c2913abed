//! Procedural macros for candle-qat: `#[derive(Quantizable)]`.
//!
//! The derive writes structure only (which fields to walk, under which module paths, and which
//! groups to fuse); what walking, fusing and naming mean lives in qat-core. Its attributes are
//! parsed into a typed model (`attr`, `ast`), checked one rule at a time (`check`) with
//! every error collected (`ctxt`), then expanded (`expand`).

mod ast;
mod attr;
mod auto_fuse;
mod bound;
mod check;
mod ctxt;
mod expand;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Implements `Quantizable` (and `Named`) for a struct whose fields are candle-qat layers,
/// other `Quantizable` structs, or `Vec`/`Option`/array/`Box` of those.
///
/// ```ignore
/// use candle_qat::nn::{BatchNorm2d, Conv2d, Linear, ReLU};
/// use candle_qat::Quantizable;
///
/// #[derive(Quantizable)]
/// #[qat(fuse(conv1, bn1, relu1))]
/// struct Block {
///     conv1: Conv2d,
///     bn1: BatchNorm2d,
///     relu1: ReLU,
/// }
///
/// #[derive(Quantizable)]
/// #[qat(auto_fuse)] // finds (fc, relu) by the field types
/// struct Net {
///     blocks: Vec<Block>, // module paths blocks.0.conv1, blocks.1.conv1, ...
///     fc: Linear,
///     relu: ReLU,
///     #[qat(skip)]
///     dropout: f64, // holds no layers
/// }
/// ```
///
/// Module paths are PyTorch's: the field name, or the index in a tuple struct (`0`, `1`),
/// joined with dots.
///
/// # Attributes
///
/// On the struct:
/// - `#[qat(fuse(a, b, c))]`: fuse these fields (in forward order) into one module.
///   Several groups may be given, in one `#[qat]` or in several. A field may be in one group
///   only; the layer types must form a pattern `qat_core::fuse::Fusable` supports: PyTorch's
///   eager fusion table, or a head of your own type that implements
///   `qat_core::fuse::FuseWith` for the members after it.
/// - `#[qat(auto_fuse)]`: also fuse every run of consecutive walked fields whose types form
///   a supported pattern (Conv+BatchNorm[+ReLU], Conv+ReLU, Linear+BatchNorm1d,
///   Linear+ReLU, BatchNorm2d/3d+ReLU), by the last segment of each field's type path,
///   longest match first. Fields in declared groups and skipped fields break a run.
///
/// On a field:
/// - `#[qat(skip)]`: the field holds no layers (a rate, a plain candle module, ...); it is
///   not walked, fused or required to be `Quantizable`.
///
/// Generic structs get a `FieldType: Quantizable` bound for each walked field whose type
/// mentions a type parameter.
#[proc_macro_derive(Quantizable, attributes(qat))]
pub fn derive_quantizable(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
