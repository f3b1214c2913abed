//! Running min/max observers: PyTorch's MinMaxObserver, MovingAverageMinMaxObserver,
//! PerChannelMinMaxObserver and MovingAveragePerChannelMinMaxObserver in one type.

use candle_core::Tensor;

use super::{channel_min_max, tensor_min_max, Observer, ObserverConfig, ObserverState};
use crate::error::{Error, Result};
use crate::qparams::{calculate_qparams, QParams, QScheme, QuantRange};

/// Tracks the running minimum and maximum of what it sees, over the whole tensor or per
/// channel (decided by the config's scheme), either as extremes (`new`) or as a moving
/// average (`moving_average`: the first batch is taken as is, then
/// `v = v + c * (current - v)` in f32, like PyTorch).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::observer::{MinMaxObserver, Observer, ObserverConfig};
/// use qat_core::{QDType, QScheme};
/// let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric).with_ch_axis(0);
/// let mut obs = MinMaxObserver::new(cfg)?;
/// obs.observe(&Tensor::new(&[[1.0f32, -2.0], [0.5, 0.25]], &Device::Cpu)?)?;
/// assert_eq!(obs.min_max(), Some((vec![-2.0, 0.25], vec![1.0, 0.5])));
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct MinMaxObserver {
    config: ObserverConfig,
    range: QuantRange,
    averaging_constant: Option<f32>,
    min_val: Vec<f32>,
    max_val: Vec<f32>,
}

impl MinMaxObserver {
    /// Running extremes (MinMaxObserver / PerChannelMinMaxObserver).
    pub fn new(config: ObserverConfig) -> Result<Self> {
        Ok(MinMaxObserver {
            range: config.quant_range()?,
            config,
            averaging_constant: None,
            min_val: Vec::new(),
            max_val: Vec::new(),
        })
    }

    /// Moving averages with constant `c` (MovingAverageMinMaxObserver /
    /// MovingAveragePerChannelMinMaxObserver; PyTorch's default is 0.01).
    pub fn moving_average(config: ObserverConfig, averaging_constant: f32) -> Result<Self> {
        if !(averaging_constant > 0.0 && averaging_constant <= 1.0) {
            return Err(Error::config(
                format!("averaging constant {averaging_constant} is outside (0, 1]"),
                "use a constant in (0, 1]; PyTorch's default is 0.01",
            ));
        }
        let mut obs = Self::new(config)?;
        obs.averaging_constant = Some(averaging_constant);
        Ok(obs)
    }

    /// The averaging constant of a moving-average observer.
    pub fn averaging_constant(&self) -> Option<f32> {
        self.averaging_constant
    }

    fn per_channel(&self) -> bool {
        self.config.qscheme.is_per_channel()
    }

    fn update(&mut self, mn: Vec<f32>, mx: Vec<f32>) -> Result<()> {
        if self.min_val.is_empty() {
            self.min_val = mn;
            self.max_val = mx;
            return Ok(());
        }
        if mn.len() != self.min_val.len() {
            return Err(Error::ObserverInput {
                observer: self.name(),
                what: format!(
                    "the input has {} channels along axis {}, earlier inputs had {}",
                    mn.len(),
                    self.config.ch_axis,
                    self.min_val.len()
                ),
                fix: "feed tensors with the same channel count, or reset the observer".into(),
            });
        }
        let olds = self.min_val.iter_mut().zip(self.max_val.iter_mut());
        match self.averaging_constant {
            Some(c) => {
                for ((lo, hi), (cur_lo, cur_hi)) in olds.zip(mn.into_iter().zip(mx)) {
                    *lo += c * (cur_lo - *lo);
                    *hi += c * (cur_hi - *hi);
                }
            }
            None => {
                for ((lo, hi), (cur_lo, cur_hi)) in olds.zip(mn.into_iter().zip(mx)) {
                    *lo = lo.min(cur_lo);
                    *hi = hi.max(cur_hi);
                }
            }
        }
        Ok(())
    }
}

impl Observer for MinMaxObserver {
    fn name(&self) -> &'static str {
        match (self.per_channel(), self.averaging_constant.is_some()) {
            (false, false) => "MinMaxObserver",
            (false, true) => "MovingAverageMinMaxObserver",
            (true, false) => "PerChannelMinMaxObserver",
            (true, true) => "MovingAveragePerChannelMinMaxObserver",
        }
    }

    fn observe(&mut self, x: &Tensor) -> Result<()> {
        if x.elem_count() == 0 {
            return Ok(());
        }
        let (mn, mx) = if self.per_channel() {
            channel_min_max(x, self.config.ch_axis, self.name())?
        } else {
            let (mn, mx) = tensor_min_max(x, self.name())?;
            (vec![mn], vec![mx])
        };
        self.update(mn, mx)
    }

    fn calculate_qparams(&self) -> Result<QParams> {
        calculate_qparams(
            &self.min_val,
            &self.max_val,
            self.config.qscheme,
            &self.range,
            self.config.eps,
            Some(self.config.ch_axis),
        )
    }

    fn quant_range(&self) -> QuantRange {
        self.range
    }

    fn qscheme(&self) -> QScheme {
        self.config.qscheme
    }

    fn ch_axis(&self) -> Option<usize> {
        self.per_channel().then_some(self.config.ch_axis)
    }

    fn min_max(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        (!self.min_val.is_empty()).then(|| (self.min_val.clone(), self.max_val.clone()))
    }

    fn state(&self) -> ObserverState {
        ObserverState {
            min_val: self.min_val.clone(),
            max_val: self.max_val.clone(),
            histogram: Vec::new(),
        }
    }

    fn load_state(&mut self, state: &ObserverState) -> Result<()> {
        if state.min_val.len() != state.max_val.len()
            || (!self.per_channel() && state.min_val.len() > 1)
        {
            return Err(Error::state(
                format!(
                    "{} min values and {} max values for a {}",
                    state.min_val.len(),
                    state.max_val.len(),
                    self.name()
                ),
                "load a state saved from the same kind of observer",
            ));
        }
        self.min_val = state.min_val.clone();
        self.max_val = state.max_val.clone();
        Ok(())
    }

    fn reset(&mut self) {
        self.min_val.clear();
        self.max_val.clear();
    }

    fn box_clone(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qparams::QDType;
    use candle_core::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn moving_average_takes_first_batch_raw() {
        let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
        let mut o = MinMaxObserver::moving_average(cfg, 0.5).unwrap();
        o.observe(&t(&[-2.0, 4.0])).unwrap();
        assert_eq!(o.min_max(), Some((vec![-2.0], vec![4.0])));
        o.observe(&t(&[0.0, 2.0])).unwrap();
        assert_eq!(o.min_max(), Some((vec![-1.0], vec![3.0])));
    }

    #[test]
    fn nan_input_leaves_state_alone() {
        let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
        let mut o = MinMaxObserver::new(cfg).unwrap();
        o.observe(&t(&[1.0, 2.0])).unwrap();
        let err = o.observe(&t(&[f32::NAN])).unwrap_err();
        assert!(err.to_string().contains("MinMaxObserver"), "{err}");
        assert_eq!(o.min_max(), Some((vec![1.0], vec![2.0])));
    }

    #[test]
    fn empty_input_changes_nothing() {
        let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelAffine);
        let mut o = MinMaxObserver::new(cfg).unwrap();
        o.observe(&Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(o.min_max(), None);
        assert_eq!(
            o.calculate_qparams().unwrap(),
            QParams::PerTensor {
                scale: 1.0,
                zero_point: 0
            }
        );
    }

    #[test]
    fn integer_input_is_an_error() {
        let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
        let mut o = MinMaxObserver::new(cfg).unwrap();
        let x = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(matches!(o.observe(&x), Err(Error::ObserverInput { .. })));
    }

    #[test]
    fn channel_count_change_is_an_error() {
        let cfg = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric);
        let mut o = MinMaxObserver::new(cfg).unwrap();
        o.observe(&Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let e = o.observe(&Tensor::ones((3, 3), candle_core::DType::F32, &Device::Cpu).unwrap());
        assert!(e.is_err());
    }

    #[test]
    fn bad_averaging_constant() {
        let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
        assert!(MinMaxObserver::moving_average(cfg, 0.0).is_err());
        assert!(MinMaxObserver::moving_average(cfg, f32::NAN).is_err());
    }

    #[test]
    fn quint8_symmetric_reduce_range_is_rejected() {
        let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorSymmetric)
            .with_reduce_range(true);
        assert!(matches!(
            MinMaxObserver::new(cfg),
            Err(Error::Config { .. })
        ));
    }
}
