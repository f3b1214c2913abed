//! Observers: they watch tensors go by and turn what they saw into scale and zero point.
//!
//! All observers implement [`Observer`]. Their behaviour and arithmetic are PyTorch's
//! (`torch.ao.quantization.observer`): [`MinMaxObserver`] covers MinMax, MovingAverageMinMax,
//! PerChannelMinMax and MovingAveragePerChannelMinMax; [`HistogramObserver`] and
//! [`FixedQParamsObserver`] are their own kinds.

mod aminmax;
mod fixed;
mod histogram;
mod minmax;

pub use fixed::FixedQParamsObserver;
pub use histogram::HistogramObserver;
pub use minmax::MinMaxObserver;

pub(crate) use aminmax::{channel_min_max, tensor_min_max};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::qparams::{QDType, QParams, QScheme, QuantRange};

/// What an observer needs to know about the quantization it serves: PyTorch's
/// `UniformQuantizationObserverBase` arguments.
///
/// ```
/// use qat_core::observer::ObserverConfig;
/// use qat_core::{QDType, QScheme};
/// let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric).with_ch_axis(0);
/// let range = cfg.quant_range()?;
/// assert_eq!((range.quant_min(), range.quant_max()), (-128, 127));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ObserverConfig {
    /// Integer type of the codes.
    pub dtype: QDType,
    /// Affine or symmetric, per tensor or per channel.
    pub qscheme: QScheme,
    /// Halve the range (PyTorch's `reduce_range`, for kernels whose accumulation would
    /// overflow with full-range activations).
    pub reduce_range: bool,
    /// A custom `(quant_min, quant_max)`, PyTorch's `quant_min`/`quant_max` arguments.
    pub custom_range: Option<(i32, i32)>,
    /// Lower bound of the scale, PyTorch's `eps` (f32 machine epsilon by default).
    pub eps: f32,
    /// Channel axis of per-channel schemes.
    pub ch_axis: usize,
}

impl ObserverConfig {
    /// A config with PyTorch's defaults: no reduce_range, the dtype's full range,
    /// `eps = f32::EPSILON`, `ch_axis = 0`.
    pub fn new(dtype: QDType, qscheme: QScheme) -> Self {
        ObserverConfig {
            dtype,
            qscheme,
            reduce_range: false,
            custom_range: None,
            eps: f32::EPSILON,
            ch_axis: 0,
        }
    }

    /// Sets `reduce_range`.
    pub fn with_reduce_range(mut self, reduce_range: bool) -> Self {
        self.reduce_range = reduce_range;
        self
    }

    /// Sets a custom `(quant_min, quant_max)`.
    pub fn with_range(mut self, quant_min: i32, quant_max: i32) -> Self {
        self.custom_range = Some((quant_min, quant_max));
        self
    }

    /// Sets the scale floor.
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the channel axis of a per-channel scheme.
    pub fn with_ch_axis(mut self, ch_axis: usize) -> Self {
        self.ch_axis = ch_axis;
        self
    }

    /// The effective range, with every check PyTorch makes when it builds an observer.
    pub fn quant_range(&self) -> Result<QuantRange> {
        if self.qscheme.is_symmetric()
            && self.reduce_range
            && !self.dtype.is_signed()
            && self.custom_range.is_none()
            && self.dtype.bits() == 8
        {
            return Err(Error::config(
                "reduce_range cannot be used with symmetric quantization to quint8",
                "use qint8 for symmetric quantization, or an affine scheme",
            ));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::config(
                format!("eps {} is not a finite positive number", self.eps),
                "use a small positive eps such as f32::EPSILON",
            ));
        }
        QuantRange::new(self.dtype, self.custom_range, self.reduce_range)
    }
}

/// The saved state of an observer: running min/max (empty before the first observation) and,
/// for the histogram observer, its bins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObserverState {
    /// Running minima (one per tensor or per channel).
    pub min_val: Vec<f32>,
    /// Running maxima.
    pub max_val: Vec<f32>,
    /// Histogram bins (histogram observer only).
    pub histogram: Vec<f32>,
}

/// An observer records statistics of the tensors it sees and computes qparams from them.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::observer::{MinMaxObserver, Observer, ObserverConfig};
/// use qat_core::{QDType, QParams, QScheme};
/// let mut obs = MinMaxObserver::moving_average(
///     ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine), 0.01)?;
/// obs.observe(&Tensor::new(&[-1.0f32, 0.5, 3.0], &Device::Cpu)?)?;
/// let QParams::PerTensor { scale, zero_point } = obs.calculate_qparams()? else { unreachable!() };
/// assert_eq!((scale, zero_point), (4.0 / 255.0, 64));
/// # Ok::<(), qat_core::Error>(())
/// ```
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// PyTorch's class name of this observer (used in messages and summaries).
    fn name(&self) -> &'static str;
    /// Records `x`. Empty tensors change nothing; NaN or infinite values are an error and
    /// leave the state unchanged.
    fn observe(&mut self, x: &Tensor) -> Result<()>;
    /// Scale and zero point from what was observed; `(1.0, 0)` before anything was.
    fn calculate_qparams(&self) -> Result<QParams>;
    /// The effective code range.
    fn quant_range(&self) -> QuantRange;
    /// The quantization scheme.
    fn qscheme(&self) -> QScheme;
    /// The channel axis of a per-channel observer.
    fn ch_axis(&self) -> Option<usize>;
    /// Running min/max, `None` before the first observation.
    fn min_max(&self) -> Option<(Vec<f32>, Vec<f32>)>;
    /// A copy of the state, to save.
    fn state(&self) -> ObserverState;
    /// Restores a saved state.
    fn load_state(&mut self, state: &ObserverState) -> Result<()>;
    /// Forgets everything observed.
    fn reset(&mut self);
    /// A boxed copy.
    fn box_clone(&self) -> Box<dyn Observer>;
}

impl Clone for Box<dyn Observer> {
    fn clone(&self) -> Self {
        self.box_clone()
    }
}
