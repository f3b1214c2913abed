//! Fake-quant specs: which observer, code range and scheme a fake-quant uses, as factories
//! that build fresh [`FakeQuantize`] modules (PyTorch's `FakeQuantize.with_args(...)`
//! partials). [`crate::qconfig::QConfig`] pairs two of them.

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::observer::{
    FixedQParamsObserver, HistogramObserver, MinMaxObserver, Observer, ObserverConfig,
};
use crate::qparams::{QDType, QScheme, QuantRange};

/// Which observer a fake-quant uses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ObserverKind {
    /// Running extremes.
    MinMax,
    /// Moving averages of min and max (PyTorch's QAT default, constant 0.01).
    MovingAverageMinMax {
        /// The averaging constant `c` in `v += c * (cur - v)`.
        averaging_constant: f32,
    },
    /// Histogram with an L2-optimal range search (calibration, per tensor only).
    Histogram {
        /// Number of bins (PyTorch's default is 2048).
        bins: usize,
    },
    /// Fixed scale and zero point (sigmoid, tanh outputs).
    FixedQParams {
        /// The fixed scale.
        scale: f32,
        /// The fixed zero point.
        zero_point: i32,
    },
}

/// An observer factory: its kind and its config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObserverSpec {
    /// Which observer.
    pub kind: ObserverKind,
    /// Dtype, scheme, range, eps and channel axis.
    pub config: ObserverConfig,
}

impl ObserverSpec {
    /// Builds a fresh observer.
    pub fn build(&self) -> Result<Box<dyn Observer>> {
        Ok(match self.kind {
            ObserverKind::MinMax => Box::new(MinMaxObserver::new(self.config)?),
            ObserverKind::MovingAverageMinMax { averaging_constant } => Box::new(
                MinMaxObserver::moving_average(self.config, averaging_constant)?,
            ),
            ObserverKind::Histogram { bins } => {
                Box::new(HistogramObserver::new(self.config, bins)?)
            }
            ObserverKind::FixedQParams { scale, zero_point } => Box::new(
                FixedQParamsObserver::new(scale, zero_point, self.config.quant_range()?)?,
            ),
        })
    }
}

/// A fake-quant factory: an observer spec and, for LSQ, the learnable settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FakeQuantizeSpec {
    /// The observer the fake-quant owns.
    pub observer: ObserverSpec,
    /// `Some` for a learnable (LSQ) fake-quant, PyTorch's `_LearnableFakeQuantize`.
    pub learnable: Option<LearnableSpec>,
}

/// Settings of a learnable (LSQ) fake-quant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LearnableSpec {
    /// Multiply scale/zero-point gradients by `1/sqrt(numel * quant_max)` (the LSQ paper's
    /// gradient scaling).
    pub use_grad_scaling: bool,
    /// Initial scale (before the observer sets it).
    pub init_scale: f32,
    /// Initial zero point.
    pub init_zero_point: f32,
}

impl Default for LearnableSpec {
    fn default() -> Self {
        LearnableSpec {
            use_grad_scaling: false,
            init_scale: 1.0,
            init_zero_point: 0.0,
        }
    }
}

impl FakeQuantizeSpec {
    /// Builds a fresh fake-quant module.
    pub fn build(&self) -> Result<FakeQuantize> {
        FakeQuantize::new(self)
    }

    /// The effective code range.
    pub fn quant_range(&self) -> Result<QuantRange> {
        self.observer.config.quant_range()
    }

    /// A builder for custom specs; see [`FakeQuantizeSpecBuilder`].
    pub fn builder() -> FakeQuantizeSpecBuilder {
        FakeQuantizeSpecBuilder::default()
    }

    /// Fixed qparams for sigmoid outputs (1/256, 0), as PyTorch's
    /// `default_fixed_qparams_range_0to1_fake_quant`.
    pub fn fixed_sigmoid() -> Self {
        Self::fixed(1.0 / 256.0, 0)
    }

    /// Fixed qparams for tanh outputs (2/256, 128), as PyTorch's
    /// `default_fixed_qparams_range_neg1to1_fake_quant`.
    pub fn fixed_tanh() -> Self {
        Self::fixed(2.0 / 256.0, 128)
    }

    fn fixed(scale: f32, zero_point: i32) -> Self {
        FakeQuantizeSpec {
            observer: ObserverSpec {
                kind: ObserverKind::FixedQParams { scale, zero_point },
                config: ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine)
                    .with_range(0, 255),
            },
            learnable: None,
        }
    }
}

/// Builds a [`FakeQuantizeSpec`] from the choices people make: bits, signedness,
/// symmetric or affine, per-channel axis, observer kind, averaging constant, LSQ.
///
/// ```
/// use qat_core::qconfig::{FakeQuantizeSpec, ObserverKind};
/// // 4-bit signed symmetric per-channel weights, learnable scale.
/// let w = FakeQuantizeSpec::builder().bits(4).signed(true).symmetric(true).per_channel(0)
///     .learnable(true).build()?;
/// let r = w.quant_range()?;
/// assert_eq!((r.quant_min(), r.quant_max()), (-8, 7));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct FakeQuantizeSpecBuilder {
    bits: u8,
    signed: bool,
    symmetric: bool,
    ch_axis: Option<usize>,
    reduce_range: bool,
    range: Option<(i32, i32)>,
    kind: ObserverKind,
    eps: f32,
    learnable: Option<LearnableSpec>,
}

impl Default for FakeQuantizeSpecBuilder {
    fn default() -> Self {
        FakeQuantizeSpecBuilder {
            bits: 8,
            signed: false,
            symmetric: false,
            ch_axis: None,
            reduce_range: false,
            range: None,
            kind: ObserverKind::MovingAverageMinMax {
                averaging_constant: 0.01,
            },
            eps: f32::EPSILON,
            learnable: None,
        }
    }
}

impl FakeQuantizeSpecBuilder {
    /// Bit width, 2..=8 (default 8).
    pub fn bits(mut self, bits: u8) -> Self {
        self.bits = bits;
        self
    }
    /// Signed codes (default unsigned).
    pub fn signed(mut self, signed: bool) -> Self {
        self.signed = signed;
        self
    }
    /// Symmetric scheme (default affine).
    pub fn symmetric(mut self, symmetric: bool) -> Self {
        self.symmetric = symmetric;
        self
    }
    /// Per-channel qparams along `axis` (default per tensor).
    pub fn per_channel(mut self, axis: usize) -> Self {
        self.ch_axis = Some(axis);
        self
    }
    /// Halve the range (default off).
    pub fn reduce_range(mut self, reduce_range: bool) -> Self {
        self.reduce_range = reduce_range;
        self
    }
    /// A custom `(quant_min, quant_max)` inside the dtype.
    pub fn range(mut self, quant_min: i32, quant_max: i32) -> Self {
        self.range = Some((quant_min, quant_max));
        self
    }
    /// The observer (default moving-average min/max, 0.01).
    pub fn observer(mut self, kind: ObserverKind) -> Self {
        self.kind = kind;
        self
    }
    /// Shorthand for a moving-average observer with this constant.
    pub fn averaging_constant(mut self, c: f32) -> Self {
        self.kind = ObserverKind::MovingAverageMinMax {
            averaging_constant: c,
        };
        self
    }
    /// The scale floor (default f32 epsilon).
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    /// A learnable (LSQ) scale and zero point.
    pub fn learnable(mut self, on: bool) -> Self {
        self.learnable = on.then(LearnableSpec::default);
        self
    }
    /// LSQ with explicit settings.
    pub fn learnable_with(mut self, spec: LearnableSpec) -> Self {
        self.learnable = Some(spec);
        self
    }

    /// Checks everything and returns the spec.
    pub fn build(self) -> Result<FakeQuantizeSpec> {
        let dtype = QDType::new(self.bits, self.signed)?;
        let qscheme = match (self.ch_axis.is_some(), self.symmetric) {
            (false, false) => QScheme::PerTensorAffine,
            (false, true) => QScheme::PerTensorSymmetric,
            (true, false) => QScheme::PerChannelAffine,
            (true, true) => QScheme::PerChannelSymmetric,
        };
        let mut config = ObserverConfig::new(dtype, qscheme)
            .with_reduce_range(self.reduce_range)
            .with_eps(self.eps)
            .with_ch_axis(self.ch_axis.unwrap_or(0));
        config.custom_range = self.range;
        if matches!(self.kind, ObserverKind::Histogram { .. }) && qscheme.is_per_channel() {
            return Err(Error::config(
                "the histogram observer is per tensor only",
                "use a min/max observer for per-channel qparams",
            ));
        }
        let spec = FakeQuantizeSpec {
            observer: ObserverSpec {
                kind: self.kind,
                config,
            },
            learnable: self.learnable,
        };
        spec.observer.build()?;
        Ok(spec)
    }
}
