//! ReLU, Sigmoid, Tanh and Identity.

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

simple_module!(ReLU, observed: false);
simple_module!(Sigmoid, observed: true);
simple_module!(Tanh, observed: true);
simple_module!(Identity, observed: false);
