//! QuantStub and DeQuantStub: where the quantized region of a model starts and ends.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::Result;
use crate::qconfig::QConfig;

/// Marks where float inputs enter the quantized region: prepared, it fake-quantizes (and
/// observes) its input; converted, it quantizes it.
#[derive(Clone, Debug, Default)]
pub struct QuantStub {
    pub(crate) common: Common,
}

/// Marks where the quantized region ends: an identity in float and QAT (no observer);
/// converted, it dequantizes.
#[derive(Clone, Debug, Default)]
pub struct DeQuantStub {
    pub(crate) common: Common,
}

impl QuantStub {
    /// A new stub.
    pub fn new() -> Self {
        Self::default()
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        self.common.finish(x.clone())
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

impl DeQuantStub {
    /// A new stub.
    pub fn new() -> Self {
        Self::default()
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

simple_module!(QuantStub, observed: true);
simple_module!(DeQuantStub, observed: false);
