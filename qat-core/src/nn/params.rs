//! The float tensors a layer's forward reads besides its int8 state
//! ([`QuantModule::float_params`](crate::model::QuantModule::float_params)), and their
//! replacement from a checkpoint, for the layers that hold tensors: conv and linear (with a
//! fused BatchNorm's under `bn.`) and BatchNorm.

use candle_core::{Tensor, Var};

use super::batch_norm::{BatchNormInner, BnCore};
use super::weighted::Weighted;
use crate::error::{Error, Result};
use crate::model::params::check_float_params;
use crate::model::Stage;

/// `t` with the dtype and device of `like`.
fn like(t: Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
}

fn bn_params(bn: &BnCore, prefix: bool) -> Vec<(&'static str, Tensor)> {
    let names: [&'static str; 4] = if prefix {
        ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    } else {
        ["weight", "bias", "running_mean", "running_var"]
    };
    let tensors = [
        bn.weight.clone(),
        bn.bias.clone(),
        bn.running_mean.as_tensor().clone(),
        bn.running_var.as_tensor().clone(),
    ];
    names.into_iter().zip(tensors).collect()
}

/// Sets the BatchNorm tensor `field` (`weight`, `bias`, `running_mean`, `running_var`).
fn set_bn(bn: &mut BnCore, field: &str, t: Tensor) -> Result<()> {
    match field {
        "weight" => bn.weight = like(t, &bn.weight)?,
        "bias" => bn.bias = like(t, &bn.bias)?,
        "running_mean" => {
            bn.running_mean = Var::from_tensor(&like(t, bn.running_mean.as_tensor())?)?
        }
        "running_var" => bn.running_var = Var::from_tensor(&like(t, bn.running_var.as_tensor())?)?,
        other => return Err(unknown(other)),
    }
    Ok(())
}

fn unknown(name: &str) -> Error {
    Error::state(
        format!("the layer has no float tensor `{name}`"),
        "load parameters saved from a layer of the same kind, shape and stage",
    )
}

impl Weighted {
    /// Weight, bias and a fused BatchNorm's tensors, unless converted (the int8 state holds
    /// what a converted layer computes with).
    pub fn float_params(&self) -> Vec<(&'static str, Tensor)> {
        if self.common.stage() == Stage::Converted {
            return Vec::new();
        }
        let mut v = vec![("weight", self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push(("bias", b.clone()));
        }
        if let Some(bn) = &self.bn {
            v.extend(bn_params(bn, true));
        }
        v
    }

    /// Replaces the tensors [`Weighted::float_params`] lists (checked first, so an error
    /// leaves the layer as it was).
    pub fn load_float_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
        check_float_params(&self.float_params(), &params)?;
        for (name, t) in params {
            match name.as_str() {
                "weight" => self.weight = like(t, &self.weight)?,
                "bias" => {
                    let b = self.bias.as_ref().ok_or_else(|| unknown("bias"))?;
                    self.bias = Some(like(t, b)?);
                }
                other => {
                    let (Some(field), Some(bn)) = (other.strip_prefix("bn."), self.bn.as_mut())
                    else {
                        return Err(unknown(other));
                    };
                    set_bn(bn, field, t)?;
                }
            }
        }
        Ok(())
    }
}

impl BatchNormInner {
    /// The BatchNorm's parameters and running statistics, in every stage (a converted
    /// BatchNorm computes in float on dequantized codes); none once absorbed into a group.
    pub fn float_params(&self) -> Vec<(&'static str, Tensor)> {
        self.core
            .as_ref()
            .map(|c| bn_params(c, false))
            .unwrap_or_default()
    }

    /// Replaces the tensors [`BatchNormInner::float_params`] lists (checked first).
    pub fn load_float_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
        check_float_params(&self.float_params(), &params)?;
        let Some(core) = self.core.as_mut() else {
            return Ok(());
        };
        for (name, t) in params {
            set_bn(core, &name, t)?;
        }
        Ok(())
    }
}
