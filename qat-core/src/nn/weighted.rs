//! What conv and linear layers share: weight and bias, an optional live BatchNorm (QAT
//! fusion, PyTorch's `_ConvBnNd._forward_approximate`), a fused ReLU, and the weight and
//! output fake-quants.

use std::sync::Mutex;

use candle_core::Tensor;

use super::batch_norm::BnCore;
use super::common::{lock, Common};
use super::conv::ConvConfig;
use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::hook as trace;
use crate::model::Stage;
use crate::qconfig::{Backend, QConfig};
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

#[derive(Debug)]
pub(crate) struct Weighted {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub bn: Option<BnCore>,
    pub bn_frozen: bool,
    pub relu: bool,
    pub weight_fq: Option<Mutex<FakeQuantize>>,
    pub common: Common,
    pub int: Option<IntWeighted>,
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
            int: self.int.clone(),
        }
    }
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
            weight_fq: None,
            common: Common::default(),
            int: None,
        }
    }

    pub fn out_channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Frozen: eval mode with the weight's and the output's observers off and fake
    /// quantization on, where `forward` computes the value with the converted model's integer
    /// arithmetic.
    fn frozen(&self) -> Result<bool> {
        let settled = |f: &FakeQuantize| !f.observer_enabled() && f.fake_quant_enabled();
        let weight_settled = match &self.weight_fq {
            Some(m) => settled(&*lock(m)?),
            None => false,
        };
        let output_settled = match &self.common.act_fq {
            Some(a) => settled(&*lock(&a.fq)?),
            None => false,
        };
        Ok(!self.common.training && weight_settled && output_settled)
    }

    /// The weight the weight fake-quant sees: `weight * bn.weight / sqrt(running_var + eps)`
    /// when a BatchNorm is fused in, else the weight.
    fn scaled_weight(&self) -> Result<(Tensor, Option<Tensor>)> {
        match &self.bn {
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
        };
        if let Some(int) = &self.int {
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
        let (y, w_fq) = match (&self.bn, &self.weight_fq) {
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

        let y = match (frozen, source, int_op, &self.weight_fq, w_fq) {
            (true, Some(src), Some(iop), Some(wfq), Some(_)) => {
                let scales = Self::symmetric_weight_scales(&*lock(wfq)?);
                match scales {
                    Some(scales) => {
                        let (w_s, _) = self.scaled_weight()?;
                        let range = lock(wfq)?.quant_range();
                        let qw = QuantizedWeight::quantize(
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
                        let backend = self.common.qconfig.map_or(Backend::X86, |q| q.backend);
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
        if matches!(self.common.stage, Stage::Float | Stage::Fused) && trace::active() {
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

    /// Converts a prepared layer: the weight (BN folded as the QAT forward scales it) goes
    /// once more through its fake-quant, as PyTorch's convert does (an enabled observer
    /// updates), and is quantized with the resulting qparams; the output keeps the range its
    /// fake-quant trained with.
    pub fn convert(&mut self, what: &str, supported: bool) -> Result<()> {
        match self.common.stage {
            Stage::Converted => {
                return Err(Error::pass(
                    format!("{what} is already converted"),
                    "convert a prepared model once",
                ))
            }
            Stage::Float | Stage::Fused => return Ok(()),
            Stage::Prepared => {}
        }
        if !supported {
            return Err(Error::config(
                format!("{what} has no int8 kernel"),
                "keep it float with a `None` qconfig for its path or type (only Conv1d, \
                 Conv2d and Linear layers convert to int8)",
            ));
        }
        let (Some(wfq), Some(_)) = (&self.weight_fq, &self.common.act_fq) else {
            return Err(Error::state(
                "prepared layer without fake-quants",
                "report this as a bug",
            ));
        };
        let (w_s, _) = self.scaled_weight()?;
        let mut fq = lock(wfq)?;
        fq.forward(&w_s.detach())?;
        let scales = Self::symmetric_weight_scales(&fq).ok_or_else(|| {
            Error::config(
                format!("{what} has affine (zero point != 0) weight qparams"),
                "use symmetric weight quantization (PyTorch's presets do); int8 kernels take \
                 symmetric weights",
            )
        })?;
        let range = fq.quant_range();
        drop(fq);
        let weight = QuantizedWeight::quantize(
            &w_s.detach(),
            &scales,
            range.quant_min(),
            range.quant_max(),
        )?;
        let input = self.common.input_qparams(what)?[0];
        let backend = self.common.qconfig.map_or(Backend::X86, |q| q.backend);
        let bias = IntBias::new(&self.folded_bias()?, input.scale, &weight, backend);
        let out = self
            .common
            .act_fq
            .as_ref()
            .map(|a| a.io_qparams())
            .transpose()?
            .ok_or_else(|| Error::state("no output fake-quant", "report this as a bug"))?;
        let requant = Requant::new(out.scale, out.zero_point, out.quant_min, out.quant_max)?
            .with_relu(self.relu);
        self.common.io = Some(super::common::ConvertedIo {
            inputs: vec![input],
            output: Some(out),
        });
        self.int = Some(IntWeighted {
            weight,
            bias,
            input,
            requant,
        });
        self.common.stage = Stage::Converted;
        Ok(())
    }

    /// The saved form of a converted layer.
    pub fn int8_state(&self) -> Option<crate::record::Int8State> {
        let int = self.int.as_ref()?;
        Some(crate::record::Int8State {
            weight_codes: int.weight.codes().to_vec(),
            weight_shape: int.weight.shape().to_vec(),
            weight_scales: int.weight.scales().to_vec(),
            bias: int.bias.float.clone(),
            bias_int32: int.bias.int.clone(),
            inputs: vec![int.input],
            output: self.common.io.as_ref().and_then(|io| io.output),
        })
    }

    /// Restores a converted layer (fused as when it was saved).
    pub fn load_int8_state(&mut self, what: &str, s: crate::record::Int8State) -> Result<()> {
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
        let (Some(&input), Some(out)) = (s.inputs.first(), s.output) else {
            return Err(Error::state(
                format!("{what}: the saved layer has no input or output qparams"),
                "load a checkpoint written by save_int8",
            ));
        };
        let weight =
            QuantizedWeight::from_codes(s.weight_codes, &s.weight_shape, &s.weight_scales)?;
        let requant = Requant::new(out.scale, out.zero_point, out.quant_min, out.quant_max)?
            .with_relu(self.relu);
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
        self.int = Some(IntWeighted {
            weight,
            bias: IntBias {
                int: s.bias_int32,
                float: s.bias,
            },
            input,
            requant,
        });
        self.common.io = Some(super::common::ConvertedIo {
            inputs: vec![input],
            output: Some(out),
        });
        self.common.stage = Stage::Converted;
        Ok(())
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

/// Implements `QuantModule` for a layer struct holding a `w: Weighted` field: `$base` and
/// `$suffix` make its PyTorch kind (`Conv` + `2d`), `int8` says whether it has an int8
/// kernel to convert to.
macro_rules! weighted_module {
    ($name:ident, $base:literal, $suffix:literal, int8: $int8:expr) => {
        impl $crate::model::QuantModule for $name {
            fn kind(&self) -> String {
                self.w.kind($base, $suffix)
            }
            fn type_name(&self) -> &'static str {
                stringify!($name)
            }
            fn stage(&self) -> $crate::model::Stage {
                self.w.common.stage
            }
            fn set_training(&mut self, training: bool) {
                self.w.common.training = training;
            }
            fn prepare_qat(
                &mut self,
                qconfig: Option<&$crate::qconfig::QConfig>,
            ) -> $crate::error::Result<()> {
                self.w.prepare(qconfig)
            }
            fn qconfig(&self) -> Option<&$crate::qconfig::QConfig> {
                self.w.common.qconfig.as_ref()
            }
            fn for_each_fake_quant(
                &mut self,
                f: &mut dyn FnMut(&str, &mut $crate::fake_quant::FakeQuantize),
            ) {
                self.w.for_each_fake_quant(f)
            }
            fn fake_quants(&self) -> Vec<(String, $crate::fake_quant::FakeQuantize)> {
                self.w.fake_quants()
            }
            fn set_bn_frozen(&mut self, frozen: bool) {
                self.w.bn_frozen = frozen;
            }
            fn float_params(&self) -> Vec<(&'static str, candle_core::Tensor)> {
                self.w.float_params()
            }
            fn load_float_params(
                &mut self,
                params: Vec<(String, candle_core::Tensor)>,
            ) -> $crate::error::Result<()> {
                self.w.load_float_params(params)
            }
            fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
                self.w.common.producer_keys()
            }
            fn has_int8_form(&self) -> bool {
                $int8
            }
            fn convert(&mut self) -> $crate::error::Result<()> {
                let kind = $crate::model::QuantModule::kind(self);
                self.w.convert(&kind, $int8)
            }
            fn int8_state(&self) -> Option<$crate::record::Int8State> {
                self.w.int8_state()
            }
            fn set_path(&mut self, path: &$crate::model::ModulePath) {
                self.w.common.path = path.dotted();
            }
            fn trace_key(&self) -> Option<usize> {
                Some(&self.w.common as *const _ as usize)
            }
            fn load_int8_state(
                &mut self,
                state: $crate::record::Int8State,
            ) -> $crate::error::Result<()> {
                let kind = $crate::model::QuantModule::kind(self);
                self.w.load_int8_state(&kind, state)
            }
        }
    };
}
pub(crate) use weighted_module;
