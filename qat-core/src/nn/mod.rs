//! Quantizable layers. Each is a candle `Module`, built from a `VarBuilder` with PyTorch's
//! parameter names, and moves through the pipeline's stages (float, fused, prepared,
//! converted) in place, so the model's forward code never changes.

mod activation;
mod attention;
mod avg_pool;
mod batch_norm;
pub(crate) mod common;
mod conv;
mod conv_transpose;
mod dropout;
mod embedding;
mod functional;
mod gguf_tensor;
mod input;
mod linear;
mod norm;
mod params;
mod piecewise;
mod pool;
mod simple;
mod stubs;
mod upsample;
pub(crate) mod weighted;

pub use activation::{Gelu, Identity, ReLU, SiLU, Sigmoid, Tanh, GELU};
pub use attention::{
    batched_matmul, batched_matmul_t, causal_softmax, merge_heads, rope_i, softmax_last_dim,
    split_heads, split_heads_rope_i,
};
pub use avg_pool::{AdaptiveAvgPool2d, AvgPool2d, AvgPoolOutput};
pub(crate) use batch_norm::BatchNormInner;
pub use batch_norm::{BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormConfig};
pub use conv::{Conv1d, Conv2d, Conv3d, ConvConfig};
pub use conv_transpose::{ConvTranspose1d, ConvTranspose2d, ConvTransposeConfig};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use functional::FloatFunctional;
pub use linear::Linear;
pub use norm::{LayerNorm, RmsNorm};
pub use piecewise::{Hardsigmoid, Hardswish, LeakyReLU, ReLU6, ELU};
pub use pool::{Flatten, MaxPool2d};
pub use stubs::{DeQuantStub, QuantStub};
pub use upsample::Upsample;

/// Each layer's name for mapping qconfigs by type ([`crate::qconfig_mapping::Named`]).
macro_rules! named {
    ($($t:ident),*) => {$(
        impl crate::qconfig_mapping::Named for $t {
            const TYPE_NAME: &'static str = stringify!($t);
        }
    )*};
}

named!(
    Conv1d,
    Conv2d,
    Conv3d,
    ConvTranspose1d,
    ConvTranspose2d,
    Linear,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    ReLU,
    Sigmoid,
    Tanh,
    Identity,
    QuantStub,
    DeQuantStub,
    FloatFunctional,
    MaxPool2d,
    Flatten,
    RmsNorm,
    LayerNorm,
    SiLU,
    GELU,
    Dropout,
    Embedding,
    ReLU6,
    Hardswish,
    Hardsigmoid,
    LeakyReLU,
    ELU,
    AvgPool2d,
    AdaptiveAvgPool2d,
    Upsample
);
