//! What conv and linear layers share: weight and bias, an optional live BatchNorm (QAT
//! fusion, PyTorch's `_ConvBnNd._forward_approximate`), a fused ReLU, and the weight and
//! output fake-quants.

use std::sync::Mutex;

use candle_core::Tensor;

use super::batch_norm::BnCore;
use super::common::{lock, Common, ConvertedIo, LayerState};
use super::conv::ConvConfig;
use crate::error::{Error, Result};
use crate::fake_quant::{FakeQuantize, IntxFakeQuantizer};
use crate::geometry::ConvTransposeConfig;
use crate::ggml::{BlockType, VecDotType};
use crate::model::hook as trace;
use crate::model::{Stage, Staged};
use crate::qconfig::{Backend, QConfig, Scheme};
use crate::qparams::QParams;
use crate::quantized::{QuantizedWeight, Requant};
use crate::record::IoQParams;
use crate::record::{Op, WeightedKind};

/// The integer op behind a weighted layer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum IntOp<'a> {
    Linear,
    Conv1d(&'a ConvConfig),
    Conv2d(&'a ConvConfig),
    /// A transposed convolution over 1 or 2 spatial dims.
    ConvTranspose(&'a ConvTransposeConfig, usize),
}

/// A weighted layer after convert: int8 weights, bias, input and output qparams.
#[derive(Clone, Debug)]
pub(crate) struct IntWeighted {
    pub weight: QuantizedWeight,
    pub bias: IntBias,
    pub input: IoQParams,
    pub requant: Requant,
}

impl IntWeighted {
    /// The output's scale, zero point and code range.
    fn requant_io(&self) -> IoQParams {
        IoQParams {
            scale: self.requant.scale(),
            zero_point: self.requant.zero_point(),
            quant_min: self.requant.quant_min(),
            quant_max: self.requant.quant_max(),
        }
    }
}

/// A conversion of a weighted layer, staged by a pass.
#[derive(Debug)]
pub(crate) struct WeightedChange {
    int: IntWeighted,
    output: IoQParams,
    /// The weight fake-quant after it observed the weight once more (convert only).
    weight_fq: Option<FakeQuantize>,
}

/// A GGML-prepared Linear converted to candle's quantized runtime: a `QMatMul` over exactly
/// the blocks its weight fake-quant produced.
#[derive(Clone, Debug)]
pub(crate) struct GgmlWeighted {
    pub qtensor: std::sync::Arc<candle_core::quantized::QTensor>,
    pub matmul: candle_core::quantized::QMatMul,
    pub ty: BlockType,
}

/// The bias as an integer engine adds it: `(acc + int_bias) * (x_scale * w_scale) +
/// float_bias`. fbgemm/x86 keep the whole bias in float; qnnpack rounds it to int32 in units
/// of `x_scale * w_scale` (PyTorch's qnnpack kernels do).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct IntBias {
    pub int: Vec<i32>,
    pub float: Vec<f32>,
}

impl IntBias {
    pub fn new(bias: &[f32], x_scale: f32, w: &QuantizedWeight, backend: Backend) -> Self {
        match backend {
            Backend::Qnnpack => IntBias {
                int: bias
                    .iter()
                    .enumerate()
                    .map(|(c, &b)| (b / (x_scale * w.scale(c))).round_ties_even() as i32)
                    .collect(),
                float: vec![0.0; bias.len()],
            },
            Backend::Fbgemm | Backend::X86 => IntBias {
                int: vec![0; bias.len()],
                float: bias.to_vec(),
            },
        }
    }
}

/// A conv or linear layer: weight and bias, a BatchNorm fused in for QAT, a fused ReLU, and
/// its stage with what it holds there (prepared: the weight fake-quant; converted: the int8
/// form).
#[derive(Clone, Debug)]
pub(crate) struct Weighted {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub bn: Option<BnCore>,
    pub bn_frozen: bool,
    pub relu: bool,
    /// `Some(groups)`: a transposed convolution's weight, `(in, out / groups, k...)`, whose
    /// output channels are along axis 1 (per group); `None`: output channels along axis 0.
    pub transposed: Option<usize>,
    pub common: Common<WeightQuant, IntForm>,
}

/// What a converted weighted layer holds: int8 kernels (eager) or candle's GGML runtime.
#[derive(Clone, Debug)]
pub(crate) enum IntForm {
    Int8(Box<IntState>),
    Ggml(GgmlWeighted),
}

/// The float op of a weighted layer: `op(x, w, bias)`.
type FloatOpFn<'a> = &'a dyn Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;

/// A weighted layer's weight fake-quant.
#[derive(Debug)]
pub(crate) struct WeightFq(pub Mutex<FakeQuantize>);

/// A torchao intx fake quantizer of a layer (its weight's or its input's).
#[derive(Debug)]
pub(crate) struct IntxFq(pub Mutex<IntxFakeQuantizer>);

impl Clone for IntxFq {
    fn clone(&self) -> Self {
        // A poisoned lock still holds a consistent quantizer: every write is one assignment.
        let fq = self.0.lock().unwrap_or_else(|p| p.into_inner());
        IntxFq(Mutex::new(fq.clone()))
    }
}

/// What a prepared weighted layer holds: PyTorch eager's weight fake-quant (its output
/// fake-quant is in [`Common`]), or a transformer scheme's input and weight quantizers
/// (outputs stay float).
#[derive(Clone, Debug)]
pub(crate) enum WeightQuant {
    Eager(WeightFq),
    Intx {
        weight: IntxFq,
        input: Option<IntxFq>,
    },
    Ggml {
        weight: BlockType,
        input: Option<VecDotType>,
    },
}

impl Clone for WeightFq {
    fn clone(&self) -> Self {
        // A poisoned lock still holds a consistent fake-quant: every write is one assignment.
        let fq = self.0.lock().unwrap_or_else(|p| p.into_inner());
        WeightFq(Mutex::new(fq.clone()))
    }
}

/// What a converted weighted layer holds: its int8 form and the weight fake-quant it was
/// converted from (`None` when loaded from an int8 file).
#[derive(Clone, Debug)]
pub(crate) struct IntState {
    pub int: IntWeighted,
    pub weight_fq: Option<WeightFq>,
}

/// The integer op on codes `xq`: requantized codes with `out`, else the f32 values they round
/// (the same kernel either way, so the fake-quant model's eval path and the converted model
/// agree bit for bit).
fn int_forward(
    op: IntOp,
    xq: &Tensor,
    input: &IoQParams,
    w: &QuantizedWeight,
    bias: &IntBias,
    out: Option<&Requant>,
) -> Result<Tensor> {
    let (s, z) = (input.scale, input.zero_point);
    match op {
        IntOp::Linear => crate::quantized::linear_int(xq, s, z, w, &bias.float, &bias.int, out),
        IntOp::Conv1d(c) => {
            crate::quantized::conv1d_int(xq, s, z, w, &bias.float, &bias.int, c, out)
        }
        IntOp::Conv2d(c) => {
            crate::quantized::conv2d_int(xq, s, z, w, &bias.float, &bias.int, c, out)
        }
        IntOp::ConvTranspose(c, rank) => {
            crate::quantized::conv_transpose_int(xq, s, z, w, &bias.float, &bias.int, c, rank, out)
        }
    }
}

impl Weighted {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Weighted {
            weight,
            bias,
            bn: None,
            bn_frozen: false,
            relu: false,
            transposed: None,
            common: Common::default(),
        }
    }

    /// A transposed convolution's weight `(in, out / groups, k...)` and bias.
    pub fn new_transposed(weight: Tensor, bias: Option<Tensor>, groups: usize) -> Self {
        Weighted {
            transposed: Some(groups),
            ..Weighted::new(weight, bias)
        }
    }

    /// The weight's per-channel axis and its length: axis 0 (the output channels), or axis
    /// 1 of a transposed convolution's weight (out / groups: PyTorch's and ONNX's axis for
    /// transposed-conv weights, one scale per column `j`, shared by the output channels
    /// `g * (out / groups) + j` of every group).
    pub fn weight_channels(&self) -> (usize, usize) {
        match self.transposed {
            Some(_) => (1, self.weight.dims()[1]),
            None => (0, self.weight.dims()[0]),
        }
    }

    /// The (BN-scaled) float weight quantized with symmetric `scales` (one, or one per
    /// [`Weighted::weight_channels`] channel), laid out for this layer's integer kernel.
    fn quantize_weight(
        &self,
        w: &Tensor,
        scales: &[f32],
        quant_min: i32,
        quant_max: i32,
    ) -> Result<QuantizedWeight> {
        match self.transposed {
            Some(groups) => {
                crate::quantized::quantize_transposed(w, scales, quant_min, quant_max, groups)
            }
            None => QuantizedWeight::quantize(w, scales, quant_min, quant_max),
        }
    }

    /// The weight fake-quant (prepared and converted layers).
    pub fn weight_fq(&self) -> Option<&Mutex<FakeQuantize>> {
        match &self.common.state {
            LayerState::Prepared(p) => match &p.extra {
                WeightQuant::Eager(w) => Some(&w.0),
                WeightQuant::Intx { .. } | WeightQuant::Ggml { .. } => None,
            },
            LayerState::Converted(c) => match &c.extra {
                IntForm::Int8(i) => i.weight_fq.as_ref().map(|w| &w.0),
                IntForm::Ggml(_) => None,
            },
            LayerState::Float | LayerState::Fused => None,
        }
    }

    /// The int8 form (converted layers).
    pub fn int(&self) -> Option<&IntWeighted> {
        match &self.common.converted()?.extra {
            IntForm::Int8(i) => Some(&i.int),
            IntForm::Ggml(_) => None,
        }
    }

    /// The GGML form (layers converted from a GGML scheme).
    pub fn ggml(&self) -> Option<&GgmlWeighted> {
        match &self.common.converted()?.extra {
            IntForm::Ggml(g) => Some(g),
            IntForm::Int8(_) => None,
        }
    }

    /// The transformer-scheme quantizers of a prepared layer (`None`: eager or not
    /// prepared).
    fn scheme_quant(&self) -> Option<&WeightQuant> {
        self.common
            .prepared()
            .map(|p| &p.extra)
            .filter(|q| !matches!(q, WeightQuant::Eager(_)))
    }

    /// A torchao / GGML prepared layer's forward: the input through its quantizer (per
    /// token, or in the weight type's vec-dot blocks), the weight through its own, then the
    /// float op; the output stays float.
    fn forward_scheme(&self, q: &WeightQuant, x: &Tensor, op: FloatOpFn) -> Result<Tensor> {
        self.common.check_input(x, "a prepared layer")?;
        let (xq, w) = match q {
            WeightQuant::Intx { weight, input } => {
                let xq = match input {
                    Some(i) => lock(&i.0)?.forward(x)?,
                    None => x.clone(),
                };
                (xq, lock(&weight.0)?.forward(&self.weight)?)
            }
            WeightQuant::Ggml { weight, input } => {
                let xq = match input {
                    Some(vd) => crate::ggml::fake_quantize_vec_dot(x, *vd)?,
                    None => x.clone(),
                };
                (xq, crate::ggml::fake_quantize_ggml(&self.weight, *weight)?)
            }
            WeightQuant::Eager(_) => {
                return Err(Error::state(
                    "eager layer on the transformer-scheme path",
                    "report this as a bug",
                ))
            }
        };
        let y = op(&xq, &w, self.bias.as_ref())?;
        let y = if self.relu {
            crate::kernels::relu::relu(&y)?
        } else {
            y
        };
        self.common.finish(y)
    }

    /// A GGML-converted layer's forward: candle's `QMatMul`, then the bias.
    fn forward_ggml(&self, g: &GgmlWeighted, x: &Tensor) -> Result<Tensor> {
        self.common.check_input(x, "a GGML-converted layer")?;
        if x.dtype() != candle_core::DType::F32 {
            return Err(Error::tensor(
                format!(
                    "a GGML-converted layer ({}) got a {:?} input",
                    g.ty.name(),
                    x.dtype()
                ),
                "feed f32 activations (candle's quantized matmul takes f32 inputs)",
            ));
        }
        let y = candle_core::Module::forward(&g.matmul, x)?;
        let y = match &self.bias {
            Some(b) => crate::kernels::channel::add_channel(&y, b, y.rank() - 1)?,
            None => y,
        };
        let y = if self.relu {
            crate::kernels::relu::relu(&y)?
        } else {
            y
        };
        self.common.finish(y)
    }

    pub fn out_channels(&self) -> usize {
        match self.transposed {
            Some(groups) => self.weight.dims()[1] * groups,
            None => self.weight.dims()[0],
        }
    }

    /// Frozen: eval mode with the weight's and the output's observers off and fake
    /// quantization on, where `forward` computes the value with the converted model's integer
    /// arithmetic.
    fn frozen(&self) -> Result<bool> {
        let settled = |f: &FakeQuantize| !f.observer_enabled() && f.fake_quant_enabled();
        let weight_settled = match self.weight_fq() {
            Some(m) => settled(&*lock(m)?),
            None => false,
        };
        let output_settled = match self.common.act_fq() {
            Some(a) => settled(&*lock(&a.fq)?),
            None => false,
        };
        Ok(!self.common.training && weight_settled && output_settled)
    }

    /// The weight the weight fake-quant sees: `weight * bn.weight / sqrt(running_var + eps)`
    /// when a BatchNorm is fused in, else the weight.
    fn scaled_weight(&self) -> Result<(Tensor, Option<Tensor>)> {
        match &self.bn {
            Some(_) if self.transposed.is_some() => Err(Error::state(
                "a transposed convolution with a live BatchNorm",
                "report this as a bug (QAT fusion of ConvTranspose and BatchNorm is refused)",
            )),
            Some(bn) => {
                let sf = bn.scale_factor()?;
                let mut shape = vec![1; self.weight.rank()];
                shape[0] = self.out_channels();
                Ok((self.weight.broadcast_mul(&sf.reshape(shape)?)?, Some(sf)))
            }
            None => Ok((self.weight.clone(), None)),
        }
    }

    /// The bias of the equivalent folded layer, as the integer model adds it.
    fn folded_bias(&self) -> Result<Vec<f32>> {
        let o = self.out_channels();
        let b = match &self.bias {
            Some(b) => b.detach(),
            None => Tensor::zeros(o, self.weight.dtype(), self.weight.device())?,
        };
        let b = match &self.bn {
            Some(bn) => {
                let rm = bn.running_mean.as_tensor().detach();
                let rv = bn.running_var.as_tensor().detach();
                let rsqrt = (rv + bn.config.eps)?.sqrt()?.recip()?;
                (((b - rm)? * rsqrt)? * bn.weight.detach())?.add(&bn.bias.detach())?
            }
            None => b,
        };
        Ok(b.to_vec1::<f32>()?)
    }

    /// The weight fake-quant's qparams when they are symmetric (zero point 0): the integer
    /// kernels take symmetric weights, as PyTorch's presets make them.
    fn symmetric_weight_scales(fq: &FakeQuantize) -> Option<Vec<f32>> {
        let qp = fq.qparams();
        qp.zero_points().iter().all(|&z| z == 0).then(|| match qp {
            QParams::PerTensor { scale, .. } => vec![scale],
            QParams::PerChannel { scale, .. } => scale,
        })
    }

    /// Runs the layer; `op(x, w, b)` is the convolution or matmul, plus the bias `b` when
    /// given (the QAT path with a live BN adds it itself, after rescaling), and `dim` the
    /// channel dim of its output. `kind` says which op it is: its integer form is used in eval
    /// mode to compute exactly what the converted model will (see below), and the ONNX
    /// exporter records it.
    pub fn forward(
        &self,
        x: &Tensor,
        dim: impl Fn(usize) -> usize,
        op: impl Fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
        kind: WeightedKind,
    ) -> Result<Tensor> {
        let int_op = match &kind {
            WeightedKind::Linear => Some(IntOp::Linear),
            WeightedKind::Conv { config, rank: 1 } => Some(IntOp::Conv1d(config)),
            WeightedKind::Conv { config, rank: 2 } => Some(IntOp::Conv2d(config)),
            WeightedKind::Conv { .. } => None,
            WeightedKind::ConvTranspose { config, rank } if *rank <= 2 => {
                Some(IntOp::ConvTranspose(config, *rank))
            }
            WeightedKind::ConvTranspose { .. } => None,
        };
        if let Some(q) = self.scheme_quant() {
            return self.forward_scheme(q, x, &op);
        }
        if let Some(g) = self.ggml() {
            return self.forward_ggml(g, x);
        }
        if let Some(int) = self.int() {
            let y = self.forward_int(int, x, int_op)?;
            self.common.trace(&[x], &y, || Op::IntWeighted {
                kind,
                weight: int.weight.to_record(),
                bias_float: int.bias.float.clone(),
                bias_int: int.bias.int.clone(),
                input: int.input,
                output: int.requant_io(),
                relu: self.relu,
            });
            return Ok(y);
        }
        self.common.check_input(x, "a float layer")?;
        let source = self.common.note_inputs(&[x])?;
        let add_bias = |y: Tensor| -> Result<Tensor> {
            match &self.bias {
                Some(b) => crate::kernels::channel::add_channel(&y, b, dim(y.rank())),
                None => Ok(y),
            }
        };
        let bn_training = self.common.training && !self.bn_frozen;
        let bias = self.bias.as_ref();
        let frozen = self.frozen()?;
        // A fused BatchNorm's op runs the ReLU, unless the frozen path below changes the
        // value between the two.
        let bn_relu = self.relu && !frozen && self.bn.is_some();
        let (y, w_fq) = match (&self.bn, self.weight_fq()) {
            (Some(bn), Some(wfq)) => {
                let (w, sf) = self.scaled_weight()?;
                let w = lock(wfq)?.forward(&w)?;
                let y = op(x, &w, None)?;
                let sf =
                    sf.ok_or_else(|| Error::state("no BN scale factor", "report this as a bug"))?;
                let y = crate::kernels::channel::div_channel(&y, &sf, dim(y.rank()))?;
                (bn.forward(&add_bias(y)?, bn_training, bn_relu)?, Some(w))
            }
            (Some(bn), None) => (
                bn.forward(&op(x, &self.weight, bias)?, bn_training, bn_relu)?,
                None,
            ),
            (None, Some(wfq)) => {
                let w = lock(wfq)?.forward(&self.weight)?;
                (op(x, &w, bias)?, Some(w))
            }
            (None, None) => (op(x, &self.weight, bias)?, None),
        };
        // Frozen (eval mode; weight and output observers off, fake quantization on), a prepared layer whose input
        // came from a fake-quant computes its value with the converted model's integer
        // arithmetic (exact accumulation, one f32 rescale, the engine's bias), keeping the
        // float path's gradient: the converted model then agrees with the fake-quant model
        // code for code. With observers on, qparams move every batch and the float path
        // (PyTorch's) is used.

        let y = match (frozen, source, int_op, self.weight_fq(), w_fq) {
            (true, Some(src), Some(iop), Some(wfq), Some(_)) => {
                let scales = Self::symmetric_weight_scales(&*lock(wfq)?);
                match scales {
                    Some(scales) => {
                        let (w_s, _) = self.scaled_weight()?;
                        let range = lock(wfq)?.quant_range();
                        let qw = self.quantize_weight(
                            &w_s.detach(),
                            &scales,
                            range.quant_min(),
                            range.quant_max(),
                        )?;
                        let input = src.io_qparams()?;
                        let xq = crate::quantized::quantize(
                            &x.detach(),
                            input.scale,
                            input.zero_point,
                            input.quant_min,
                            input.quant_max,
                        )?;
                        let backend = self.common.qconfig().map_or(Backend::X86, |q| q.backend);
                        let bias = IntBias::new(&self.folded_bias()?, input.scale, &qw, backend);
                        let exact = int_forward(iop, &xq, &input, &qw, &bias, None)?;
                        (exact + (&y - y.detach())?)?
                    }
                    None => y,
                }
            }
            _ => y,
        };
        let y = if self.relu && !bn_relu {
            crate::kernels::relu::relu(&y)?
        } else {
            y
        };
        if matches!(self.common.stage(), Stage::Float | Stage::Fused) && trace::active() {
            let (w, _) = self.scaled_weight()?;
            let bias = self.folded_bias()?;
            self.common.trace(&[x], &y, || Op::FloatWeighted {
                kind,
                weight: w.detach(),
                bias,
                relu: self.relu,
            });
        }
        self.common.finish(y)
    }

    fn forward_int(&self, int: &IntWeighted, x: &Tensor, int_op: Option<IntOp>) -> Result<Tensor> {
        self.common.check_input(x, "a converted layer")?;
        let op = int_op.ok_or_else(|| {
            Error::state(
                "converted layer without an integer op",
                "report this as a bug",
            )
        })?;
        int_forward(
            op,
            x,
            &int.input,
            &int.weight,
            &int.bias,
            Some(&int.requant),
        )
    }

    /// Stages the conversion of a prepared layer, changing nothing: the weight (BN folded as
    /// the QAT forward scales it) goes once more through (a copy of) its fake-quant, as
    /// PyTorch's convert calls `weight_fake_quant(weight)` (an enabled observer updates), and
    /// is quantized with the resulting qparams; the output keeps the range its fake-quant
    /// trained with. Both fake-quants must have seen data.
    pub fn stage_convert(&self, what: &str, supported: bool) -> Result<Staged> {
        match self.common.stage() {
            Stage::Converted => {
                return Err(Error::pass(
                    format!("{what} is already converted"),
                    "convert a prepared model once",
                ))
            }
            Stage::Float | Stage::Fused => return Ok(Staged::unchanged()),
            Stage::Prepared => {}
        }
        if let Some(q) = self.scheme_quant() {
            return self.stage_convert_scheme(what, q);
        }
        if !supported {
            return Err(Error::config(
                format!("{what} has no int8 kernel"),
                "keep it float with a `None` qconfig for its path or type (only Conv1d, \
                 Conv2d and Linear layers convert to int8)",
            ));
        }
        let (Some(wfq), Some(_)) = (self.weight_fq(), self.common.act_fq()) else {
            return Err(Error::state(
                "prepared layer without fake-quants",
                "report this as a bug",
            ));
        };
        let (w_s, _) = self.scaled_weight()?;
        let mut fq = lock(wfq)?.detached_copy()?;
        fq.forward(&w_s.detach())?;
        if !fq.is_calibrated() {
            return Err(Error::pass(
                format!(
                    "{what}'s weight fake-quant never observed the weight and its observer is \
                     disabled, so its scale is still the initial 1.0"
                ),
                "enable the observers (enable_observer) before convert, or run a forward with \
                 observers enabled before disabling them",
            ));
        }
        let scales = Self::symmetric_weight_scales(&fq).ok_or_else(|| {
            Error::config(
                format!("{what} has affine (zero point != 0) weight qparams"),
                "use symmetric weight quantization (PyTorch's presets do); int8 kernels take \
                 symmetric weights",
            )
        })?;
        let range = fq.quant_range();
        let weight =
            self.quantize_weight(&w_s.detach(), &scales, range.quant_min(), range.quant_max())?;
        let input = self.common.input_qparams(what)?[0];
        let backend = self.common.qconfig().map_or(Backend::X86, |q| q.backend);
        let bias = IntBias::new(&self.folded_bias()?, input.scale, &weight, backend);
        let out = self
            .common
            .output_qparams(what)?
            .ok_or_else(|| Error::state("no output fake-quant", "report this as a bug"))?;
        let requant = Requant::new(out.scale, out.zero_point, out.quant_min, out.quant_max)?
            .with_relu(self.relu);
        Ok(Staged::new(WeightedChange {
            int: IntWeighted {
                weight,
                bias,
                input,
                requant,
            },
            output: out,
            weight_fq: Some(fq),
        }))
    }

    /// Stages the conversion of a torchao / GGML prepared layer: GGML with quantized inputs
    /// becomes candle's `QMatMul` over the blocks its weight fake-quant produced; the
    /// others have no runtime here and are refused.
    fn stage_convert_scheme(&self, what: &str, q: &WeightQuant) -> Result<Staged> {
        match q {
            WeightQuant::Ggml {
                weight,
                input: Some(_),
            } => {
                if self.bn.is_some() {
                    return Err(Error::state(
                        "GGML-prepared layer with a fused BatchNorm",
                        "report this as a bug (prepare refuses it)",
                    ));
                }
                let qtensor = std::sync::Arc::new(crate::ggml::to_qtensor(
                    &self.weight.detach(),
                    *weight,
                )?);
                let matmul = candle_core::quantized::QMatMul::from_arc(qtensor.clone())?;
                Ok(Staged::new(GgmlWeighted {
                    qtensor,
                    matmul,
                    ty: *weight,
                }))
            }
            WeightQuant::Ggml { weight, input: None } => Err(Error::config(
                format!(
                    "{what} was prepared with a weight-only GGML scheme ({}): candle's                      quantized matmul quantizes its inputs, so the converted layer would not                      compute what the QAT model computed",
                    weight.name()
                ),
                "prepare Linears with QConfig::ggml (weights and inputs); keep                  ggml_weight_only for Embeddings",
            )),
            WeightQuant::Intx { .. } => Err(Error::config(
                format!(
                    "{what} was prepared with a torchao intx scheme, which has no integer                      kernel or GGUF type here"
                ),
                "deploy the prepared (fake-quant) model as it is, or train with a GGML                  scheme (QConfig::ggml) to convert and export GGUF; map the layer to None to                  keep it float",
            )),
            WeightQuant::Eager(_) => Err(Error::state(
                "eager layer on the transformer-scheme path",
                "report this as a bug",
            )),
        }
    }

    /// The saved form of a converted layer.
    pub fn int8_state(&self) -> Option<crate::record::Int8State> {
        let int = self.int()?;
        let (weight_codes, weight_shape, weight_scales) = match self.transposed {
            // In PyTorch's layout, as the layer's weight (the conversion cannot fail on a
            // weight this layer built).
            Some(groups) => crate::quantized::transposed_codes(&int.weight, groups).ok()?,
            None => (
                int.weight.codes().to_vec(),
                int.weight.shape().to_vec(),
                int.weight.scales().to_vec(),
            ),
        };
        Some(crate::record::Int8State {
            weight_codes,
            weight_shape,
            weight_scales,
            bias: int.bias.float.clone(),
            bias_int32: int.bias.int.clone(),
            inputs: vec![int.input],
            output: self.common.converted_io().and_then(|io| io.output),
        })
    }

    /// Checks a saved converted layer against this one (fused as when it was saved) and
    /// stages it, changing nothing.
    pub fn stage_int8_state(&self, what: &str, s: crate::record::Int8State) -> Result<Staged> {
        self.common.check_loadable(what)?;
        if s.weight_shape != self.weight.dims() {
            return Err(Error::state(
                format!(
                    "{what}: saved int8 weight of shape {:?}, the layer's is {:?}",
                    s.weight_shape,
                    self.weight.dims()
                ),
                "load a checkpoint saved from a model of the same architecture",
            ));
        }
        let (&[input], Some(out)) = (s.inputs.as_slice(), s.output) else {
            return Err(Error::state(
                format!(
                    "{what}: the saved layer has {} input qparams and {} output qparams, not \
                     one each",
                    s.inputs.len(),
                    usize::from(s.output.is_some())
                ),
                "load a checkpoint written by save_int8",
            ));
        };
        let o = self.out_channels();
        if s.bias.len() != o || s.bias_int32.len() != o {
            return Err(Error::state(
                format!(
                    "{what}: saved bias of {} values for {o} channels",
                    s.bias.len()
                ),
                "load a checkpoint saved from a model of the same architecture",
            ));
        }
        let weight = match self.transposed {
            Some(groups) => crate::quantized::transposed_from_codes(
                s.weight_codes,
                &s.weight_shape,
                &s.weight_scales,
                groups,
            )?,
            None => QuantizedWeight::from_codes(s.weight_codes, &s.weight_shape, &s.weight_scales)?,
        };
        let requant = Requant::new(out.scale, out.zero_point, out.quant_min, out.quant_max)?
            .with_relu(self.relu);
        Ok(Staged::new(WeightedChange {
            int: IntWeighted {
                weight,
                bias: IntBias {
                    int: s.bias_int32,
                    float: s.bias,
                },
                input,
                requant,
            },
            output: out,
            weight_fq: None,
        }))
    }

    /// Applies a change staged by [`Weighted::stage_convert`] or
    /// [`Weighted::stage_int8_state`].
    pub fn apply(&mut self, change: Staged) -> Result<()> {
        if change.holds::<GgmlWeighted>() {
            if let Some(g) = change.into_change::<GgmlWeighted>()? {
                self.common.set_converted(None, IntForm::Ggml(g));
            }
            return Ok(());
        }
        let Some(c) = change.into_change::<WeightedChange>()? else {
            return Ok(());
        };
        let io = ConvertedIo {
            inputs: vec![c.int.input],
            output: Some(c.output),
        };
        let weight_fq = c.weight_fq.map(|fq| WeightFq(Mutex::new(fq)));
        self.common.set_converted(
            Some(io),
            IntForm::Int8(Box::new(IntState {
                int: c.int,
                weight_fq,
            })),
        );
        Ok(())
    }

    pub fn prepare(&mut self, qconfig: Option<&QConfig>) -> Result<()> {
        if let Some(qc) = qconfig {
            self.check_scheme(qc)?;
        }
        let (axis, channels) = self.weight_channels();
        let transposed = self.transposed.is_some();
        self.common.prepare_with(
            qconfig,
            |qc| matches!(qc.scheme, Scheme::Eager).then_some(qc.activation),
            |qc| {
                Ok(match qc.scheme {
                    Scheme::Eager => {
                        let mut spec = qc.weight;
                        if transposed && spec.observer.config.qscheme.is_per_channel() {
                            spec.observer.config = spec.observer.config.with_ch_axis(axis);
                        }
                        let fq = FakeQuantize::with_channels(&spec, channels)?;
                        WeightQuant::Eager(WeightFq(Mutex::new(fq)))
                    }
                    Scheme::Intx { input, weight } => WeightQuant::Intx {
                        weight: IntxFq(Mutex::new(IntxFakeQuantizer::new(weight))),
                        input: input.map(|i| IntxFq(Mutex::new(IntxFakeQuantizer::new(i)))),
                    },
                    Scheme::Ggml { weight, input } => WeightQuant::Ggml {
                        weight,
                        input: input.then(|| weight.vec_dot_type()),
                    },
                })
            },
        )
    }

    /// Checks that a transformer scheme fits this layer's weight (a Linear's: 2-D), changing
    /// nothing: groups that divide in_features, a weight granularity (not per token), GGML
    /// blocks that tile the rows, no fused BatchNorm.
    pub fn check_scheme(&self, qc: &QConfig) -> Result<()> {
        let dims = self.weight.dims();
        if self.transposed.is_some() && !matches!(qc.scheme, Scheme::Eager) {
            return Err(Error::config(
                "a transformer scheme (torchao / GGML) on a transposed convolution",
                "give ConvTranspose layers an eager qconfig (QConfig::default_qat) or None",
            ));
        }
        match qc.scheme {
            Scheme::Eager => return Ok(()),
            Scheme::Intx { input, weight } => {
                if weight.granularity() == crate::fake_quant::IntxGranularity::PerToken {
                    return Err(Error::config(
                        "a per-token intx scheme on a weight (per token is for activations:                          torchao quantizes a Linear's input per token)",
                        "use per_group(g) or per_axis for the weight spec",
                    ));
                }
                weight.group_len(dims)?;
                if let Some(i) = input {
                    if i.granularity() != crate::fake_quant::IntxGranularity::PerToken {
                        return Err(Error::config(
                            "an input (activation) intx scheme that is not per token: the                              input's shape changes with the batch, so only per-token                              activations are supported (as torchao's presets)",
                            "use IntxSpec::int8_per_token_asym() (or a per_token builder)                              for the input",
                        ));
                    }
                    if i.range_learning() || !i.is_dynamic() {
                        return Err(Error::config(
                            "a static or range-learning per-token input scheme: per-token                              qparams belong to each token of each batch",
                            "keep per-token input schemes dynamic (torchao's default)",
                        ));
                    }
                }
            }
            Scheme::Ggml { weight, .. } => {
                let bs = weight.block_size();
                let last = dims.last().copied().unwrap_or(0);
                if dims.len() != 2 || last % bs != 0 {
                    return Err(Error::config(
                        format!(
                            "GGML {} needs in_features divisible by its block of {bs}, but the                              weight has shape {dims:?}",
                            weight.name()
                        ),
                        format!(
                            "use a type with smaller blocks (Q8_0/Q4_0: 32) for this layer                              by path, or keep it float (None){}",
                            if bs == 256 { "; K-quants need in_features % 256 == 0" } else { "" }
                        ),
                    ));
                }
            }
        }
        if self.bn.is_some() {
            return Err(Error::config(
                "a transformer scheme (torchao / GGML) on a layer with a fused BatchNorm",
                "give fused conv/linear + BatchNorm groups an eager qconfig",
            ));
        }
        Ok(())
    }

    /// The torchao intx quantizers of a prepared layer, with torchao's names.
    pub fn for_each_intx_quantizer(&mut self, f: &mut crate::model::IntxVisitor<'_>) -> Result<()> {
        let weight = self.weight.clone();
        if let LayerState::Prepared(p) = &mut self.common.state {
            if let WeightQuant::Intx { weight: w, input } = &mut p.extra {
                let wq = w.0.get_mut().unwrap_or_else(|p| p.into_inner());
                f("weight_fake_quantizer", wq, Some(&weight))?;
                if let Some(i) = input {
                    let iq = i.0.get_mut().unwrap_or_else(|p| p.into_inner());
                    f("activation_fake_quantizer", iq, None)?;
                }
            }
        }
        Ok(())
    }

    pub fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
        let mut v: Vec<_> = self
            .weight_fq()
            .map(|m| {
                let fq = m.lock().unwrap_or_else(|p| p.into_inner());
                ("weight".to_string(), fq.clone())
            })
            .into_iter()
            .collect();
        v.extend(self.common.fake_quants());
        v
    }

    pub fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
        let weight_fq = match &mut self.common.state {
            LayerState::Prepared(p) => match &mut p.extra {
                WeightQuant::Eager(w) => Some(&mut w.0),
                WeightQuant::Intx { .. } | WeightQuant::Ggml { .. } => None,
            },
            LayerState::Converted(c) => match &mut c.extra {
                IntForm::Int8(i) => i.weight_fq.as_mut().map(|w| &mut w.0),
                IntForm::Ggml(_) => None,
            },
            LayerState::Float | LayerState::Fused => None,
        };
        if let Some(m) = weight_fq {
            f("weight", m.get_mut().unwrap_or_else(|p| p.into_inner()));
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

/// The `QuantModule` methods every weighted layer (`Conv*`, `ConvTranspose*`, `Linear`) forwards
/// unchanged to its [`Weighted`] field `w`: expands inside such an `impl QuantModule` block.
macro_rules! weighted_module_methods {
    () => {
        fn stage(&self) -> Stage {
            self.w.common.stage()
        }
        fn set_training(&mut self, training: bool) {
            self.w.common.training = training;
        }
        fn prepare_qat(&mut self, qconfig: Option<&QConfig>) -> Result<()> {
            self.w.prepare(qconfig)
        }
        fn qconfig(&self) -> Option<&QConfig> {
            self.w.common.qconfig()
        }
        fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
            self.w.for_each_fake_quant(f)
        }
        fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
            self.w.fake_quants()
        }
        fn stage_int8_state(&self, state: Int8State) -> Result<Staged> {
            self.w.stage_int8_state(&self.kind(), state)
        }
        fn apply_staged(&mut self, change: Staged) -> Result<()> {
            self.w.apply(change)
        }
        fn int8_state(&self) -> Option<Int8State> {
            self.w.int8_state()
        }
        fn trace_key(&self) -> Option<usize> {
            Some(&self.w.common as *const _ as usize)
        }
        fn set_path(&mut self, path: &crate::model::ModulePath) {
            self.w.common.path = path.dotted();
        }
        fn float_params(&self) -> Vec<(&'static str, Tensor)> {
            self.w.float_params()
        }
        fn load_float_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
            self.w.load_float_params(params)
        }
        fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
            self.w.common.producer_keys()
        }
    };
}
pub(crate) use weighted_module_methods;
