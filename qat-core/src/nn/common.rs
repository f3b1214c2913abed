//! State every quantizable layer shares: stage, train flag, qconfig, output fake-quant, and
//! the fusion-order trace (a fused group's head and its identity placeholders).

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Tensor, TensorId};

use crate::error::{Error, Result};
use crate::fake_quant::FakeQuantize;
use crate::model::Stage;
use crate::qconfig::QConfig;

/// Locks a layer's mutex; a poisoned lock (a panic elsewhere mid-update) is an error.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>> {
    m.lock().map_err(|_| {
        Error::state(
            "a fake-quant's lock was poisoned by a panic in another thread",
            "rebuild or reload the model",
        )
    })
}

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
    pub act_fq: Option<Mutex<FakeQuantize>>,
    /// Set when this layer was absorbed into a group and now forwards its input unchanged.
    pub absorbed: Option<Placeholder>,
    /// Set when this layer heads a fused group.
    pub trace: Option<Arc<GroupTrace>>,
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
                .and_then(|m| m.lock().ok().map(|g| Mutex::new(g.clone()))),
            absorbed: self.absorbed.clone(),
            trace: self.trace.clone(),
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
            absorbed: None,
            trace: None,
        }
    }
}

impl Common {
    /// The identity forward of an absorbed layer.
    pub fn placeholder_forward(&self, p: &Placeholder, x: &Tensor) -> Result<Tensor> {
        if self.training {
            p.trace.check(p.pos, x)?;
        }
        Ok(x.clone())
    }

    /// Runs the output fake-quant (if prepared) and records the group head's output.
    pub fn finish(&self, y: Tensor) -> Result<Tensor> {
        let y = match &self.act_fq {
            Some(fq) => lock(fq)?.forward(&y)?,
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
            self.act_fq = Some(Mutex::new(qc.activation.build()?));
        }
        if qconfig.is_some() {
            self.stage = Stage::Prepared;
        }
        Ok(())
    }

    pub fn fake_quants(&self) -> Vec<(String, FakeQuantize)> {
        self.act_fq
            .iter()
            .filter_map(|m| m.lock().ok().map(|g| ("activation".to_string(), g.clone())))
            .collect()
    }

    pub fn for_each_fake_quant(&mut self, f: &mut dyn FnMut(&str, &mut FakeQuantize)) {
        if let Some(m) = self.act_fq.as_mut() {
            if let Ok(fq) = m.get_mut() {
                f("activation", fq);
            }
        }
    }
}
