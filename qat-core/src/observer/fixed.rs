//! Fixed qparams for activations with a known output range (sigmoid, tanh).

use candle_core::Tensor;

use super::{Observer, ObserverState};
use crate::error::{Error, Result};
use crate::qparams::{check_scale, QDType, QParams, QScheme, QuantRange};

/// Returns the same scale and zero point whatever it sees: PyTorch's FixedQParamsObserver.
///
/// ```
/// use qat_core::observer::{FixedQParamsObserver, Observer};
/// use qat_core::QParams;
/// let obs = FixedQParamsObserver::sigmoid();
/// assert_eq!(obs.calculate_qparams()?, QParams::PerTensor { scale: 1.0 / 256.0, zero_point: 0 });
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct FixedQParamsObserver {
    scale: f32,
    zero_point: i32,
    range: QuantRange,
}

impl FixedQParamsObserver {
    /// Fixed `scale` and `zero_point` over `range`.
    pub fn new(scale: f32, zero_point: i32, range: QuantRange) -> Result<Self> {
        check_scale(scale)?;
        range.check_zero_point(zero_point)?;
        Ok(FixedQParamsObserver {
            scale,
            zero_point,
            range,
        })
    }

    /// Outputs in [0, 1] (sigmoid): scale 1/256, zero point 0, quint8 0..=255.
    pub fn sigmoid() -> Self {
        Self::quint8(1.0 / 256.0, 0)
    }

    /// Outputs in [-1, 1] (tanh): scale 2/256, zero point 128, quint8 0..=255.
    pub fn tanh() -> Self {
        Self::quint8(2.0 / 256.0, 128)
    }

    fn quint8(scale: f32, zero_point: i32) -> Self {
        FixedQParamsObserver {
            scale,
            zero_point,
            range: QuantRange::full(QDType::QUINT8),
        }
    }
}

impl Observer for FixedQParamsObserver {
    fn name(&self) -> &'static str {
        "FixedQParamsObserver"
    }

    fn observe(&mut self, _x: &Tensor) -> Result<()> {
        Ok(())
    }

    fn calculate_qparams(&self) -> Result<QParams> {
        Ok(QParams::PerTensor {
            scale: self.scale,
            zero_point: self.zero_point,
        })
    }

    fn quant_range(&self) -> QuantRange {
        self.range
    }

    fn qscheme(&self) -> QScheme {
        QScheme::PerTensorAffine
    }

    fn ch_axis(&self) -> Option<usize> {
        None
    }

    fn min_max(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        None
    }

    fn state(&self) -> ObserverState {
        ObserverState::default()
    }

    fn load_state(&mut self, state: &ObserverState) -> Result<()> {
        if state != &ObserverState::default() {
            return Err(Error::state(
                "a FixedQParamsObserver keeps no statistics, but the state holds some",
                "load a state saved from a FixedQParamsObserver",
            ));
        }
        Ok(())
    }

    fn reset(&mut self) {}

    fn box_clone(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }
}
