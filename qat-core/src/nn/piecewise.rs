//! The activations MobileNet-class networks use: ReLU6, Hardswish, Hardsigmoid, LeakyReLU and
//! ELU, with PyTorch's eager QAT placement. Each computes its float function with PyTorch's
//! gradient (a branch's own derivative; at a kink, the side PyTorch takes), gets an output
//! fake-quant in `prepare_qat`, and converts to dequantize -> function -> quantize with the
//! qparams that fake-quant trained, so the int8 layer equals the fake-quant one code for code.
//!
//! - ReLU6, Hardswish, LeakyReLU, ELU: an output fake-quant from the activation qconfig (they
//!   are in PyTorch's static module mappings, so eager `prepare_qat` observes their output).
//! - Hardsigmoid: PyTorch's fixed qparams (scale 1/256, zero point 0, codes 0..=255,
//!   `default_fixed_qparams_range_0to1_fake_quant`), as Sigmoid.
//!
//! One difference from PyTorch, on purpose: PyTorch's converted `nnq.ReLU6` ignores the
//! fake-quant its QAT model trained and keeps its input's qparams (clamping codes at q(6)),
//! so its int8 model leaves the grid its fake-quant model saw; ours requantizes to the
//! trained output qparams. None of these is fused into a preceding conv: PyTorch's fusion
//! table has no (Conv, BN, ReLU6) or (Conv, Hardswish) (torchvision's quantizable MobileNetV2
//! swaps ReLU6 for ReLU to fuse), and neither has ours.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::qconfig::{FakeQuantizeSpec, QConfig};
use crate::record::FloatOp;

/// `where(x < lo, below, where(x > hi, above, mid))`, elementwise, gradients flowing through
/// the branch each element takes.
fn select3(
    x: &Tensor,
    lo: f64,
    hi: f64,
    below: &Tensor,
    mid: &Tensor,
    above: &Tensor,
) -> Result<Tensor> {
    let upper = x.gt(hi)?.where_cond(above, mid)?;
    Ok(x.lt(lo)?.where_cond(below, &upper)?)
}

/// min(max(x, 0), 6); gradient 1 strictly inside (0, 6), as PyTorch's hardtanh.
pub(crate) fn relu6(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let six = (&zero + 6.0)?;
    // Ends included in the constant branches: the gradient is 0 at x = 0 and x = 6.
    let upper = x.ge(6.0)?.where_cond(&six, x)?;
    Ok(x.le(0.0)?.where_cond(&zero, &upper)?)
}

/// x * min(max(x + 3, 0), 6) / 6; gradient 0 below -3, x / 3 + 0.5 on [-3, 3], 1 above.
pub(crate) fn hardswish(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    // A true division by 6, as PyTorch's kernel (candle's `/ 6.0` multiplies by 1/6).
    let mid = ((x * (x + 3.0)?)? / (&zero + 6.0)?)?;
    select3(x, -3.0, 3.0, &zero, &mid, x)
}

/// min(max(x + 3, 0), 6) / 6; gradient 1/6 strictly inside (-3, 3).
pub(crate) fn hardsigmoid(x: &Tensor) -> Result<Tensor> {
    let zero = x.zeros_like()?;
    let one = (&zero + 1.0)?;
    let mid = ((x + 3.0)? / (&zero + 6.0)?)?;
    let upper = x.ge(3.0)?.where_cond(&one, &mid)?;
    Ok(x.le(-3.0)?.where_cond(&zero, &upper)?)
}

/// x for x > 0, else `slope * x`.
pub(crate) fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    Ok(x.gt(0.0)?.where_cond(x, &(x * slope)?)?)
}

/// x for x > 0, else `alpha * (exp(x) - 1)`.
pub(crate) fn elu(x: &Tensor, alpha: f64) -> Result<Tensor> {
    let neg = ((x.exp()? - 1.0)? * alpha)?;
    Ok(x.gt(0.0)?.where_cond(x, &neg)?)
}

macro_rules! piecewise {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, Default)]
        pub struct $name {
            pub(crate) common: Common,
        }

        impl $name {
            /// A new layer.
            pub fn new() -> Self {
                Self::default()
            }
        }
    };
}

piecewise!(
    ReLU6,
    "min(max(x, 0), 6) (PyTorch's `nn.ReLU6`); prepared with an output fake-quant from the \
     activation qconfig, converted as dequantize, ReLU6, quantize."
);
piecewise!(
    Hardswish,
    "x * ReLU6(x + 3) / 6 (PyTorch's `nn.Hardswish`, MobileNetV3); prepared with an output \
     fake-quant from the activation qconfig, converted as PyTorch's quantized Hardswish \
     (dequantize, Hardswish, quantize)."
);
piecewise!(
    Hardsigmoid,
    "ReLU6(x + 3) / 6 (PyTorch's `nn.Hardsigmoid`, MobileNetV3's squeeze-excite gate); prepared \
     with fixed qparams (1/256, 0, codes 0..=255), as PyTorch."
);

/// x for x > 0, else `negative_slope * x` (PyTorch's `nn.LeakyReLU`); prepared with an output
/// fake-quant from the activation qconfig, converted as dequantize, LeakyReLU, quantize.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::LeakyReLU;
/// let y = LeakyReLU::new(0.5)?.forward(&Tensor::new(&[-2f32, 3.0], &Device::Cpu)?)?;
/// assert_eq!(y.to_vec1::<f32>()?, vec![-1.0, 3.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct LeakyReLU {
    negative_slope: f64,
    pub(crate) common: Common,
}

impl Default for LeakyReLU {
    /// PyTorch's default slope, 0.01.
    fn default() -> Self {
        LeakyReLU {
            negative_slope: 0.01,
            common: Common::default(),
        }
    }
}

/// ELU: x for x > 0, else `alpha * (exp(x) - 1)` (PyTorch's `nn.ELU`); prepared with an
/// output fake-quant from the activation qconfig, converted as PyTorch's quantized ELU
/// (dequantize, ELU, quantize).
#[derive(Clone, Debug)]
pub struct ELU {
    alpha: f64,
    pub(crate) common: Common,
}

impl Default for ELU {
    /// PyTorch's default alpha, 1.0.
    fn default() -> Self {
        ELU {
            alpha: 1.0,
            common: Common::default(),
        }
    }
}

fn finite(what: &str, name: &str, v: f64) -> Result<()> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Error::config(
            format!("{what} with {name} {v}"),
            format!("give {what} a finite {name}"),
        ))
    }
}

impl LeakyReLU {
    /// A LeakyReLU with `negative_slope` (finite).
    pub fn new(negative_slope: f64) -> Result<Self> {
        finite("LeakyReLU", "negative_slope", negative_slope)?;
        Ok(LeakyReLU {
            negative_slope,
            common: Common::default(),
        })
    }
    /// Its slope for x <= 0.
    pub fn negative_slope(&self) -> f64 {
        self.negative_slope
    }
}

impl ELU {
    /// An ELU with `alpha` (finite).
    pub fn new(alpha: f64) -> Result<Self> {
        finite("ELU", "alpha", alpha)?;
        Ok(ELU {
            alpha,
            common: Common::default(),
        })
    }
    /// Its alpha.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
}

/// The forward every layer here shares: converted, dequantize -> `f` -> quantize; otherwise
/// `f` on floats, then the output fake-quant (prepared).
fn forward_with(
    common: &Common,
    x: &Tensor,
    what: &str,
    op: impl Fn() -> FloatOp,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if common.converted_io().is_some() {
        return common.converted_float_op(&[x], what, &op, |v| f(&v[0]));
    }
    common.check_input(x, what)?;
    common.note_inputs(&[x])?;
    let y = f(x)?;
    common.trace_float(&[x], &y, op);
    common.finish(y)
}

macro_rules! piecewise_impl {
    ($name:ident, |$s:ident| $op:expr, |$x:ident| $f:expr, $output:expr) => {
        impl $name {
            fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
                let $s = self;
                forward_with(&self.common, x, stringify!($name), || $op, |$x| $f)
            }
            fn stage_convert_with(&self) -> Result<crate::model::Staged> {
                self.common.stage_convert(stringify!($name), true)
            }
            fn prepare_with(&mut self, qconfig: Option<&QConfig>, _observed: bool) -> Result<()> {
                let output: fn(&QConfig) -> FakeQuantizeSpec = $output;
                self.common
                    .prepare_with(qconfig, |qc| Some(output(qc)), |_| Ok(()))
            }
        }
        simple_module!($name, observed: true, scheme: Float);
    };
}

piecewise_impl!(ReLU6, |_s| FloatOp::Relu6, |x| relu6(x), |qc| qc.activation);
piecewise_impl!(Hardswish, |_s| FloatOp::Hardswish, |x| hardswish(x), |qc| {
    qc.activation
});
piecewise_impl!(
    Hardsigmoid,
    |_s| FloatOp::Hardsigmoid,
    |x| hardsigmoid(x),
    |_| FakeQuantizeSpec::fixed_sigmoid()
);
piecewise_impl!(
    LeakyReLU,
    |s| FloatOp::LeakyRelu(s.negative_slope),
    |x| leaky_relu(x, s.negative_slope),
    |qc| qc.activation
);
piecewise_impl!(ELU, |s| FloatOp::Elu(s.alpha), |x| elu(x, s.alpha), |qc| qc
    .activation);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values_and_grads(f: impl Fn(&Tensor) -> Result<Tensor>, xs: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let x = Var::new(xs, &Device::Cpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        (
            y.to_vec1().unwrap(),
            g.get(x.as_tensor()).unwrap().to_vec1().unwrap(),
        )
    }

    const XS: [f32; 9] = [-4.0, -3.0, -1.5, 0.0, 0.5, 3.0, 5.0, 6.0, 7.0];

    #[test]
    fn relu6_values_and_pytorch_gradients() {
        let (y, g) = values_and_grads(relu6, &XS);
        assert_eq!(y, [0.0, 0.0, 0.0, 0.0, 0.5, 3.0, 5.0, 6.0, 6.0]);
        // hardtanh's backward: 1 strictly between the bounds.
        assert_eq!(g, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn hardswish_values_and_pytorch_gradients() {
        let (y, g) = values_and_grads(hardswish, &XS);
        let want: Vec<f32> = XS
            .iter()
            .map(|&x| x * (x + 3.0).clamp(0.0, 6.0) / 6.0)
            .collect();
        for (a, b) in y.iter().zip(&want) {
            assert_eq!(a, b); // -0.0 == 0.0
        }
        // hardswish_backward: 0 below -3, x/3 + 0.5 on [-3, 3], 1 above.
        let gw: Vec<f32> = XS
            .iter()
            .map(|&x| {
                if x < -3.0 {
                    0.0
                } else if x <= 3.0 {
                    x / 3.0 + 0.5
                } else {
                    1.0
                }
            })
            .collect();
        for (a, b) in g.iter().zip(&gw) {
            assert!((a - b).abs() <= 1e-6, "{g:?} vs {gw:?}");
        }
    }

    #[test]
    fn hardsigmoid_values_and_pytorch_gradients() {
        let (y, g) = values_and_grads(hardsigmoid, &XS);
        let want: Vec<f32> = XS
            .iter()
            .map(|&x| (x + 3.0).clamp(0.0, 6.0) / 6.0)
            .collect();
        assert_eq!(y, want);
        let gw: Vec<f32> = XS
            .iter()
            .map(|&x| if x > -3.0 && x < 3.0 { 1.0 / 6.0 } else { 0.0 })
            .collect();
        for (a, b) in g.iter().zip(&gw) {
            assert!((a - b).abs() <= 1e-7, "{g:?} vs {gw:?}");
        }
    }

    #[test]
    fn leaky_relu_and_elu_values_and_gradients() {
        let (y, g) = values_and_grads(|x| leaky_relu(x, 0.1), &XS);
        assert_eq!(y[0], -0.4f32);
        assert_eq!(y[3], 0.0);
        assert_eq!(y[4], 0.5);
        assert_eq!(g[..4], [0.1f32; 4]);
        assert_eq!(g[4..], [1.0f32; 5]);
        let (y, g) = values_and_grads(|x| elu(x, 2.0), &XS);
        assert!((y[0] - 2.0 * ((-4f32).exp() - 1.0)).abs() < 1e-6);
        assert_eq!(y[3], 0.0);
        assert_eq!(y[5], 3.0);
        assert!((g[0] - 2.0 * (-4f32).exp()).abs() < 1e-6);
        assert!((g[3] - 2.0).abs() < 1e-6); // x = 0 takes the exp branch, as PyTorch
        assert_eq!(g[8], 1.0);
    }

    #[test]
    fn non_finite_parameters_are_errors() {
        assert!(LeakyReLU::new(f64::NAN).is_err());
        assert!(ELU::new(f64::INFINITY).is_err());
        assert_eq!(LeakyReLU::default().negative_slope(), 0.01);
        assert_eq!(ELU::default().alpha(), 1.0);
    }
}
