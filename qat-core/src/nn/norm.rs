//! RmsNorm and LayerNorm over the last dim (float layers with an output fake-quant under an
//! eager qconfig, as PyTorch observes its quantized LayerNorm; converted: dequantize, the
//! float op, quantize with the output qparams).

use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::model::params::check_float_params;
use crate::qconfig::QConfig;
use crate::record::FloatOp;

fn check_eps(layer: &str, eps: f64) -> Result<()> {
    if !eps.is_finite() || eps < 0.0 {
        return Err(Error::config(
            format!("{layer} with eps {eps}"),
            "use a finite eps >= 0 (1e-5 as PyTorch, 1e-6 as Llama)",
        ));
    }
    Ok(())
}

fn check_dim(layer: &str, dim: usize) -> Result<()> {
    if dim == 0 {
        return Err(Error::config(
            format!("{layer} over 0 features"),
            "normalise a non-empty last dim (dim >= 1)",
        ));
    }
    Ok(())
}

/// Checks that `x`'s last dim has `dim` features.
fn check_last(layer: &str, x: &Tensor, dim: usize) -> Result<()> {
    if x.dims().last() != Some(&dim) {
        return Err(Error::tensor(
            format!(
                "{layer} normalises {dim} features but got an input of shape {:?}",
                x.dims()
            ),
            "feed (..., dim) tensors whose last dim equals the layer's dim",
        ));
    }
    Ok(())
}

/// Reads a parameter for the ONNX exporter (empty if unreadable; the exporter reports it).
fn read(t: &Tensor) -> Vec<f32> {
    t.detach()
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap_or_default()
}

/// `t` with the dtype and device of `like`.
fn like(t: Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
}

/// `x * rsqrt(mean(x^2, -1) + eps) * weight` over the last dim, as candle's and
/// candle-transformers' (Llama's) RmsNorm; parameter `weight` (initialised to 1).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarBuilder;
/// use qat_core::nn::RmsNorm;
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let norm = RmsNorm::new(4, 1e-6, vb.pp("norm"))?;
/// let y = norm.forward(&Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[2, 3, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    pub(crate) common: Common,
}

impl RmsNorm {
    /// Loads or initialises (weight 1) a RmsNorm over `dim` features.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        check_dim("RmsNorm", dim)?;
        check_eps("RmsNorm", eps)?;
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        Ok(RmsNorm {
            weight,
            eps,
            common: Common::default(),
        })
    }

    /// The scale `weight`, shape `(dim,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The epsilon added to the mean square.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::kernels::norm::rms_norm(
            x,
            &self.weight,
            self.eps as f32,
        )?)
    }

    fn op(&self) -> FloatOp {
        FloatOp::RmsNorm {
            weight: read(&self.weight),
            eps: self.eps,
        }
    }

    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        norm_forward(
            "RmsNorm",
            &self.common,
            &self.weight,
            x,
            || self.op(),
            |x| self.compute(x),
        )
    }

    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }

    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("RmsNorm", true)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone())]
    }

    fn load_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
        check_float_params(&self.params(), &params)?;
        for (_, t) in params {
            self.weight = like(t, &self.weight)?;
        }
        Ok(())
    }
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dim with the biased variance,
/// as PyTorch's `nn.LayerNorm(dim)`; parameters `weight` (1) and `bias` (0).
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarBuilder;
/// use qat_core::nn::LayerNorm;
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let norm = LayerNorm::new(4, 1e-5, vb.pp("ln"))?;
/// let y = norm.forward(&Tensor::ones((3, 4), DType::F32, &Device::Cpu)?)?;
/// assert_eq!(y.dims(), &[3, 4]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    pub(crate) common: Common,
}

impl LayerNorm {
    /// Loads or initialises (weight 1, bias 0) a LayerNorm over `dim` features.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        check_dim("LayerNorm", dim)?;
        check_eps("LayerNorm", eps)?;
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(LayerNorm {
            weight,
            bias,
            eps,
            common: Common::default(),
        })
    }

    /// The scale `weight`, shape `(dim,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift `bias`, shape `(dim,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::kernels::norm::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }

    fn op(&self) -> FloatOp {
        FloatOp::LayerNorm {
            weight: read(&self.weight),
            bias: read(&self.bias),
            eps: self.eps,
        }
    }

    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        norm_forward(
            "LayerNorm",
            &self.common,
            &self.weight,
            x,
            || self.op(),
            |x| self.compute(x),
        )
    }

    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }

    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("LayerNorm", true)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone()), ("bias", self.bias.clone())]
    }

    fn load_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
        check_float_params(&self.params(), &params)?;
        let (mut weight, mut bias) = (self.weight.clone(), self.bias.clone());
        for (name, t) in params {
            if name == "weight" {
                weight = like(t, &self.weight)?;
            } else {
                bias = like(t, &self.bias)?;
            }
        }
        self.weight = weight;
        self.bias = bias;
        Ok(())
    }
}

/// The forward both norms share: shape and stage checks, then the float op (on dequantized
/// codes once converted, else with provenance, trace and output fake-quant).
fn norm_forward(
    name: &str,
    common: &Common,
    weight: &Tensor,
    x: &Tensor,
    op: impl Fn() -> FloatOp,
    compute: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    check_last(name, x, weight.elem_count())?;
    if common.converted_io().is_some() {
        return common.converted_float_op(&[x], name, &op, |v| compute(&v[0]));
    }
    common.check_input(x, name)?;
    super::input::check_dtype(name, x, weight.dtype())?;
    common.note_inputs(&[x])?;
    let y = compute(x)?;
    common.trace_float(&[x], &y, &op);
    common.finish(y)
}

simple_module!(RmsNorm, observed: true, params: params, load_params, scheme: Float);
simple_module!(LayerNorm, observed: true, params: params, load_params, scheme: Float);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::QuantModule;
    use candle_core::{DType, Device, Module};
    use candle_nn::VarMap;

    fn vb(vm: &VarMap) -> VarBuilder<'_> {
        VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu)
    }

    #[test]
    fn settings_and_shapes_are_checked() {
        let vm = VarMap::new();
        for eps in [-1e-5, f64::NAN, f64::INFINITY] {
            let e = RmsNorm::new(4, eps, vb(&vm)).unwrap_err().to_string();
            assert!(e.contains("eps"), "{e}");
            assert!(LayerNorm::new(4, eps, vb(&vm)).is_err());
        }
        assert!(RmsNorm::new(0, 1e-5, vb(&vm)).is_err());
        assert!(LayerNorm::new(0, 1e-5, vb(&vm)).is_err());
        let n = RmsNorm::new(4, 1e-5, vb(&vm).pp("n")).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        let e = n.forward(&x).unwrap_err().to_string();
        assert!(e.contains("4 features") && e.contains("[2, 5]"), "{e}");
        let l = LayerNorm::new(4, 1e-5, vb(&vm).pp("l")).unwrap();
        assert!(l.forward(&x).is_err());
        // Initialised as PyTorch: weight 1, bias 0.
        assert_eq!(n.weight().to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert_eq!(l.bias().to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        assert_eq!((n.eps(), l.eps()), (1e-5, 1e-5));
    }

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let vm = VarMap::new();
        let n = RmsNorm::new(3, 0.0, vb(&vm)).unwrap();
        let x = Tensor::new(&[[-2f32, -2.0, -2.0]], &Device::Cpu).unwrap();
        assert_eq!(
            n.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![-1.0; 3]]
        );
    }

    #[test]
    fn float_params_load_only_the_same_names_and_shapes() {
        let vm = VarMap::new();
        let mut l = LayerNorm::new(3, 1e-5, vb(&vm)).unwrap();
        let names: Vec<&str> = l.float_params().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["weight", "bias"]);
        let t = |v: f32, n: usize| Tensor::full(v, n, &Device::Cpu).unwrap();
        let e = l
            .load_float_params(vec![
                ("weight".into(), t(2.0, 3)),
                ("bias".into(), t(1.0, 4)),
            ])
            .unwrap_err()
            .to_string();
        assert!(e.contains("shape"), "{e}");
        // Nothing changed.
        assert_eq!(l.weight().to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        l.load_float_params(vec![
            ("bias".into(), t(1.0, 3)),
            ("weight".into(), t(2.0, 3)),
        ])
        .unwrap();
        assert_eq!(l.weight().to_vec1::<f32>().unwrap(), vec![2.0; 3]);
        assert_eq!(l.bias().to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        let mut r = RmsNorm::new(3, 1e-5, vb(&vm).pp("r")).unwrap();
        assert!(r
            .load_float_params(vec![("bias".into(), t(1.0, 3))])
            .is_err());
        r.load_float_params(vec![("weight".into(), t(0.5, 3))])
            .unwrap();
        assert_eq!(r.weight().to_vec1::<f32>().unwrap(), vec![0.5; 3]);
    }
}
