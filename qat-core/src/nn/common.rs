//! State every quantizable layer shares: stage (with its qconfig, fake-quants and int8 form),
//! train flag, module path, and the fusion-order trace (a fused group's head and its identity
//! placeholders).

use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::hook as trace;
use crate::model::{Stage, Staged};
use crate::provenance::{self, ActFq, IoQParams, Source};
use crate::qconfig::{FakeQuantizeSpec, QConfig};
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

/// What every layer carries: its stage with what it holds there, the train flag, and its
/// place in a fused group. `P` and `C` are what a kind of layer adds when prepared and when
/// converted (a weighted layer's weight fake-quant and int8 weights; nothing for the others).
#[derive(Debug)]
pub(crate) struct Common<P = (), C = ()> {
    pub state: LayerState<P, C>,
    pub training: bool,
    /// Set when this layer was absorbed into a group and now forwards its input unchanged.
    pub absorbed: Option<Placeholder>,
    /// Set when this layer heads a fused group.
    pub trace: Option<Member>,
    /// The module path, learnt when a pass walks the model (empty until then), to name the
    /// layer in its forward errors.
    pub path: String,
}

/// A layer's stage and what it holds in it.
#[derive(Debug)]
pub(crate) enum LayerState<P = (), C = ()> {
    /// As built, or prepared with a `None` qconfig (it stays float).
    Float,
    /// Fused: the head of a group or an absorbed placeholder ([`Common::absorbed`]).
    Fused,
    /// Fake-quantized for training.
    Prepared(Prepared<P>),
    /// Integer arithmetic.
    Converted(Converted<C>),
}

/// What a prepared layer holds.
#[derive(Debug)]
pub(crate) struct Prepared<P = ()> {
    pub qconfig: QConfig,
    /// The output fake-quant (layers that have one).
    pub act_fq: Option<Source>,
    /// Where each input came from, noted by the last forward.
    pub inputs: Mutex<Vec<Option<Source>>>,
    /// What the kind of layer adds.
    pub extra: P,
}

/// What a converted layer holds.
#[derive(Clone, Debug)]
pub(crate) struct Converted<C = ()> {
    /// The qconfig it was prepared with (`None` when loaded from an int8 file).
    pub qconfig: Option<QConfig>,
    /// The output fake-quant it trained with (listed by summaries; never run again).
    pub act_fq: Option<Source>,
    /// Where each input came from, as noted by the last prepared forward (empty when loaded
    /// from an int8 file).
    pub inputs: Vec<Option<Source>>,
    /// Input and output qparams (`None` for an absorbed placeholder: an identity).
    pub io: Option<ConvertedIo>,
    /// What the kind of layer adds.
    pub extra: C,
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

/// A copy of an output fake-quant that shares nothing with it (a poisoned lock still holds a
/// consistent fake-quant: every write to it is one assignment).
fn copy_act_fq(a: &Source) -> Source {
    let fq = a.fq.lock().unwrap_or_else(|p| p.into_inner());
    ActFq::new(fq.clone())
}

impl<P: Clone, C: Clone> Clone for LayerState<P, C> {
    fn clone(&self) -> Self {
        match self {
            LayerState::Float => LayerState::Float,
            LayerState::Fused => LayerState::Fused,
            LayerState::Prepared(p) => LayerState::Prepared(Prepared {
                qconfig: p.qconfig,
                act_fq: p.act_fq.as_ref().map(copy_act_fq),
                // A clone has its own fake-quants: its notes start over with its next forward.
                inputs: Mutex::new(Vec::new()),
                extra: p.extra.clone(),
            }),
            LayerState::Converted(c) => LayerState::Converted(Converted {
                act_fq: c.act_fq.as_ref().map(copy_act_fq),
                // The noted sources are the original's fake-quants, not the clone's.
                inputs: Vec::new(),
                ..c.clone()
            }),
        }
    }
}

impl<P: Clone, C: Clone> Clone for Common<P, C> {
    fn clone(&self) -> Self {
        Common {
            state: self.state.clone(),
            training: self.training,
            absorbed: self.absorbed.clone(),
            trace: self.trace.clone(),
            path: self.path.clone(),
        }
    }
}

impl<P, C> Default for Common<P, C> {
    fn default() -> Self {
        Common {
            state: LayerState::Float,
            training: true,
            absorbed: None,
            trace: None,
            path: String::new(),
        }
    }
}

impl<P, C> Common<P, C> {
    /// The stage, as the passes report it.
    pub fn stage(&self) -> Stage {
        match &self.state {
            LayerState::Float => Stage::Float,
            LayerState::Fused => Stage::Fused,
            LayerState::Prepared(_) => Stage::Prepared,
            LayerState::Converted(_) => Stage::Converted,
        }
    }

    /// Marks the layer fused (the head of a group or one of its placeholders).
    pub fn mark_fused(&mut self) {
        self.state = LayerState::Fused;
    }

    /// The qconfig the layer was prepared with.
    pub fn qconfig(&self) -> Option<&QConfig> {
        match &self.state {
            LayerState::Prepared(p) => Some(&p.qconfig),
            LayerState::Converted(c) => c.qconfig.as_ref(),
            LayerState::Float | LayerState::Fused => None,
        }
    }

    /// The prepared state (`None` in other stages).
    pub fn prepared(&self) -> Option<&Prepared<P>> {
        match &self.state {
            LayerState::Prepared(p) => Some(p),
            _ => None,
        }
    }

    /// The converted state (`None` in other stages).
    pub fn converted(&self) -> Option<&Converted<C>> {
        match &self.state {
            LayerState::Converted(c) => Some(c),
            _ => None,
        }
    }

    /// The qparams a converted layer runs with (`None` unless converted, and for an absorbed
    /// placeholder).
    pub fn converted_io(&self) -> Option<&ConvertedIo> {
        self.converted().and_then(|c| c.io.as_ref())
    }

    /// The output fake-quant (prepared and converted layers that have one).
    pub fn act_fq(&self) -> Option<&Source> {
        match &self.state {
            LayerState::Prepared(p) => p.act_fq.as_ref(),
            LayerState::Converted(c) => c.act_fq.as_ref(),
            LayerState::Float | LayerState::Fused => None,
        }
    }

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
        if self.training && self.stage() != Stage::Converted {
            p.member.check(x)?;
        }
        Ok(x.clone())
    }

    /// Notes where this layer's inputs came from (prepared layers only).
    pub fn note_inputs(&self, xs: &[&Tensor]) -> Result<Option<Source>> {
        let Some(prepared) = self.prepared() else {
            return Ok(None);
        };
        // Last time's producers are tried first; the lock is not held during the lookups.
        let hints = lock(&prepared.inputs)?.clone();
        let found: Vec<Option<Source>> = xs
            .iter()
            .enumerate()
            .map(|(i, x)| provenance::lookup(x, hints.get(i).and_then(Option::as_ref)))
            .collect();
        let first = found.first().cloned().flatten();
        // An input no live fake-quant produced is noted as unknown (convert then says so),
        // never left pointing at the producer of an earlier forward.
        *lock(&prepared.inputs)? = found;
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
        let inputs = match self.prepared() {
            Some(p) => lock(&p.inputs)?.clone(),
            None => Vec::new(),
        };
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
        match self.act_fq() {
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
        match self.stage() {
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

    /// Checks that the layer can take a saved converted state (not converted yet).
    pub fn check_loadable(&self, what: &str) -> Result<()> {
        if self.stage() == Stage::Converted {
            return Err(Error::pass(
                format!("{what} is already converted"),
                "load int8 checkpoints into a float (fused) model",
            ));
        }
        Ok(())
    }

    /// Identities of the output fake-quant and of the noted input sources (see
    /// `QuantModule::producer_keys`): a prepared layer's notes, or those a converted layer
    /// kept from the forward before convert.
    pub fn producer_keys(&self) -> (Option<usize>, Vec<Option<usize>>) {
        let key = |s: &Source| Arc::as_ptr(s) as usize;
        let keys = |v: &[Option<Source>]| v.iter().map(|s| s.as_ref().map(key)).collect();
        let inputs = match &self.state {
            LayerState::Prepared(p) => p.inputs.lock().map(|v| keys(&v)).unwrap_or_default(),
            LayerState::Converted(c) => keys(&c.inputs),
            LayerState::Float | LayerState::Fused => Vec::new(),
        };
        (self.act_fq().map(key), inputs)
    }

    /// The layer converted with `io` and the kind's `extra`: the qconfig and output fake-quant
    /// it was prepared with stay for summaries, and the noted input sources for the
    /// producers a checkpoint records.
    pub fn set_converted(&mut self, io: Option<ConvertedIo>, extra: C) {
        let (qconfig, act_fq, inputs) = match std::mem::replace(&mut self.state, LayerState::Float)
        {
            LayerState::Prepared(p) => (
                Some(p.qconfig),
                p.act_fq,
                p.inputs.into_inner().unwrap_or_else(|e| e.into_inner()),
            ),
            _ => (None, None, Vec::new()),
        };
        self.state = LayerState::Converted(Converted {
            qconfig,
            act_fq,
            inputs,
            io,
            extra,
        });
    }

    /// Checks that a converted layer got codes, or a float layer got floats.
    pub fn check_input(&self, x: &Tensor, what: &str) -> Result<()> {
        let converted = self.converted_io().is_some();
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
        if matches!(self.stage(), Stage::Float | Stage::Fused) {
            trace::record(self, xs, y, || Op::Float(op()))
        }
    }

    /// The converted io (only after convert).
    pub fn io(&self) -> Result<&ConvertedIo> {
        self.converted_io()
            .ok_or_else(|| Error::state("layer has no converted qparams", "report this as a bug"))
    }

    /// Runs the output fake-quant (if prepared), notes the producer, and records the group
    /// head's output.
    pub fn finish(&self, y: Tensor) -> Result<Tensor> {
        let y = match self.prepared().and_then(|p| p.act_fq.as_ref()) {
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

    /// Prepares the layer for `qconfig` (`None`: it stays float): `output` says which spec
    /// its output fake-quant gets (none for an absorbed placeholder), `extra` builds what the
    /// kind of layer adds. Checks the order of passes; an error changes nothing.
    pub fn prepare_with(
        &mut self,
        qconfig: Option<&QConfig>,
        output: impl FnOnce(&QConfig) -> Option<FakeQuantizeSpec>,
        extra: impl FnOnce(&QConfig) -> Result<P>,
    ) -> Result<()> {
        match self.stage() {
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
        let Some(qc) = qconfig else {
            return Ok(());
        };
        let act_fq = match (output(qc), &self.absorbed) {
            (Some(spec), None) => Some(ActFq::new(spec.build()?)),
            _ => None,
        };
        let extra = extra(qc)?;
        self.state = LayerState::Prepared(Prepared {
            qconfig: *qc,
            act_fq,
            inputs: Mutex::new(Vec::new()),
            extra,
        });
        Ok(())
    }

    pub fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
        self.act_fq()
            .map(|a| {
                let fq = a.fq.lock().unwrap_or_else(|p| p.into_inner());
                ("activation".to_string(), fq.clone())
            })
            .into_iter()
            .collect()
    }

    pub fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
        if let Some(a) = self.act_fq() {
            let mut fq = a.fq.lock().unwrap_or_else(|p| p.into_inner());
            f("activation", &mut fq);
        }
    }
}

impl Common {
    /// Records the qconfig and builds the output fake-quant (`with_output`) of a layer that
    /// adds nothing of its own.
    pub fn prepare(&mut self, qconfig: Option<&QConfig>, with_output: bool) -> Result<()> {
        // A layer with nothing of its own to quantize stays float under a torchao / GGML
        // scheme (see `qconfig::Scheme`).
        let qconfig = qconfig.filter(|qc| matches!(qc.scheme, crate::qconfig::Scheme::Eager));
        self.prepare_with(
            qconfig,
            |qc| with_output.then_some(qc.activation),
            |_| Ok(()),
        )
    }

    /// The saved form of a converted simple layer.
    pub fn int8_state(&self) -> Option<crate::record::Int8State> {
        self.converted_io().map(|io| crate::record::Int8State {
            inputs: io.inputs.clone(),
            output: io.output,
            ..Default::default()
        })
    }

    /// Checks and stages a saved converted simple layer, changing nothing.
    pub fn stage_int8_state(&self, what: &str, s: &crate::record::Int8State) -> Result<Staged> {
        self.check_loadable(what)?;
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
            Some(CommonChange::Placeholder) => self.set_converted(None, ()),
            Some(CommonChange::Converted(io)) => self.set_converted(Some(io), ()),
        }
        Ok(())
    }
}
