//! BatchNorm1d/2d/3d with PyTorch's training behaviour (batch statistics, running-stat update
//! with momentum and the unbiased variance) and its fused forms: a member absorbed into a
//! conv/linear group, or the head of a (BatchNorm, ReLU) group.

use candle_core::{Module, Tensor, Var};
use candle_nn::VarBuilder;

use super::common::Common;
use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::{QuantModule, Stage, Staged};
use crate::qconfig::QConfig;

/// BatchNorm settings (PyTorch's defaults: eps 1e-5, momentum 0.1, affine).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the new batch in the running statistics.
    pub momentum: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig {
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

/// The BatchNorm math: parameters, running statistics, training and eval forward.
#[derive(Clone, Debug)]
pub(crate) struct BnCore {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Var,
    pub running_var: Var,
    pub config: BatchNormConfig,
}

impl BnCore {
    pub fn load(num_features: usize, config: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        use candle_nn::Init;
        let weight = vb.get_with_hints(num_features, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(num_features, "bias", Init::Const(0.0))?;
        let rm = vb.get_with_hints(num_features, "running_mean", Init::Const(0.0))?;
        let rv = vb.get_with_hints(num_features, "running_var", Init::Const(1.0))?;
        Ok(BnCore {
            weight,
            bias,
            // A VarMap-backed builder hands out its own variables: updating them in place keeps
            // the map (and so checkpoints) current.
            running_mean: Var::from_tensor(&rm)?,
            running_var: Var::from_tensor(&rv)?,
            config,
        })
    }

    pub fn num_features(&self) -> usize {
        self.weight.elem_count()
    }

    /// The inference computation as the ONNX exporter writes it (running statistics). A
    /// parameter that cannot be read comes out empty, which the exporter reports.
    pub(crate) fn onnx_op(&self, relu: bool) -> crate::record::FloatOp {
        let read = |t: &Tensor| t.detach().to_vec1::<f32>().unwrap_or_default();
        crate::record::FloatOp::BatchNorm {
            weight: read(&self.weight),
            bias: read(&self.bias),
            mean: read(self.running_mean.as_tensor()),
            var: read(self.running_var.as_tensor()),
            eps: self.config.eps,
            relu,
        }
    }

    /// `[1, C, 1, ...]` for an input of rank `rank`.
    fn channel_shape(&self, rank: usize) -> Vec<usize> {
        let mut s = vec![1; rank];
        s[1] = self.num_features();
        s
    }

    /// Normalises `x` (channels on dim 1) with batch statistics (and updates the running
    /// ones) when `training`, else with the running statistics; a ReLU follows with `relu`
    /// (in the same op on CPU f32 tensors).
    pub fn forward(&self, x: &Tensor, training: bool, relu: bool) -> Result<Tensor> {
        let rank = x.rank();
        if rank < 2 || x.dims()[1] != self.num_features() {
            return Err(Error::tensor(
                format!(
                    "BatchNorm over {} features got an input of shape {:?}",
                    self.num_features(),
                    x.dims()
                ),
                "feed (N, C, ...) tensors with C equal to num_features",
            ));
        }
        if crate::kernels::batch_norm::supported(x, &self.weight, &self.bias) {
            return self.forward_fused(x, training, relu);
        }
        let shape = self.channel_shape(rank);
        let w = self.weight.reshape(shape.as_slice())?;
        let b = self.bias.reshape(shape.as_slice())?;
        let (mean, var) = if training {
            let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
            let n = x.elem_count() / self.num_features();
            if n < 2 {
                return Err(Error::tensor(
                    format!("BatchNorm in training got {n} value per channel"),
                    "train with more than one value per channel (batch size > 1 or spatial dims)",
                ));
            }
            let mean = (x.sum_keepdim(dims.as_slice())? / n as f64)?;
            let centered = x.broadcast_sub(&mean)?;
            let var = (centered.sqr()?.sum_keepdim(dims.as_slice())? / n as f64)?;
            self.update_running(&mean, &var, n)?;
            (mean, var)
        } else {
            (
                self.running_mean
                    .as_tensor()
                    .detach()
                    .reshape(shape.as_slice())?,
                self.running_var
                    .as_tensor()
                    .detach()
                    .reshape(shape.as_slice())?,
            )
        };
        let inv_std = (var + self.config.eps)?.sqrt()?.recip()?;
        let y = x.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
        let y = y.broadcast_mul(&w)?.broadcast_add(&b)?;
        Ok(if relu { y.relu()? } else { y })
    }

    /// [`BnCore::forward`] on CPU f32 tensors: statistics in one pass per moment, the
    /// normalisation in one, and a fused backward (see `kernels::batch_norm`).
    fn forward_fused(&self, x: &Tensor, training: bool, relu: bool) -> Result<Tensor> {
        use crate::kernels::batch_norm as k;
        let x = x.contiguous()?;
        let eps = self.config.eps;
        let (mean, invstd) = if training {
            let n = x.elem_count() / self.num_features();
            if n < 2 {
                return Err(Error::tensor(
                    format!("BatchNorm in training got {n} value per channel"),
                    "train with more than one value per channel (batch size > 1 or spatial dims)",
                ));
            }
            let (mean, var) = k::batch_stats(&x)?;
            let dev = x.device();
            self.update_running(
                &Tensor::new(mean.as_slice(), dev)?,
                &Tensor::new(var.as_slice(), dev)?,
                n,
            )?;
            let invstd = k::inv_std(&var, eps);
            (mean, invstd)
        } else {
            let host = |v: &Var| -> Result<Vec<f32>> {
                Ok(v.as_tensor()
                    .detach()
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?)
            };
            (
                host(&self.running_mean)?,
                k::inv_std(&host(&self.running_var)?, eps),
            )
        };
        Ok(k::batch_norm(
            &x,
            &self.weight,
            &self.bias,
            mean,
            invstd,
            training,
            relu,
        )?)
    }

    fn update_running(&self, mean: &Tensor, var: &Tensor, n: usize) -> Result<()> {
        let m = self.config.momentum;
        let mean = mean.detach().flatten_all()?;
        let unbiased = (var.detach().flatten_all()? * (n as f64 / (n as f64 - 1.0)))?;
        let rm = ((self.running_mean.as_tensor().detach() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor().detach() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        Ok(())
    }

    /// `weight / sqrt(running_var + eps)`, PyTorch's `scale_factor` of fused QAT modules.
    pub fn scale_factor(&self) -> Result<Tensor> {
        let std = (self.running_var.as_tensor().detach() + self.config.eps)?.sqrt()?;
        Ok(self.weight.broadcast_div(&std)?)
    }
}

/// A BatchNorm layer (the three ranks share it; the type fixes the rank).
#[derive(Clone, Debug)]
pub(crate) struct BatchNormInner {
    pub core: Option<BnCore>,
    pub relu: bool,
    pub frozen: bool,
    pub common: Common,
}

macro_rules! batch_norm {
    ($name:ident, $rank:literal, $doc:literal) => {
        #[doc = $doc]
        ///
        /// Built from a `VarBuilder` with PyTorch's names (`weight`, `bias`, `running_mean`,
        /// `running_var`).
        #[derive(Clone, Debug)]
        pub struct $name(pub(crate) BatchNormInner);

        impl $name {
            /// Loads or initialises the layer (weight 1, bias 0, mean 0, var 1).
            pub fn new(
                num_features: usize,
                config: BatchNormConfig,
                vb: VarBuilder,
            ) -> Result<Self> {
                Ok($name(BatchNormInner {
                    core: Some(BnCore::load(num_features, config, vb)?),
                    relu: false,
                    frozen: false,
                    common: Common::default(),
                }))
            }

            /// Running mean (None once absorbed into a fused group).
            pub fn running_mean(&self) -> Option<Tensor> {
                self.0
                    .core
                    .as_ref()
                    .map(|c| c.running_mean.as_tensor().clone())
            }

            /// Running variance (None once absorbed into a fused group).
            pub fn running_var(&self) -> Option<Tensor> {
                self.0
                    .core
                    .as_ref()
                    .map(|c| c.running_var.as_tensor().clone())
            }

            fn check_rank(&self, x: &Tensor) -> Result<()> {
                let ok = match $rank {
                    1 => x.rank() == 2 || x.rank() == 3,
                    r => x.rank() == r + 2,
                };
                if !ok {
                    return Err(Error::tensor(
                        format!("{} got an input of shape {:?}", stringify!($name), x.dims()),
                        concat!(
                            "feed ",
                            stringify!($name),
                            " inputs of its rank (N, C, ...)"
                        ),
                    ));
                }
                Ok(())
            }
        }

        impl Module for $name {
            fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
                Ok(self.forward_t(x).map_err(|e| self.0.common.at_path(e))?)
            }
        }

        impl $name {
            fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
                let inner = &self.0;
                if let Some(p) = &inner.common.absorbed {
                    return inner.common.placeholder_forward(p, x);
                }
                self.check_rank(x)?;
                let Some(core) = &inner.core else {
                    return Err(Error::state(
                        "BatchNorm without parameters",
                        "report this as a bug",
                    ));
                };
                super::input::check_channels(
                    stringify!($name),
                    x,
                    1,
                    core.num_features(),
                    "num_features",
                )?;
                if inner.common.converted_io().is_some() {
                    let relu = inner.relu;
                    return inner.common.converted_float_op(
                        &[x],
                        stringify!($name),
                        || core.onnx_op(relu),
                        |v| core.forward(&v[0], false, relu),
                    );
                }
                inner.common.check_input(x, stringify!($name))?;
                super::input::check_dtype(stringify!($name), x, core.weight.dtype())?;
                inner.common.note_inputs(&[x])?;
                let y = core.forward(x, inner.common.training && !inner.frozen, inner.relu)?;
                inner
                    .common
                    .trace_float(&[x], &y, || core.onnx_op(inner.relu));
                inner.common.finish(y)
            }
        }

        impl QuantModule for $name {
            fn kind(&self) -> String {
                let inner = &self.0;
                if inner.common.absorbed.is_some() {
                    "Identity".into()
                } else if inner.relu {
                    concat!("BNReLU", stringify!($rank), "d").into()
                } else {
                    stringify!($name).into()
                }
            }
            fn type_name(&self) -> &'static str {
                stringify!($name)
            }
            fn stage(&self) -> Stage {
                self.0.common.stage()
            }
            fn set_training(&mut self, training: bool) {
                self.0.common.training = training;
            }
            fn prepare_qat(&mut self, qconfig: Option<&QConfig>) -> Result<()> {
                self.0.common.prepare(qconfig, true)
            }
            fn qconfig(&self) -> Option<&QConfig> {
                self.0.common.qconfig()
            }
            fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
                self.0.common.for_each_fake_quant(f)
            }
            fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
                self.0.common.fake_quants()
            }
            fn int8_state(&self) -> Option<crate::record::Int8State> {
                self.0.common.int8_state()
            }
            fn set_path(&mut self, path: &crate::model::ModulePath) {
                self.0.common.path = path.dotted();
            }
            fn trace_key(&self) -> Option<usize> {
                Some(&self.0.common as *const _ as usize)
            }
            fn stage_int8_state(&self, state: crate::record::Int8State) -> Result<Staged> {
                self.0.common.stage_int8_state(stringify!($name), &state)
            }
            fn float_params(&self) -> Vec<(&'static str, Tensor)> {
                self.0.float_params()
            }
            fn load_float_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
                self.0.load_float_params(params)
            }
            fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
                self.0.common.producer_keys()
            }
            fn stage_convert(&self) -> Result<Staged> {
                let absorbed = self.0.common.absorbed.is_some();
                self.0.common.stage_convert(stringify!($name), !absorbed)
            }
            fn apply_staged(&mut self, change: Staged) -> Result<()> {
                self.0.common.apply(change)
            }
        }

        crate::model::leaf_quantizable!($name);
    };
}

batch_norm!(BatchNorm1d, 1, "BatchNorm over (N, C) or (N, C, L) inputs.");
batch_norm!(BatchNorm2d, 2, "BatchNorm over (N, C, H, W) inputs.");
batch_norm!(BatchNorm3d, 3, "BatchNorm over (N, C, D, H, W) inputs.");
