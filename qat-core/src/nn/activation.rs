//! ReLU, Sigmoid, Tanh, SiLU, GELU and Identity.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::Result;
use crate::qconfig::{FakeQuantizeSpec, QConfig};
use crate::record::{FloatOp, Op};

macro_rules! activation {
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

activation!(
    ReLU,
    "max(x, 0). Fusable after conv, linear or BatchNorm; a lone ReLU gets no observer (PyTorch's \
     eager mode keeps its input's qparams)."
);
activation!(
    Sigmoid,
    "1 / (1 + exp(-x)); prepared with fixed qparams (1/256, 0), as PyTorch."
);
activation!(
    Tanh,
    "tanh(x); prepared with fixed qparams (2/256, 128), as PyTorch."
);
activation!(
    SiLU,
    "x * sigmoid(x) (PyTorch's `nn.SiLU`, Llama's MLP gate); prepared with an output fake-quant \
     from the activation qconfig, converted as dequantize, SiLU, quantize."
);
activation!(
    Identity,
    "Returns its input. Fused groups turn their absorbed members into identities of this kind."
);

impl ReLU {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if let (Some(io), None) = (self.common.converted_io(), &self.common.absorbed) {
            // Codes: relu is max(q, zero point).
            self.common.check_input(x, "ReLU")?;
            let zp = io.inputs.first().map_or(0, |q| q.zero_point);
            let y = x.maximum(zp as f64)?;
            self.common.trace(&[x], &y, || Op::OnCodes(FloatOp::Relu));
            return Ok(y);
        }
        match &self.common.absorbed {
            Some(p) => self.common.placeholder_forward(p, x),
            None => {
                let y = crate::kernels::relu::relu(x)?;
                self.common.pass_through(x, &y)?;
                self.common.trace_float(&[x], &y, || FloatOp::Relu);
                Ok(y)
            }
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        let absorbed = self.common.absorbed.is_some();
        self.common.stage_convert("ReLU", !absorbed)
    }
}

fn prepare_fixed(
    common: &mut Common,
    qconfig: Option<&QConfig>,
    spec: FakeQuantizeSpec,
) -> Result<()> {
    common.prepare_with(qconfig, |_| Some(spec), |_| Ok(()))
}

impl Sigmoid {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "Sigmoid",
                || FloatOp::Sigmoid,
                |v| Ok(candle_nn::ops::sigmoid(&v[0])?),
            );
        }
        self.common.note_inputs(&[x])?;
        let y = candle_nn::ops::sigmoid(x)?;
        self.common.trace_float(&[x], &y, || FloatOp::Sigmoid);
        self.common.finish(y)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Sigmoid", true)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, _observed: bool) -> Result<()> {
        prepare_fixed(&mut self.common, qconfig, FakeQuantizeSpec::fixed_sigmoid())
    }
}

impl Tanh {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "Tanh",
                || FloatOp::Tanh,
                |v| Ok(v[0].tanh()?),
            );
        }
        self.common.note_inputs(&[x])?;
        let y = x.tanh()?;
        self.common.trace_float(&[x], &y, || FloatOp::Tanh);
        self.common.finish(y)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Tanh", true)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, _observed: bool) -> Result<()> {
        prepare_fixed(&mut self.common, qconfig, FakeQuantizeSpec::fixed_tanh())
    }
}

impl Identity {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        match &self.common.absorbed {
            Some(p) => self.common.placeholder_forward(p, x),
            None => {
                self.common.note_inputs(&[x])?;
                Ok(x.clone())
            }
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Identity", false)
    }
}

/// Which formula [`GELU`] computes (PyTorch's `approximate` argument).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Gelu {
    /// `x * Phi(x)` with the exact normal CDF through erf (PyTorch's `approximate='none'`,
    /// candle's `gelu_erf`).
    #[default]
    Erf,
    /// `0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))` (PyTorch's
    /// `approximate='tanh'`, candle's `gelu`).
    Tanh,
}

/// GELU (PyTorch's `nn.GELU`); prepared with an output fake-quant from the activation
/// qconfig, converted as dequantize, GELU, quantize.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::{Gelu, GELU};
/// let y = GELU::new(Gelu::Tanh).forward(&Tensor::new(&[0f32, 1.0], &Device::Cpu)?)?;
/// assert_eq!(y.to_vec1::<f32>()?[0], 0.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct GELU {
    approximate: Gelu,
    pub(crate) common: Common,
}

impl GELU {
    /// A GELU computing `approximate`'s formula.
    pub fn new(approximate: Gelu) -> Self {
        GELU {
            approximate,
            common: Common::default(),
        }
    }
    /// The formula it computes.
    pub fn approximate(&self) -> Gelu {
        self.approximate
    }
    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.approximate {
            Gelu::Erf => x.gelu_erf()?,
            Gelu::Tanh => x.gelu()?,
        })
    }
    fn op(&self) -> FloatOp {
        FloatOp::Gelu {
            tanh: self.approximate == Gelu::Tanh,
        }
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "GELU",
                || self.op(),
                |v| self.compute(&v[0]),
            );
        }
        self.common.check_input(x, "GELU")?;
        self.common.note_inputs(&[x])?;
        let y = self.compute(x)?;
        self.common.trace_float(&[x], &y, || self.op());
        self.common.finish(y)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("GELU", true)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

impl SiLU {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "SiLU",
                || FloatOp::Silu,
                |v| Ok(v[0].silu()?),
            );
        }
        self.common.check_input(x, "SiLU")?;
        self.common.note_inputs(&[x])?;
        // candle's values and gradients, with a one-pass backward on CPU f32.
        let y = crate::kernels::silu::silu(x)?;
        self.common.trace_float(&[x], &y, || FloatOp::Silu);
        self.common.finish(y)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("SiLU", true)
    }

    /// `silu(gate) * up`, SwiGLU's gating (Llama's feed-forward `w2(silu(w1 x) * w3 x)`):
    /// this layer on `gate`, times `up`. While the layer computes in float with nothing to
    /// observe (no output fake-quant, not converted, no ONNX trace running), one fused op
    /// on CPU f32 with one pass forward and one backward, the values and gradients of
    /// `self.forward(gate)? * up` bit for bit; otherwise exactly that composite.
    ///
    /// ```
    /// use candle_core::{Device, Module, Tensor};
    /// use qat_core::nn::SiLU;
    /// let silu = SiLU::new();
    /// let (g, u) = (Tensor::new(&[1f32, -2.0], &Device::Cpu)?, Tensor::new(&[3f32, 0.5], &Device::Cpu)?);
    /// let fused = silu.forward_gated(&g, &u)?;
    /// let composite = (silu.forward(&g)? * &u)?;
    /// assert_eq!(fused.to_vec1::<f32>()?, composite.to_vec1::<f32>()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn forward_gated(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let plain = self.common.converted().is_none()
            && self.common.act_fq().is_none()
            && !crate::model::hook::active()
            && crate::kernels::silu::silu_gated_fits(gate, up);
        if !plain {
            return Ok((self.forward_t(gate)? * up)?);
        }
        self.common.check_input(gate, "SiLU")?;
        self.common.note_inputs(&[gate])?;
        match crate::kernels::silu::silu_gated(gate, up)? {
            Some(y) => Ok(y),
            None => Ok((self.forward_t(gate)? * up)?),
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

simple_module!(ReLU, observed: false, scheme: Float);
simple_module!(SiLU, observed: true, scheme: Float);
simple_module!(GELU, observed: true, scheme: Float);
simple_module!(Sigmoid, observed: true, scheme: Float);
simple_module!(Tanh, observed: true, scheme: Float);
simple_module!(Identity, observed: false, scheme: Float);
