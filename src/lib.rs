//! # candle-qat
//!
//! Quantization-aware training for [candle](https://github.com/huggingface/candle), with
//! PyTorch's eager-mode numerics: observers, fake quantization (straight-through and LSQ),
//! fusion checked at compile time, qconfig mapping and `prepare_qat`.
//!
//! This crate re-exports `qat-core` and, with the default `derive` feature,
//! `#[derive(Quantizable)]` from `qat-macros`.
//!
//! ```
//! use candle_qat::prelude::*;
//! let qconfig = QConfig::default_qat(Backend::X86);
//! let mut fq = qconfig.activation.build()?;
//! let x = candle_core::Tensor::new(&[0.1f32, 0.7, 1.0], &candle_core::Device::Cpu)?;
//! let y = fq.forward(&x)?; // observes, then fake-quantizes to 0..=127
//! assert_eq!(y.dims(), &[3]);
//! # Ok::<(), candle_qat::Error>(())
//! ```

pub use qat_core::*;

/// `#[derive(Quantizable)]`: walks the struct's fields with PyTorch module paths, fuses the
/// declared `#[qat(fuse(...))]` groups and checks them at compile time.
#[cfg(feature = "derive")]
pub use qat_macros::Quantizable;

/// The names most programs need.
pub mod prelude {
    pub use qat_core::fake_quant::IntxSpec;
    pub use qat_core::model::{ModulePath, Quantizable, Stage};
    pub use qat_core::nn::{
        AdaptiveAvgPool2d, AvgPool2d, AvgPoolOutput, BatchNorm1d, BatchNorm2d, BatchNorm3d,
        BatchNormConfig, Conv1d, Conv2d, Conv3d, ConvConfig, ConvTranspose1d, ConvTranspose2d,
        ConvTransposeConfig, DeQuantStub, Dropout, Embedding, Flatten, FloatFunctional, Gelu,
        Hardsigmoid, Hardswish, Identity, LayerNorm, LeakyReLU, Linear, MaxPool2d, QuantStub, ReLU,
        ReLU6, RmsNorm, SiLU, Sigmoid, Tanh, Upsample, ELU, GELU,
    };
    pub use qat_core::passes::{
        disable_fake_quant, disable_observer, enable_fake_quant, enable_observer,
        enable_param_learning, enable_static_estimate, eval, freeze_bn_stats, fuse_modules,
        fuse_modules_qat, initialize_fake_quantizers, learnable_parameters, make_learnable,
        named_modules, prepare_qat, summary, train, update_bn_stats,
    };
    pub use qat_core::qconfig::{
        Backend, BlockType, FakeQuantizeSpec, ObserverKind, QConfig, Scheme,
    };
    pub use qat_core::qconfig_mapping::QConfigMapping;
    pub use qat_core::{qconfig_mapping, Error, QDType, QParams, QScheme, Result};

    #[cfg(feature = "derive")]
    pub use qat_macros::Quantizable;
}

/// The README's code blocks, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
