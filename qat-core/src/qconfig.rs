//! QConfigs: how a module's weights and activations are fake-quantized. A [`QConfig`] holds
//! two factories ([`FakeQuantizeSpec`]); every module that uses it builds fresh observers and
//! buffers from them, as PyTorch's `QConfig(activation=..., weight=...)` partials do.

pub use crate::fake_quant::spec::{
    FakeQuantizeSpec, FakeQuantizeSpecBuilder, LearnableSpec, ObserverKind, ObserverSpec,
};
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
}

impl QConfig {
    /// A QConfig from its two specs (x86 integer arithmetic).
    pub fn new(activation: FakeQuantizeSpec, weight: FakeQuantizeSpec) -> Self {
        QConfig {
            activation,
            weight,
            backend: Backend::X86,
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
