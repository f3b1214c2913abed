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
        if let Some(io) = self.common.converted_io() {
            let what = "QuantStub";
            if x.dtype() == candle_core::DType::U8 {
                return Err(crate::error::Error::tensor(
                    format!("{what} takes float inputs but got u8 codes"),
                    "feed the float input of the quantized region to the QuantStub",
                ));
            }
            let o = io.output.ok_or_else(|| {
                crate::error::Error::state(
                    "QuantStub without output qparams",
                    "report this as a bug",
                )
            })?;
            let y = crate::quantized::quantize(x, o.scale, o.zero_point, o.quant_min, o.quant_max)?;
            self.common
                .trace(&[x], &y, || crate::record::Op::Quantize(o));
            return Ok(y);
        }
        self.common.finish(x.clone())
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("QuantStub", false)
    }
}

impl DeQuantStub {
    /// A new stub.
    pub fn new() -> Self {
        Self::default()
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "DeQuantStub",
                || crate::record::FloatOp::Identity,
                |v| Ok(v[0].clone()),
            );
        }
        self.common.note_inputs(&[x])?;
        Ok(x.clone())
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("DeQuantStub", true)
    }
}

simple_module!(QuantStub, observed: true);
simple_module!(DeQuantStub, observed: false);
