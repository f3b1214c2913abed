//! Linear with PyTorch's parameter names (`weight` of shape (out, in), `bias`).

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::weighted::{weighted_module_methods, Weighted};
use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::{QuantModule, Stage, Staged};
use crate::qconfig::QConfig;
use crate::record::Int8State;

/// `y = x W^T + b` over the last dim of x. Fusable with BatchNorm1d and ReLU.
#[derive(Clone, Debug)]
pub struct Linear {
    pub(crate) w: Weighted,
}

impl Linear {
    /// Loads or initialises (as candle-nn) a linear layer.
    pub fn new(
        in_features: usize,
        out_features: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get_with_hints(
            (out_features, in_features),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bias = if bias {
            let bound = 1.0 / (in_features as f64).sqrt();
            Some(vb.get_with_hints(
                out_features,
                "bias",
                candle_nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )?)
        } else {
            None
        };
        Ok(Linear {
            w: Weighted::new(weight, bias),
        })
    }

    /// The (float) weight.
    pub fn weight(&self) -> &Tensor {
        &self.w.weight
    }

    /// The (float) bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.w.bias.as_ref()
    }

    /// The GGML weight of a layer converted from a GGML scheme: the blocks its weight
    /// fake-quant produced, as candle's `QMatMul` runs them and a GGUF file stores them.
    pub fn ggml_weight(&self) -> Option<&std::sync::Arc<candle_core::quantized::QTensor>> {
        self.w.ggml().map(|g| &g.qtensor)
    }

    /// Running mean and variance of a BatchNorm fused in for QAT.
    pub fn bn_running_stats(&self) -> Option<(Tensor, Tensor)> {
        self.w.bn.as_ref().map(|b| {
            (
                b.running_mean.as_tensor().clone(),
                b.running_var.as_tensor().clone(),
            )
        })
    }

    pub(crate) fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let in_features = w.dims()[1];
        if x.rank() < 1 || x.dims()[x.rank() - 1] != in_features {
            return Err(Error::tensor(
                format!(
                    "Linear over {in_features} features got an input of shape {:?}",
                    x.dims()
                ),
                "feed tensors whose last dim is in_features (flatten conv outputs first)",
            ));
        }
        if let Some(y) = crate::kernels::linear::linear_matmul(x, w)? {
            return Ok(y);
        }
        let wt = w.t()?;
        Ok(match x.rank() {
            2 => x.matmul(&wt)?,
            _ => x.broadcast_matmul(&wt)?,
        })
    }

    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.w.int().is_none() {
            super::input::check_dtype("Linear", x, self.w.weight.dtype())?;
            if x.rank() == 1 {
                // A single sample, as PyTorch's Linear (and the converted one) take it: run it
                // as a batch of one. The reshaped tensors are new tensors to provenance, so
                // they are noted as coming from where their originals came from.
                let x2 = x.unsqueeze(0)?;
                crate::provenance::alias(x, &x2);
                let y2 = self.forward_t(&x2)?;
                let y = y2.squeeze(0)?;
                crate::provenance::alias(&y2, &y);
                return Ok(y);
            }
        }
        self.w.forward(
            x,
            |rank| rank - 1,
            |x, w, b| {
                let y = Self::matmul(x, w)?;
                match b {
                    Some(b) => crate::kernels::channel::add_channel(&y, b, y.rank() - 1),
                    None => Ok(y),
                }
            },
            crate::record::WeightedKind::Linear,
        )
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.forward_t(x).map_err(|e| self.w.common.at_path(e))?)
    }
}

impl QuantModule for Linear {
    fn kind(&self) -> String {
        self.w.kind("Linear", "")
    }
    fn type_name(&self) -> &'static str {
        "Linear"
    }
    weighted_module_methods!();
    fn ggml_converted(&self) -> bool {
        self.w.ggml().is_some()
    }
    fn scheme_support(&self) -> crate::qconfig::SchemeSupport {
        crate::qconfig::SchemeSupport::InputAndWeight
    }
    fn check_qconfig(&self, qconfig: &QConfig) -> Result<()> {
        self.w.check_scheme(qconfig)
    }
    fn for_each_intx_quantizer(&mut self, f: &mut crate::model::IntxVisitor<'_>) -> Result<()> {
        self.w.for_each_intx_quantizer(f)
    }
    fn set_bn_frozen(&mut self, frozen: bool) {
        self.w.bn_frozen = frozen;
    }
    fn stage_convert(&self) -> Result<Staged> {
        self.w.stage_convert(&self.kind(), true)
    }
}

crate::model::leaf_quantizable!(Linear);
