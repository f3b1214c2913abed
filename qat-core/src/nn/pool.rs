//! Quantization-transparent layers: MaxPool2d and Flatten. They change no values' scale, so
//! they carry no observer and, converted, pass integer codes through.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::qconfig::QConfig;
use crate::record::{FloatOp, Op};

/// 2-D max pooling with a square window.
#[derive(Clone, Debug)]
pub struct MaxPool2d {
    kernel_size: usize,
    stride: usize,
    pub(crate) common: Common,
}

impl MaxPool2d {
    /// Pooling over `kernel_size` windows every `stride` (PyTorch's default stride is the
    /// kernel size).
    pub fn new(kernel_size: usize, stride: usize) -> Result<Self> {
        if kernel_size == 0 || stride == 0 {
            return Err(Error::config(
                "MaxPool2d with a zero kernel size or stride",
                "use kernel_size >= 1 and stride >= 1",
            ));
        }
        Ok(MaxPool2d {
            kernel_size,
            stride,
            common: Common::default(),
        })
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            self.common.check_input(x, "MaxPool2d")?;
            let y = crate::quantized::max_pool2d_codes(x, self.kernel_size, self.stride)?;
            self.common.trace(&[x], &y, || Op::OnCodes(self.op()));
            return Ok(y);
        }
        let y = x.max_pool2d_with_stride(self.kernel_size, self.stride)?;
        self.common.pass_through(x, &y)?;
        self.common.trace_float(&[x], &y, || self.op());
        Ok(y)
    }
    fn op(&self) -> FloatOp {
        FloatOp::MaxPool2d {
            kernel: self.kernel_size,
            stride: self.stride,
        }
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("MaxPool2d", false)
    }
}

/// Flattens dims `start_dim..` into one (PyTorch's `torch.flatten(x, start_dim)`).
#[derive(Clone, Debug)]
pub struct Flatten {
    start_dim: usize,
    pub(crate) common: Common,
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten {
            start_dim: 1,
            common: Common::default(),
        }
    }
}

impl Flatten {
    /// Flattens from `start_dim` (1 keeps the batch dim).
    pub fn new(start_dim: usize) -> Self {
        Flatten {
            start_dim,
            common: Common::default(),
        }
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            self.common.check_input(x, "Flatten")?;
            let y = x.flatten_from(self.start_dim)?;
            self.common
                .trace(&[x], &y, || Op::OnCodes(FloatOp::Flatten(self.start_dim)));
            return Ok(y);
        }
        let y = x.flatten_from(self.start_dim)?;
        self.common.pass_through(x, &y)?;
        self.common
            .trace_float(&[x], &y, || FloatOp::Flatten(self.start_dim));
        Ok(y)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Flatten", false)
    }
}

simple_module!(MaxPool2d, observed: false, scheme: Float);
simple_module!(Flatten, observed: false, scheme: Float);
