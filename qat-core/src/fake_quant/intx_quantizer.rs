//! `IntxFakeQuantizer`: torchao 0.18's stateful `IntxFakeQuantizer` — dynamic qparams
//! recomputed every forward, static ones kept from the first, or (range learning) a
//! trainable scale and zero point initialised from an example batch.

use candle_core::{DType, Tensor, Var};

use super::intx::IntxSpec;
use super::intx_op::{
    intx_fake_quantize, intx_fake_quantize_learnable, intx_fake_quantize_with, intx_qparams,
    IntxQParams,
};
use crate::error::{Error, Result};

/// torchao's floor on a learned scale (`IntxFakeQuantizer._scale_eps`).
const LEARNED_SCALE_EPS: f64 = 1e-9;

#[derive(Clone, Debug)]
struct Learned {
    scale: Var,
    /// `Some` when asymmetric (trainable), `None` when symmetric (zeros, not trained).
    zero_point: Option<Var>,
    zeros: Tensor,
}

/// Fake-quantizes tensors with an [`IntxSpec`], keeping the qparams as torchao's
/// `IntxFakeQuantizer` does: a dynamic spec recomputes them from every input, a static one
/// computes them from its first input and keeps them, and a range-learning spec trains
/// them as candle [`Var`]s after [`initialize`](Self::initialize).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::fake_quant::{IntxFakeQuantizer, IntxSpec};
/// let mut fq = IntxFakeQuantizer::new(IntxSpec::int8_per_token_asym());
/// let x = Tensor::new(&[[0.0f32, 0.5, 1.0, 2.55], [-1.0, 0.0, 1.0, 0.3]], &Device::Cpu)?;
/// let y = fq.forward(&x)?;
/// assert_eq!(y.dims(), x.dims());
/// assert_eq!(fq.scale().unwrap().dims(), &[2]); // one per token
/// assert_eq!(fq.zero_point().unwrap().to_vec1::<f32>()?[0], -128.0);
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct IntxFakeQuantizer {
    spec: IntxSpec,
    enabled: bool,
    qparams: Option<IntxQParams>,
    learned: Option<Learned>,
}

impl IntxFakeQuantizer {
    /// A quantizer with no qparams yet.
    pub fn new(spec: IntxSpec) -> Self {
        IntxFakeQuantizer {
            spec,
            enabled: true,
            qparams: None,
            learned: None,
        }
    }

    /// Its scheme.
    pub fn spec(&self) -> &IntxSpec {
        &self.spec
    }

    /// Turns fake quantization on or off (off: `forward` returns its input).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether fake quantization is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Computes qparams from an example input (torchao's `initialize_fake_quantizers`):
    /// static qparams are kept from it; with range learning, the scale (floored at 1e-9)
    /// and, when asymmetric, the zero point (rounded and clamped to the range) become
    /// trainable variables — call this before building the optimizer, and give it
    /// [`vars`](Self::vars). Once range learning is initialised, later calls change nothing
    /// (as torchao).
    pub fn initialize(&mut self, x: &Tensor) -> Result<()> {
        if self.learned.is_some() {
            return Ok(());
        }
        let qp = intx_qparams(x, &self.spec)?;
        if self.spec.range_learning() {
            let scale = Var::from_tensor(&qp.scale().maximum(LEARNED_SCALE_EPS)?)?;
            let (qmin, qmax) = (self.spec.quant_min() as f64, self.spec.quant_max() as f64);
            let zeros = qp.zero_point().zeros_like()?;
            let zero_point = if self.spec.is_symmetric() {
                None
            } else {
                let z = qp.zero_point().round()?.clamp(qmin, qmax)?;
                Some(Var::from_tensor(&z)?)
            };
            self.learned = Some(Learned {
                scale,
                zero_point,
                zeros,
            });
        }
        self.qparams = Some(qp);
        Ok(())
    }

    /// Fake-quantizes `x` (see the type's docs for which qparams it uses).
    pub fn forward(&mut self, x: &Tensor) -> Result<Tensor> {
        if !self.enabled {
            return Ok(x.clone());
        }
        if let Some(l) = &self.learned {
            let zp = l.zero_point.as_ref().map_or(&l.zeros, |v| v.as_tensor());
            return intx_fake_quantize_learnable(x, l.scale.as_tensor(), zp, &self.spec);
        }
        if self.spec.range_learning() {
            return Err(Error::pass(
                "a range-learning intx fake quantizer ran before its scales and zero points \
                 were initialised",
                "call `initialize(example_input)` before building the optimizer and \
                 training (torchao's initialize_fake_quantizers)",
            ));
        }
        match (&self.qparams, self.spec.is_dynamic()) {
            (Some(qp), false) => intx_fake_quantize_with(x, qp, &self.spec),
            _ => {
                let (y, qp) = intx_fake_quantize(x, &self.spec)?;
                self.qparams = Some(qp);
                Ok(y)
            }
        }
    }

    /// The scale in use (f32, torchao's shape): the learned one, else the last computed or
    /// kept one; `None` before the first forward or `initialize`.
    pub fn scale(&self) -> Option<Tensor> {
        match &self.learned {
            Some(l) => Some(l.scale.as_tensor().clone()),
            None => self.qparams.as_ref().map(|q| q.scale().clone()),
        }
    }

    /// The zero point in use (f32; integers unless learned), like [`scale`](Self::scale).
    pub fn zero_point(&self) -> Option<Tensor> {
        match &self.learned {
            Some(l) => Some(match &l.zero_point {
                Some(v) => v.as_tensor().clone(),
                None => l.zeros.clone(),
            }),
            None => self.qparams.as_ref().map(|q| q.zero_point().clone()),
        }
    }

    /// Scale and zero point together (detached copies when learned), for conversion and
    /// export.
    pub fn qparams(&self) -> Result<Option<IntxQParams>> {
        match (self.scale(), self.zero_point()) {
            (Some(s), Some(z)) => Ok(Some(IntxQParams::new(
                s.detach().to_dtype(DType::F32)?,
                z.detach(),
            )?)),
            _ => Ok(None),
        }
    }

    /// Replaces the kept qparams (loading a static quantizer's state). With range learning
    /// the variables are set to them (creating the variables if needed).
    pub fn set_qparams(&mut self, qparams: IntxQParams) -> Result<()> {
        if self.spec.range_learning() {
            match &self.learned {
                Some(l) => {
                    l.scale.set(qparams.scale())?;
                    if let Some(z) = &l.zero_point {
                        z.set(qparams.zero_point())?;
                    }
                }
                None => {
                    self.learned = Some(Learned {
                        scale: Var::from_tensor(qparams.scale())?,
                        zero_point: if self.spec.is_symmetric() {
                            None
                        } else {
                            Some(Var::from_tensor(qparams.zero_point())?)
                        },
                        zeros: qparams.zero_point().zeros_like()?,
                    })
                }
            }
        }
        self.qparams = Some(qparams);
        Ok(())
    }

    /// The trainable variables (range learning: the scale, then the zero point when
    /// asymmetric); empty otherwise.
    pub fn vars(&self) -> Vec<Var> {
        match &self.learned {
            Some(l) => std::iter::once(l.scale.clone())
                .chain(l.zero_point.clone())
                .collect(),
            None => Vec::new(),
        }
    }
}
