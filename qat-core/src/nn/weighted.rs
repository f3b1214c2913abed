//! What conv and linear layers share: weight and bias, an optional live BatchNorm (QAT
//! fusion, PyTorch's `_ConvBnNd._forward_approximate`), a fused ReLU, and the weight and
//! output fake-quants.

use std::sync::Mutex;

use candle_core::Tensor;

use super::batch_norm::BnCore;
use super::common::{lock, Common};
use crate::error::Result;
use crate::fake_quant::FakeQuantize;
use crate::qconfig::QConfig;

#[derive(Debug)]
pub(crate) struct Weighted {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub bn: Option<BnCore>,
    pub bn_frozen: bool,
    pub relu: bool,
    pub weight_fq: Option<Mutex<FakeQuantize>>,
    pub common: Common,
}

impl Clone for Weighted {
    fn clone(&self) -> Self {
        Weighted {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            bn: self.bn.clone(),
            bn_frozen: self.bn_frozen,
            relu: self.relu,
            weight_fq: self
                .weight_fq
                .as_ref()
                .and_then(|m| m.lock().ok().map(|g| Mutex::new(g.clone()))),
            common: self.common.clone(),
        }
    }
}

/// `[1, .., C, .., 1]` with C at `dim`.
fn along(dim: usize, rank: usize, c: usize) -> Vec<usize> {
    let mut s = vec![1; rank];
    s[dim] = c;
    s
}

impl Weighted {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Weighted {
            weight,
            bias,
            bn: None,
            bn_frozen: false,
            relu: false,
            weight_fq: None,
            common: Common::default(),
        }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Runs the layer; `op(x, w)` is the bare convolution or matmul (no bias) and `dim` the
    /// channel dim of its output.
    pub fn forward(
        &self,
        x: &Tensor,
        dim: impl Fn(usize) -> usize,
        op: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let o = self.out_channels();
        let wshape = along(0, self.weight.rank(), o);
        let add_bias = |y: Tensor| -> Result<Tensor> {
            match &self.bias {
                Some(b) => Ok(y.broadcast_add(&b.reshape(along(dim(y.rank()), y.rank(), o))?)?),
                None => Ok(y),
            }
        };
        let bn_training = self.common.training && !self.bn_frozen;
        let y = match (&self.bn, &self.weight_fq) {
            (Some(bn), Some(wfq)) => {
                let sf = bn.scale_factor()?;
                let w = self.weight.broadcast_mul(&sf.reshape(wshape.as_slice())?)?;
                let w = lock(wfq)?.forward(&w)?;
                let y = op(x, &w)?;
                let y = y.broadcast_div(&sf.reshape(along(dim(y.rank()), y.rank(), o))?)?;
                bn.forward(&add_bias(y)?, bn_training)?
            }
            (Some(bn), None) => bn.forward(&add_bias(op(x, &self.weight)?)?, bn_training)?,
            (None, Some(wfq)) => {
                let w = lock(wfq)?.forward(&self.weight)?;
                add_bias(op(x, &w)?)?
            }
            (None, None) => add_bias(op(x, &self.weight)?)?,
        };
        let y = if self.relu { y.relu()? } else { y };
        self.common.finish(y)
    }

    pub fn prepare(&mut self, qconfig: Option<&QConfig>) -> Result<()> {
        self.common.prepare(qconfig, true)?;
        if let Some(qc) = qconfig {
            let fq = FakeQuantize::with_channels(&qc.weight, self.out_channels())?;
            self.weight_fq = Some(Mutex::new(fq));
        }
        Ok(())
    }

    pub fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
        let mut v: Vec<_> = self
            .weight_fq
            .iter()
            .filter_map(|m| m.lock().ok().map(|g| ("weight".to_string(), g.clone())))
            .collect();
        v.extend(self.common.fake_quants());
        v
    }

    pub fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
        if let Some(m) = self.weight_fq.as_mut() {
            if let Ok(fq) = m.get_mut() {
                f("weight", fq);
            }
        }
        self.common.for_each_fake_quant(f);
    }

    /// PyTorch's module name for what this layer is now (`base` is e.g. `Conv`, `suffix`
    /// `2d`).
    pub fn kind(&self, base: &str, suffix: &str) -> String {
        let bn = if self.bn.is_some() { "Bn" } else { "" };
        let relu = if self.relu { "ReLU" } else { "" };
        if bn.is_empty() && relu.is_empty() {
            format!("{base}{}", if base == "Linear" { "" } else { suffix })
        } else if base == "Linear" {
            format!(
                "Linear{bn}{}",
                if bn.is_empty() {
                    relu.to_string()
                } else {
                    "1d".into()
                }
            )
        } else {
            format!("{base}{bn}{relu}{suffix}")
        }
    }
}
