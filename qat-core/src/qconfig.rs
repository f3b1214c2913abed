//! QConfigs: how a module's weights and activations are fake-quantized. A [`QConfig`] holds
//! two factories ([`FakeQuantizeSpec`]); every module that uses it builds fresh observers and
//! buffers from them, as PyTorch's `QConfig(activation=..., weight=...)` partials do.

use crate::error::Result;
pub use crate::fake_quant::spec::{
    FakeQuantizeSpec, FakeQuantizeSpecBuilder, LearnableSpec, ObserverKind, ObserverSpec,
};
pub use crate::fake_quant::IntxSpec;
pub use crate::ggml::BlockType;
use crate::observer::ObserverConfig;
use crate::qparams::{QDType, QScheme};

/// The quantized backends whose PyTorch presets we reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Server x86 (FBGEMM): activations in 0..=127 (reduce_range), per-channel weights.
    Fbgemm,
    /// PyTorch's current x86 default: same qconfig as fbgemm.
    X86,
    /// Mobile ARM (QNNPACK): activations in 0..=255, per-tensor symmetric weights.
    Qnnpack,
}

/// Which family of fake quantization a [`QConfig`] asks for, and so where it applies.
///
/// | scheme | weight | activations | layers |
/// |---|---|---|---|
/// | `Eager` (PyTorch `torch.ao.quantization`) | [`QConfig::weight`] | the module's **output** ([`QConfig::activation`]) | every quantizable layer |
/// | `Intx` (torchao 0.18 `IntxFakeQuantizeConfig`) | `weight` | a Linear's **input** (`input`; `None`: weight only); outputs stay float | Linear, Embedding (weight-only schemes) |
/// | `Ggml` (candle / llama.cpp GGUF blocks) | blocks of `weight` | a Linear's **input** in the type's vec-dot type (when `input`) | Linear, Embedding (weight-only schemes) |
///
/// Under an `Intx` or `Ggml` scheme, layers without weights (norms, activations, dropout,
/// pools) stay float, as torchao leaves them; an Embedding takes only a weight-only scheme
/// (a scheme that quantizes inputs is a Linear scheme and leaves the Embedding float, as
/// torchao's `quantize_` applies a Linear config to Linears: map the Embedding's type or path
/// to a weight-only scheme); conv, BatchNorm, QuantStub and FloatFunctional refuse them at
/// prepare time (give them an eager qconfig by type or path). One mapping can mix an eager
/// conv stem with torchao-style Linears.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scheme {
    /// PyTorch eager mode: `activation` on module outputs, `weight` on weights.
    Eager,
    /// torchao: `input` fake-quantizes a Linear's input (`None`: weight-only), `weight` the
    /// weight of a Linear or Embedding.
    Intx {
        /// The Linear input's scheme (per token in torchao's presets).
        input: Option<IntxSpec>,
        /// The weight's scheme (per group or per axis).
        weight: IntxSpec,
    },
    /// GGML blocks: the weight in `weight`'s blocks and, with `input`, a Linear's input in
    /// the type's vec-dot type (Q8_0, Q8_1 or Q8_K), as candle's CPU `QMatMul` quantizes it.
    Ggml {
        /// The weight's block type.
        weight: BlockType,
        /// Whether a Linear's input is fake-quantized in `weight.vec_dot_type()`.
        input: bool,
    },
}

impl Scheme {
    /// Whether the scheme quantizes a Linear's input (torchao / GGML) or is weight-only.
    pub fn quantizes_inputs(&self) -> bool {
        match self {
            Scheme::Eager => false,
            Scheme::Intx { input, .. } => input.is_some(),
            Scheme::Ggml { input, .. } => *input,
        }
    }

    /// A short name for summaries (`8da4w`-style: `intx a8 w4/g32`, `ggml Q4_0`).
    pub fn describe(&self) -> String {
        fn spec(s: &IntxSpec) -> String {
            let g = match s.granularity() {
                crate::fake_quant::IntxGranularity::PerToken => "tok".to_string(),
                crate::fake_quant::IntxGranularity::PerAxis => "axis".to_string(),
                crate::fake_quant::IntxGranularity::PerGroup(g) => format!("g{g}"),
            };
            let sym = if s.is_symmetric() { "sym" } else { "asym" };
            format!("int{}/{g}/{sym}", s.bits())
        }
        match self {
            Scheme::Eager => "eager".into(),
            Scheme::Intx { input, weight } => match input {
                Some(i) => format!("intx input {} weight {}", spec(i), spec(weight)),
                None => format!("intx weight-only {}", spec(weight)),
            },
            Scheme::Ggml { weight, input } => {
                if *input {
                    format!(
                        "ggml {} (inputs {})",
                        weight.name(),
                        weight.vec_dot_type().name()
                    )
                } else {
                    format!("ggml {} weight-only", weight.name())
                }
            }
        }
    }
}

/// How a layer takes a non-eager [`Scheme`] (the answer of
/// [`crate::model::QuantModule::scheme_support`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemeSupport {
    /// It cannot take one: prepare refuses it, naming the layer.
    Refused,
    /// It has nothing to quantize under such a scheme and stays float (norms, activations).
    Float,
    /// Its weight only (Embedding): weight-only schemes apply, others leave it float.
    WeightOnly,
    /// Input and weight (Linear).
    InputAndWeight,
}

/// Weight and activation quantization settings of a module: PyTorch's `QConfig`.
///
/// ```
/// use qat_core::qconfig::{Backend, QConfig};
/// let qc = QConfig::default_qat(Backend::X86);
/// let act = qc.activation.quant_range()?;
/// assert_eq!((act.quant_min(), act.quant_max()), (0, 127));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QConfig {
    /// Fake-quant of the module's output.
    pub activation: FakeQuantizeSpec,
    /// Fake-quant of the module's weight.
    pub weight: FakeQuantizeSpec,
    /// The integer engine whose arithmetic `convert` reproduces: fbgemm and x86 add a float
    /// bias before requantizing, qnnpack quantizes the bias to int32 first.
    pub backend: Backend,
    /// Which family of fake quantization applies ([`Scheme::Eager`]: `activation` and
    /// `weight`; otherwise the scheme's own specs, and `activation` / `weight` are unused).
    pub scheme: Scheme,
}

impl QConfig {
    /// A QConfig from its two specs (x86 integer arithmetic).
    pub fn new(activation: FakeQuantizeSpec, weight: FakeQuantizeSpec) -> Self {
        QConfig {
            activation,
            weight,
            backend: Backend::X86,
            scheme: Scheme::Eager,
        }
    }

    /// A torchao-style qconfig: `input` fake-quantizes a Linear's input (`None`:
    /// weight-only), `weight` the weight of a Linear (or, weight-only, an Embedding); module
    /// outputs stay float. torchao's `QATConfig(activation_config=input,
    /// weight_config=weight)`.
    ///
    /// ```
    /// use qat_core::fake_quant::IntxSpec;
    /// use qat_core::qconfig::QConfig;
    /// // int3 weights in groups of 32, inputs float (torchao IntxWeightOnlyConfig(int3, PerGroup(32))).
    /// let w3 = IntxSpec::builder(3).per_group(32).build()?;
    /// let qc = QConfig::intx(None, w3);
    /// assert!(!qc.scheme.quantizes_inputs());
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn intx(input: Option<IntxSpec>, weight: IntxSpec) -> Self {
        QConfig {
            scheme: Scheme::Intx { input, weight },
            ..QConfig::default_qat(Backend::X86)
        }
    }

    /// torchao's 8da4w, `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
    /// weight_granularity=PerGroup(group_size))` (QAT: `Int8DynamicActivationInt4WeightConfig`
    /// in older torchao): int8 per-token asymmetric dynamic inputs, int4 symmetric weights
    /// with one scale per `group_size` input features (torchao's default 32). `group_size`
    /// must divide every Linear's in_features (checked at prepare time).
    ///
    /// ```
    /// use qat_core::qconfig::QConfig;
    /// let qc = QConfig::int8_dynamic_activation_int4_weight(32)?;
    /// assert!(qc.scheme.quantizes_inputs());
    /// assert!(QConfig::int8_dynamic_activation_int4_weight(1).is_err());
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn int8_dynamic_activation_int4_weight(group_size: usize) -> Result<Self> {
        Ok(Self::intx(
            Some(IntxSpec::int8_per_token_asym()),
            IntxSpec::int4_per_group(group_size)?,
        ))
    }

    /// int4 weight-only, torchao's `IntxWeightOnlyConfig(weight_dtype=torch.int4,
    /// granularity=PerGroup(group_size))`: symmetric int4 weights per group, inputs float.
    /// (torchao's `Int4WeightOnlyConfig` fake-quantizes with its tinygemm/bf16 numerics
    /// instead; we reproduce the intx one.)
    pub fn int4_weight_only(group_size: usize) -> Result<Self> {
        Ok(Self::intx(None, IntxSpec::int4_per_group(group_size)?))
    }

    /// int8 dynamic inputs + int8 per-channel weights, torchao's
    /// `Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
    /// weight_granularity=PerAxis(0))`.
    pub fn int8_dynamic_activation_int8_weight() -> Self {
        Self::intx(
            Some(IntxSpec::int8_per_token_asym()),
            IntxSpec::int8_per_axis(),
        )
    }

    /// A weight-only intx scheme (for Embedding: torchao's `IntxWeightOnlyConfig` on
    /// `nn.Embedding`, int8 per axis by default there).
    ///
    /// ```
    /// use qat_core::fake_quant::IntxSpec;
    /// use qat_core::nn::Embedding;
    /// use qat_core::qconfig::QConfig;
    /// use qat_core::qconfig_mapping::QConfigMapping;
    /// let m = QConfigMapping::global(QConfig::int8_dynamic_activation_int4_weight(32)?)
    ///     .set_type::<Embedding>(QConfig::intx_weight_only(IntxSpec::int8_per_axis()));
    /// # Ok::<(), qat_core::Error>(())
    /// ```
    pub fn intx_weight_only(weight: IntxSpec) -> Self {
        Self::intx(None, weight)
    }

    /// GGML blocks as candle's quantized runtime computes them: weights in `weight`'s blocks
    /// and each Linear's input in the type's vec-dot type (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for
    /// Q4_1/Q5_1, Q8_K for the K-quants), so the fake-quant model computes what the
    /// converted `QMatMul` (and the exported GGUF) computes. Embeddings stay float under it
    /// (give them [`QConfig::ggml_weight_only`] by type or path).
    ///
    /// ```
    /// use qat_core::qconfig::{BlockType, QConfig};
    /// let q4 = QConfig::ggml(BlockType::Q4_0);
    /// assert!(q4.scheme.quantizes_inputs());
    /// ```
    pub fn ggml(weight: BlockType) -> Self {
        QConfig {
            scheme: Scheme::Ggml {
                weight,
                input: true,
            },
            ..QConfig::default_qat(Backend::X86)
        }
    }

    /// GGML blocks on the weight only (an Embedding's table, which candle dequantizes on
    /// load; on a Linear the deployed `QMatMul` would still quantize inputs, so convert
    /// refuses it there).
    pub fn ggml_weight_only(weight: BlockType) -> Self {
        QConfig {
            scheme: Scheme::Ggml {
                weight,
                input: false,
            },
            ..QConfig::default_qat(Backend::X86)
        }
    }

    /// The same qconfig for another integer engine.
    pub fn with_backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// PyTorch's `get_default_qat_qconfig(backend, version=0)`: FakeQuantize with
    /// moving-average min/max observers (constant 0.01). fbgemm and x86: activations quint8
    /// 0..=255 with reduce_range (so 0..=127), weights qint8 -128..=127 per-channel symmetric
    /// on axis 0. qnnpack: activations 0..=255, weights per-tensor symmetric.
    pub fn default_qat(backend: Backend) -> Self {
        let mavg = ObserverKind::MovingAverageMinMax {
            averaging_constant: 0.01,
        };
        let reduce = matches!(backend, Backend::Fbgemm | Backend::X86);
        let activation = FakeQuantizeSpec {
            observer: ObserverSpec {
                kind: mavg,
                config: ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine)
                    .with_range(0, 255)
                    .with_reduce_range(reduce),
            },
            learnable: None,
        };
        let weight_scheme = if reduce {
            QScheme::PerChannelSymmetric
        } else {
            QScheme::PerTensorSymmetric
        };
        let weight = FakeQuantizeSpec {
            observer: ObserverSpec {
                kind: mavg,
                config: ObserverConfig::new(QDType::QINT8, weight_scheme)
                    .with_range(-128, 127)
                    .with_ch_axis(0),
            },
            learnable: None,
        };
        QConfig {
            activation,
            weight,
            backend,
            scheme: Scheme::Eager,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets() {
        let q = QConfig::default_qat(Backend::Qnnpack);
        let r = q.activation.quant_range().unwrap();
        assert_eq!((r.quant_min(), r.quant_max()), (0, 255));
        assert_eq!(
            q.weight.observer.config.qscheme,
            QScheme::PerTensorSymmetric
        );
        let q = QConfig::default_qat(Backend::Fbgemm);
        assert_eq!(
            q.weight.observer.config.qscheme,
            QScheme::PerChannelSymmetric
        );
        let x86 = QConfig::default_qat(Backend::X86);
        assert_eq!((q.activation, q.weight), (x86.activation, x86.weight));
        assert_eq!((q.backend, x86.backend), (Backend::Fbgemm, Backend::X86));
    }

    #[test]
    fn builder_errors() {
        assert!(FakeQuantizeSpec::builder().bits(9).build().is_err());
        assert!(FakeQuantizeSpec::builder().range(3, 1).build().is_err());
        assert!(FakeQuantizeSpec::builder().range(1, 200).build().is_err());
        assert!(FakeQuantizeSpec::builder()
            .observer(ObserverKind::Histogram { bins: 64 })
            .per_channel(0)
            .build()
            .is_err());
        assert!(FakeQuantizeSpec::builder()
            .averaging_constant(2.0)
            .build()
            .is_err());
    }
}
