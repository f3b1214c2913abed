//! ReLU, Sigmoid, Tanh and Identity.

use std::sync::Mutex;

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::Result;
use crate::qconfig::{FakeQuantizeSpec, QConfig};

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
        match &self.common.absorbed {
            Some(p) => self.common.placeholder_forward(p, x),
            None => Ok(x.relu()?),
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

fn prepare_fixed(
    common: &mut Common,
    qconfig: Option<&QConfig>,
    spec: FakeQuantizeSpec,
) -> Result<()> {
    common.prepare(qconfig, false)?;
    if qconfig.is_some() {
        common.act_fq = Some(Mutex::new(spec.build()?));
    }
    Ok(())
}

impl Sigmoid {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        self.common.finish(candle_nn::ops::sigmoid(x)?)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, _observed: bool) -> Result<()> {
        prepare_fixed(&mut self.common, qconfig, FakeQuantizeSpec::fixed_sigmoid())
    }
}

impl Tanh {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        self.common.finish(x.tanh()?)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, _observed: bool) -> Result<()> {
        prepare_fixed(&mut self.common, qconfig, FakeQuantizeSpec::fixed_tanh())
    }
}

impl Identity {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        match &self.common.absorbed {
            Some(p) => self.common.placeholder_forward(p, x),
            None => Ok(x.clone()),
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

simple_module!(ReLU, observed: false);
simple_module!(Sigmoid, observed: true);
simple_module!(Tanh, observed: true);
simple_module!(Identity, observed: false);
