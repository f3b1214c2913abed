//! FloatFunctional: tensor arithmetic with an output observer, PyTorch's
//! `torch.ao.nn.quantized.FloatFunctional`. Give each call site its own instance: each one
//! learns the range of what its call produces.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::qconfig::QConfig;
use crate::record::FloatOp;

/// `add`, `add_relu`, `mul`, `cat` whose outputs are fake-quantized once prepared.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::nn::FloatFunctional;
/// let skip = FloatFunctional::new();
/// let a = Tensor::new(&[1.0f32, -3.0], &Device::Cpu)?;
/// let y = skip.add_relu(&a, &a)?;
/// assert_eq!(y.to_vec1::<f32>()?, vec![2.0, 0.0]);
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct FloatFunctional {
    pub(crate) common: Common,
}

impl FloatFunctional {
    /// A new instance (one per call site).
    pub fn new() -> Self {
        Self::default()
    }

    /// `a + b` (broadcasting).
    pub fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.common.named(|| {
            if self.common.converted_io().is_some() {
                return self.common.converted_float_op(
                    &[a, b],
                    "FloatFunctional::add",
                    || FloatOp::Add,
                    |v| Ok(v[0].broadcast_add(&v[1])?),
                );
            }
            self.common.note_inputs(&[a, b])?;
            let y = a.broadcast_add(b)?;
            self.common.trace_float(&[a, b], &y, || FloatOp::Add);
            self.common.finish(y)
        })
    }

    /// `relu(a + b)`.
    pub fn add_relu(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.common.named(|| {
            if self.common.converted_io().is_some() {
                return self.common.converted_float_op(
                    &[a, b],
                    "FloatFunctional::add_relu",
                    || FloatOp::AddRelu,
                    |v| crate::kernels::relu::add_relu_no_grad(&v[0], &v[1]),
                );
            }
            self.common.note_inputs(&[a, b])?;
            let y = crate::kernels::relu::relu(&a.broadcast_add(b)?)?;
            self.common.trace_float(&[a, b], &y, || FloatOp::AddRelu);
            self.common.finish(y)
        })
    }

    /// `a * b` (broadcasting).
    pub fn mul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.common.named(|| {
            if self.common.converted_io().is_some() {
                return self.common.converted_float_op(
                    &[a, b],
                    "FloatFunctional::mul",
                    || FloatOp::Mul,
                    |v| Ok(v[0].broadcast_mul(&v[1])?),
                );
            }
            self.common.note_inputs(&[a, b])?;
            let y = a.broadcast_mul(b)?;
            self.common.trace_float(&[a, b], &y, || FloatOp::Mul);
            self.common.finish(y)
        })
    }

    /// Concatenation along `dim`.
    pub fn cat(&self, xs: &[Tensor], dim: usize) -> Result<Tensor> {
        self.common.named(|| {
            if xs.is_empty() {
                return Err(Error::tensor(
                    "FloatFunctional::cat of no tensors",
                    "pass at least one tensor",
                ));
            }
            let refs: Vec<&Tensor> = xs.iter().collect();
            if self.common.converted_io().is_some() {
                return self.common.converted_float_op(
                    &refs,
                    "FloatFunctional::cat",
                    || FloatOp::Cat(dim),
                    |v| Ok(Tensor::cat(v, dim)?),
                );
            }
            self.common.note_inputs(&refs)?;
            let y = Tensor::cat(xs, dim)?;
            self.common.trace_float(&refs, &y, || FloatOp::Cat(dim));
            self.common.finish(y)
        })
    }

    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            return self.common.converted_float_op(
                &[x],
                "FloatFunctional",
                || FloatOp::Identity,
                |v| Ok(v[0].clone()),
            );
        }
        self.common.note_inputs(&[x])?;
        self.common.finish(x.clone())
    }

    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("FloatFunctional", true)
    }

    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
}

simple_module!(FloatFunctional, observed: true);
