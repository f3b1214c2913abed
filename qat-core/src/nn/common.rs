//! State every quantizable layer shares: stage, train flag, qconfig, output fake-quant, and
//! the fusion-order trace (a fused group's head and its identity placeholders).

use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::hook as trace;
use crate::model::Stage;
use crate::provenance::{self, ActFq, IoQParams, Source};
use crate::qconfig::QConfig;
use crate::recent::{RecentIds, Registry};
use crate::record::{FloatOp, Op};
pub(crate) use crate::sync::lock;

/// A declared fused group: its members' paths, head first. Immutable, so the clones of a
/// model share it; what each instance saw lives in its own [`GroupMember`]s.
#[derive(Debug)]
pub(crate) struct GroupTrace {
    members: Vec<String>,
}

impl GroupTrace {
    pub fn new(members: Vec<String>) -> Arc<Self> {
        Arc::new(GroupTrace { members })
    }

    pub fn name(&self) -> String {
        format!("({})", self.members.join(", "))
    }
}

/// One member of a fused group in one model instance, used to check in training that the
/// forward applies the members one after another: the ids of the tensors it recently
/// produced (the head) or passed on (a placeholder). Each instance is registered, so that a
/// placeholder finds the output of its predecessor whichever thread ran it; a clone of a
/// layer gets a fresh member ([`Clone`] of [`Member`]), so clones never share these notes.
#[derive(Debug)]
pub(crate) struct GroupMember {
    group: Arc<GroupTrace>,
    pos: usize,
    seen: RecentIds,
}

/// Every live fused-group member of the process.
static MEMBERS: Registry<GroupMember> = Registry::new();

/// A handle on this instance's [`GroupMember`]; cloning it makes a fresh, empty member of the
/// same group and position (the clone of a layer belongs to the clone of the model).
#[derive(Debug)]
pub(crate) struct Member(Arc<GroupMember>);

impl Member {
    /// Member `pos` (0: the head) of `group`.
    pub fn new(group: Arc<GroupTrace>, pos: usize) -> Self {
        let m = Arc::new(GroupMember {
            group,
            pos,
            seen: RecentIds::default(),
        });
        MEMBERS.register(&m);
        Member(m)
    }

    /// Records a tensor the head produced.
    pub fn record(&self, t: &Tensor) {
        self.0.seen.note(t)
    }

    /// Checks that this placeholder got a tensor its predecessor in the group recently
    /// produced or passed on (in this model or a clone of it), then records it.
    pub fn check(&self, input: &Tensor) -> Result<()> {
        let m = &self.0;
        let Some(prev) = m.pos.checked_sub(1) else {
            return Err(Error::state(
                "the head of a fused group was checked as a placeholder",
                "report this as a bug",
            ));
        };
        let found = MEMBERS
            .find(|o| Arc::ptr_eq(&o.group, &m.group) && o.pos == prev && o.seen.contains(input));
        if found.is_none() {
            return Err(Error::FusionOrder {
                group: m.group.name(),
                member: m.group.members[m.pos].clone(),
                previous: m.group.members[prev].clone(),
            });
        }
        m.seen.note(input);
        Ok(())
    }
}

impl Clone for Member {
    fn clone(&self) -> Self {
        Member::new(self.0.group.clone(), self.0.pos)
    }
}

/// A layer absorbed into a fused group: an identity that checks the order of application.
#[derive(Clone, Debug)]
pub(crate) struct Placeholder {
    pub member: Member,
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
    pub trace: Option<Member>,
    /// Input and output qparams once converted.
    pub io: Option<ConvertedIo>,
    /// The module path, learnt when a pass walks the model (empty until then), to name the
    /// layer in its forward errors.
    pub path: String,
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
            // Fresh fusion-order notes: a clone checks its own forward.
            absorbed: self.absorbed.clone(),
            trace: self.trace.clone(),
            io: self.io.clone(),
            path: self.path.clone(),
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
            path: String::new(),
        }
    }
}

impl Common {
    /// Names this layer (its module path, once a pass learnt it) in an error of its forward.
    pub fn at_path(&self, e: Error) -> Error {
        match e {
            e @ Error::InModule { .. } => e,
            e if self.path.is_empty() => e,
            e => e.in_module(self.path.clone()),
        }
    }

    /// Runs `f` (a forward), naming this layer in its error.
    pub fn named<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        f().map_err(|e| self.at_path(e))
    }

    /// The identity forward of an absorbed layer.
    pub fn placeholder_forward(&self, p: &Placeholder, x: &Tensor) -> Result<Tensor> {
        if self.training && self.stage != Stage::Converted {
            p.member.check(x)?;
        }
        Ok(x.clone())
    }

    /// Notes where this layer's inputs came from (prepared layers only).
    pub fn note_inputs(&self, xs: &[&Tensor]) -> Result<Option<Source>> {
        if self.stage != Stage::Prepared {
            return Ok(None);
        }
        // Last time's producers are tried first; the lock is not held during the lookups.
        let hints = lock(&self.inputs)?.clone();
        let found: Vec<Option<Source>> = xs
            .iter()
            .enumerate()
            .map(|(i, x)| provenance::lookup(x, hints.get(i).and_then(Option::as_ref)))
            .collect();
        let first = found.first().cloned().flatten();
        // An input no live fake-quant produced is noted as unknown (convert then says so),
        // never left pointing at the producer of an earlier forward.
        *lock(&self.inputs)? = found;
        Ok(first)
    }

    /// A quantization-transparent op: `y` keeps the qparams of `x`.
    pub fn pass_through(&self, x: &Tensor, y: &Tensor) -> Result<()> {
        if let Some(src) = self.note_inputs(&[x])? {
            provenance::record(y, &src);
        }
        Ok(())
    }

    /// The noted sources of the inputs, for convert.
    pub fn input_qparams(&self, what: &str) -> Result<Vec<IoQParams>> {
        let inputs = lock(&self.inputs)?;
        let fix = "run the prepared model forward once before convert, and make sure the \
                   layer's input comes from a QuantStub, a quantized layer or FloatFunctional, \
                   or through candle-qat's MaxPool2d/Flatten (insert a QuantStub before it \
                   otherwise)";
        if inputs.is_empty() {
            return Err(Error::pass(
                format!(
                    "{what} has no record of which fake-quant produced its input (no prepared \
                     forward reached it), so its input qparams are unknown"
                ),
                fix,
            ));
        }
        if let Some(i) = inputs.iter().position(Option::is_none) {
            return Err(Error::region(
                format!(
                    "{what}: in the last prepared forward, input {i} was not the output of any \
                     live fake-quant (nor of a MaxPool2d/Flatten/ReLU after one), so its input \
                     qparams are unknown"
                ),
                fix,
            ));
        }
        inputs.iter().flatten().map(|s| s.io_qparams()).collect()
    }

    /// Converts the bookkeeping of a prepared layer: input qparams (`inputs` of them, from the
    /// noted sources) and output qparams (from its output fake-quant). Returns false for a
    /// layer that stays float (no qconfig).
    pub fn convert_io(&mut self, what: &str, inputs: bool) -> Result<bool> {
        match self.stage {
            Stage::Converted => {
                return Err(Error::pass(
                    format!("{what} is already converted"),
                    "convert a prepared model once",
                ))
            }
            Stage::Float | Stage::Fused => {
                if self.absorbed.is_some() {
                    self.stage = Stage::Converted;
                }
                return Ok(false);
            }
            Stage::Prepared => {}
        }
        let input_qparams = if inputs {
            self.input_qparams(what)?
        } else {
            Vec::new()
        };
        let output = match &self.act_fq {
            Some(a) => Some(a.io_qparams()?),
            None => None,
        };
        self.io = Some(ConvertedIo {
            inputs: input_qparams,
            output,
        });
        self.stage = Stage::Converted;
        Ok(true)
    }

    /// The saved form of a converted simple layer.
    pub fn int8_state(&self) -> Option<crate::record::Int8State> {
        self.io.as_ref().map(|io| crate::record::Int8State {
            inputs: io.inputs.clone(),
            output: io.output,
            ..Default::default()
        })
    }

    /// Restores a converted simple layer.
    pub fn load_int8_state(&mut self, s: &crate::record::Int8State) -> Result<()> {
        self.io = Some(ConvertedIo {
            inputs: s.inputs.clone(),
            output: s.output,
        });
        self.stage = Stage::Converted;
        Ok(())
    }

    /// Identities of the output fake-quant and of the noted input sources (see
    /// `QuantModule::producer_keys`).
    pub fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
        let key = |s: &Source| Arc::as_ptr(s) as usize;
        let inputs = self
            .inputs
            .lock()
            .map(|v| v.iter().map(|s| s.as_ref().map(key)).collect())
            .unwrap_or_default();
        (self.act_fq.as_ref().map(key), inputs)
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
        if let (true, Some(head)) = (self.training, &self.trace) {
            head.record(&y);
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
