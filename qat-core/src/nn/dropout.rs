//! Dropout: random zeroing in training, the identity otherwise. Quantization-transparent: its
//! output keeps its input's qparams, and converted it passes codes through.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::qconfig::QConfig;
use crate::record::{FloatOp, Op};

/// PyTorch's `nn.Dropout(p)`: in training, zeroes each element with probability `p` and
/// scales the rest by `1 / (1 - p)` (candle-nn's `dropout`); the identity in eval mode, with
/// `p = 0`, and once converted.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::Dropout;
/// assert!(Dropout::new(1.0).is_err());
/// let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let y = Dropout::new(0.0)?.forward(&x)?;
/// assert_eq!(y.to_vec1::<f32>()?, vec![1.0, 2.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f32,
    pub(crate) common: Common,
}

impl Dropout {
    /// A dropout of probability `p`, which must lie in `[0, 1)`.
    pub fn new(p: f32) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(
                format!("Dropout with probability {p}"),
                "use a probability p with 0 <= p < 1 (0 disables it)",
            ));
        }
        Ok(Dropout {
            p,
            common: Common::default(),
        })
    }

    /// The probability of zeroing an element in training.
    pub fn p(&self) -> f32 {
        self.p
    }

    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            self.common.check_input(x, "Dropout")?;
            let y = x.clone();
            self.common
                .trace(&[x], &y, || Op::OnCodes(FloatOp::Identity));
            return Ok(y);
        }
        self.common.check_input(x, "Dropout")?;
        let y = if self.common.training && self.p > 0.0 {
            candle_nn::ops::dropout(x, self.p)?
        } else {
            x.clone()
        };
        self.common.pass_through(x, &y)?;
        self.common.trace_float(&[x], &y, || FloatOp::Identity);
        Ok(y)
    }

    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }

    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Dropout", false)
    }
}

simple_module!(Dropout, observed: false, scheme: Float);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::QuantModule;
    use candle_core::{DType, Device, Module};

    #[test]
    fn training_drops_and_eval_passes_through_with_gradient() {
        let x = candle_core::Var::from_tensor(
            &Tensor::ones((32, 32), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let mut d = Dropout::new(0.5).unwrap();
        d.set_training(true);
        let y = d.forward(&x).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|&a| a == 0.0 || a == 2.0));
        assert!(v.contains(&0.0) && v.contains(&2.0));
        // The gradient flows through the kept elements only.
        let g = y.sum_all().unwrap().backward().unwrap();
        let g = g
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g, v);
        d.set_training(false);
        let y = d.forward(&x).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), x.to_vec2::<f32>().unwrap());
        // Codes are refused outside a converted model.
        let codes = Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap();
        assert!(d.forward(&codes).is_err());
    }
}
