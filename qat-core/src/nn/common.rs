//! State every quantizable layer shares: stage, train flag, qconfig, output fake-quant, and
//! the fusion-order trace (a fused group's head and its identity placeholders).

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::hook as trace;
use crate::model::{Stage, Staged};
use crate::provenance::{self, ActFq, IoQParams, Source};
use crate::qconfig::QConfig;
use crate::record::{FloatOp, Op};
pub(crate) use crate::sync::lock;

/// The record of one fused group, shared by its head and its placeholders, used to check in
/// training that the forward applies the members one after another.
#[derive(Debug)]
pub(crate) struct GroupTrace {
    members: Vec<String>,
    last: Mutex<Vec<Option<TensorId>>>,
}

impl GroupTrace {
    pub fn new(members: Vec<String>) -> Arc<Self> {
        let n = members.len();
        Arc::new(GroupTrace {
            members,
            last: Mutex::new(vec![None; n]),
        })
    }

    pub fn name(&self) -> String {
        format!("({})", self.members.join(", "))
    }

    /// Records the tensor member `pos` produced.
    pub fn record(&self, pos: usize, t: &Tensor) -> Result<()> {
        lock(&self.last)?[pos] = Some(t.id());
        Ok(())
    }

    /// Checks that member `pos` got what member `pos - 1` produced, then records it.
    pub fn check(&self, pos: usize, input: &Tensor) -> Result<()> {
        let mut last = lock(&self.last)?;
        if last[pos - 1] != Some(input.id()) {
            return Err(Error::FusionOrder {
                group: self.name(),
                member: self.members[pos].clone(),
                previous: self.members[pos - 1].clone(),
            });
        }
        last[pos] = Some(input.id());
        Ok(())
    }
}

/// A layer absorbed into a fused group: an identity that checks the order of application.
#[derive(Clone, Debug)]
pub(crate) struct Placeholder {
    pub trace: Arc<GroupTrace>,
    pub pos: usize,
}

/// What every layer carries.
#[derive(Debug)]
pub(crate) struct Common {
    pub stage: Stage,
    pub training: bool,
    pub qconfig: Option<QConfig>,
    /// The output fake-quant (prepared layers that have one).
    pub act_fq: Option<Source>,
    /// Where each input came from, noted by the last prepared forward.
    pub inputs: Mutex<Vec<Option<Source>>>,
    /// Set when this layer was absorbed into a group and now forwards its input unchanged.
    pub absorbed: Option<Placeholder>,
    /// Set when this layer heads a fused group.
    pub trace: Option<Arc<GroupTrace>>,
    /// Input and output qparams once converted.
    pub io: Option<ConvertedIo>,
}

/// A change to [`Common`] staged by a pass.
#[derive(Debug)]
pub(crate) enum CommonChange {
    /// An absorbed placeholder follows its group into the converted stage.
    Placeholder,
    /// Converted with these qparams.
    Converted(ConvertedIo),
}

/// The error of a fake-quant whose observer never saw data (`what` names it).
pub(crate) fn uncalibrated(what: &str) -> Error {
    Error::pass(
        format!(
            "{what} never observed a non-empty tensor, so its scale is still the initial 1.0 \
             and the int8 model would be wrong"
        ),
        "run calibration data through the prepared model (forwards on non-empty batches with \
         observers enabled) before convert",
    )
}

/// What a converted layer knows of its inputs and output.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConvertedIo {
    pub inputs: Vec<IoQParams>,
    pub output: Option<IoQParams>,
}

impl Clone for Common {
    fn clone(&self) -> Self {
        Common {
            stage: self.stage,
            training: self.training,
            qconfig: self.qconfig,
            act_fq: self
                .act_fq
                .as_ref()
                .and_then(|a| a.fq.lock().ok().map(|g| ActFq::new(g.clone()))),
            // A clone has its own fake-quants: its notes start over with its next forward.
            inputs: Mutex::new(Vec::new()),
            absorbed: self.absorbed.clone(),
            trace: self.trace.clone(),
            io: self.io.clone(),
        }
    }
}

impl Default for Common {
    fn default() -> Self {
        Common {
            stage: Stage::Float,
            training: true,
            qconfig: None,
            act_fq: None,
            inputs: Mutex::new(Vec::new()),
            absorbed: None,
            trace: None,
            io: None,
        }
    }
}

impl Common {
    /// The identity forward of an absorbed layer.
    pub fn placeholder_forward(&self, p: &Placeholder, x: &Tensor) -> Result<Tensor> {
        if self.training && self.stage != Stage::Converted {
            p.trace.check(p.pos, x)?;
        }
        Ok(x.clone())
    }

    /// Notes where this layer's inputs came from (prepared layers only).
    pub fn note_inputs(&self, xs: &[&Tensor]) -> Result<Option<Source>> {
        if self.stage != Stage::Prepared {
            return Ok(None);
        }
        let found: Vec<Option<Source>> = xs.iter().map(|x| provenance::lookup(x)).collect();
        let first = found.first().cloned().flatten();
        let mut inputs = lock(&self.inputs)?;
        if inputs.len() != found.len() {
            *inputs = vec![None; found.len()];
        }
        for (slot, f) in inputs.iter_mut().zip(found) {
            if f.is_some() {
                *slot = f;
            }
        }
        Ok(first)
    }

    /// A quantization-transparent op: `y` keeps the qparams of `x`.
    pub fn pass_through(&self, x: &Tensor, y: &Tensor) -> Result<()> {
        if let Some(src) = self.note_inputs(&[x])? {
            provenance::record(y, &src);
        }
        Ok(())
    }

    /// The noted sources of the inputs, for convert: each must have been noted and its
    /// producer must have seen data.
    pub fn input_qparams(&self, what: &str) -> Result<Vec<IoQParams>> {
        let inputs = lock(&self.inputs)?;
        if inputs.is_empty() || inputs.iter().any(|i| i.is_none()) {
            return Err(Error::pass(
                format!(
                    "{what} has no record of which fake-quant produced its input, so its input \
                     qparams are unknown"
                ),
                "run the prepared model forward once before convert, and make sure the layer's \
                 input comes from a QuantStub, a quantized layer or FloatFunctional, or through \
                 candle-qat's MaxPool2d/Flatten (insert a QuantStub before it otherwise)",
            ));
        }
        inputs
            .iter()
            .flatten()
            .map(|s| {
                if !lock(&s.fq)?.is_calibrated() {
                    return Err(uncalibrated(&format!(
                        "the fake-quant that produces {what}'s input"
                    )));
                }
                s.io_qparams()
            })
            .collect()
    }

    /// The output qparams from the output fake-quant (`None` without one), which must have
    /// seen data.
    pub fn output_qparams(&self, what: &str) -> Result<Option<IoQParams>> {
        match &self.act_fq {
            Some(a) => {
                if !lock(&a.fq)?.is_calibrated() {
                    return Err(uncalibrated(&format!("{what}'s output fake-quant")));
                }
                Ok(Some(a.io_qparams()?))
            }
            None => Ok(None),
        }
    }

    /// Stages the conversion of the bookkeeping of a layer, changing nothing: input qparams
    /// (`inputs` of them, from the noted sources) and output qparams (from its output
    /// fake-quant). Unchanged for a layer that stays float (no qconfig).
    pub fn stage_convert(&self, what: &str, inputs: bool) -> Result<Staged> {
        match self.stage {
            Stage::Converted => Err(Error::pass(
                format!("{what} is already converted"),
                "convert a prepared model once",
            )),
            Stage::Float | Stage::Fused if self.absorbed.is_some() => {
                Ok(Staged::new(CommonChange::Placeholder))
            }
            Stage::Float | Stage::Fused => Ok(Staged::unchanged()),
            Stage::Prepared => {
                let inputs = if inputs {
                    self.input_qparams(what)?
                } else {
                    Vec::new()
                };
                let output = self.output_qparams(what)?;
                Ok(Staged::new(CommonChange::Converted(ConvertedIo {
                    inputs,
                    output,
                })))
            }
        }
    }

    /// The saved form of a converted simple layer.
    pub fn int8_state(&self) -> Option<crate::record::Int8State> {
        self.io.as_ref().map(|io| crate::record::Int8State {
            inputs: io.inputs.clone(),
            output: io.output,
            ..Default::default()
        })
    }

    /// Checks and stages a saved converted simple layer, changing nothing.
    pub fn stage_int8_state(&self, what: &str, s: &crate::record::Int8State) -> Result<Staged> {
        if self.stage == Stage::Converted {
            return Err(Error::pass(
                format!("{what} is already converted"),
                "load int8 checkpoints into a float (fused) model",
            ));
        }
        if !s.weight_codes.is_empty() {
            return Err(Error::state(
                format!("the saved layer has int8 weights, but {what} has no weights"),
                "load a checkpoint saved from a model of the same architecture",
            ));
        }
        Ok(Staged::new(CommonChange::Converted(ConvertedIo {
            inputs: s.inputs.clone(),
            output: s.output,
        })))
    }

    /// Applies a change staged by [`Common::stage_convert`] or [`Common::stage_int8_state`].
    pub fn apply(&mut self, change: Staged) -> Result<()> {
        match change.into_change::<CommonChange>()? {
            None => {}
            Some(CommonChange::Placeholder) => self.stage = Stage::Converted,
            Some(CommonChange::Converted(io)) => {
                self.io = Some(io);
                self.stage = Stage::Converted;
            }
        }
        Ok(())
    }

    /// Checks that a converted layer got codes, or a float layer got floats.
    pub fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let converted = self.io.is_some();
        match (converted, x.dtype()) {
            (true, candle_core::DType::U8)
            | (false, candle_core::DType::F32)
            | (false, candle_core::DType::F16)
            | (false, candle_core::DType::BF16)
            | (false, candle_core::DType::F64) => Ok(()),
            (true, dt) => Err(Error::tensor(
                format!("{what} is converted and takes u8 codes, but got a {dt:?} tensor"),
                "feed converted layers the output of a converted layer; put a QuantStub where \
                 float inputs enter the quantized region",
            )),
            (false, dt) => Err(Error::tensor(
                format!("{what} computes in float but got a {dt:?} tensor (quantized codes?)"),
                "a float layer between converted layers cannot take codes: insert a \
                 DeQuantStub before it and a QuantStub after it, or quantize it too",
            )),
        }
    }

    /// A float op of a converted layer: dequantizes the input codes, applies `f`, quantizes
    /// the result with the output qparams (clamped to the trained range). The fake-quant
    /// model computes `f` on exactly these dequantized values, so both agree code for code.
    pub fn converted_float_op(
        &self,
        xs: &[&Tensor],
        what: &str,
        op: impl FnOnce() -> FloatOp,
        f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let io = self.io()?;
        if io.inputs.len() != xs.len() {
            return Err(Error::tensor(
                format!(
                    "{what} was converted for {} inputs but got {}",
                    io.inputs.len(),
                    xs.len()
                ),
                "call each FloatFunctional instance in one way only (one per call site)",
            ));
        }
        let mut floats = Vec::with_capacity(xs.len());
        for (x, q) in xs.iter().zip(&io.inputs) {
            self.check_input(x, what)?;
            floats.push(crate::quantized::dequantize(x, q.scale, q.zero_point)?);
        }
        let y = f(&floats)?;
        let y = match &io.output {
            Some(o) => {
                crate::quantized::quantize(&y, o.scale, o.zero_point, o.quant_min, o.quant_max)?
            }
            None => y,
        };
        self.trace(xs, &y, || Op::Dequantized {
            op: op(),
            inputs: io.inputs.clone(),
            output: io.output,
        });
        Ok(y)
    }

    /// Notes for the ONNX exporter (when it traces) that this layer computed `y` from `xs`.
    pub fn trace(&self, xs: &[&Tensor], y: &Tensor, op: impl FnOnce() -> Op) {
        trace::record(self, xs, y, op)
    }

    /// Notes a float layer's op for the ONNX exporter (float and fused stages only).
    pub fn trace_float(&self, xs: &[&Tensor], y: &Tensor, op: impl FnOnce() -> FloatOp) {
        if matches!(self.stage, Stage::Float | Stage::Fused) {
            trace::record(self, xs, y, || Op::Float(op()))
        }
    }

    /// The converted io (only after convert).
    pub fn io(&self) -> Result<&ConvertedIo> {
        self.io
            .as_ref()
            .ok_or_else(|| Error::state("layer has no converted qparams", "report this as a bug"))
    }

    /// Runs the output fake-quant (if prepared), notes the producer, and records the group
    /// head's output.
    pub fn finish(&self, y: Tensor) -> Result<Tensor> {
        let y = match &self.act_fq {
            Some(a) => {
                let y = lock(&a.fq)?.forward(&y)?;
                provenance::record(&y, a);
                y
            }
            None => y,
        };
        if let (true, Some(trace)) = (self.training, &self.trace) {
            trace.record(0, &y)?;
        }
        Ok(y)
    }

    /// Records the qconfig and builds the output fake-quant (`with_output`), checking order.
    pub fn prepare(&mut self, qconfig: Option<&QConfig>, with_output: bool) -> Result<()> {
        match self.stage {
            Stage::Prepared => {
                return Err(Error::pass(
                    "prepare_qat was already run on this layer",
                    "prepare a model once; load a checkpoint to start over",
                ))
            }
            Stage::Converted => {
                return Err(Error::pass(
                    "the layer is already converted",
                    "prepare_qat a float model, then convert",
                ))
            }
            Stage::Float | Stage::Fused => {}
        }
        self.qconfig = qconfig.copied();
        if let (Some(qc), true, None) = (qconfig, with_output, &self.absorbed) {
            self.act_fq = Some(ActFq::new(qc.activation.build()?));
        }
        if qconfig.is_some() {
            self.stage = Stage::Prepared;
        }
        Ok(())
    }

    pub fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
        self.act_fq
            .iter()
            .filter_map(|a| {
                a.fq.lock()
                    .ok()
                    .map(|g| ("activation".to_string(), g.clone()))
            })
            .collect()
    }

    pub fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
        if let Some(a) = self.act_fq.as_ref() {
            if let Ok(mut fq) = a.fq.lock() {
                f("activation", &mut fq);
            }
        }
    }
}
