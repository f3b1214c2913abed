//! Which fake-quant produced a tensor. While a prepared model runs, every output fake-quant
//! notes the tensors it produced, and every layer notes which fake-quant its input came from;
//! `convert` reads those notes to give each integer layer its input's scale and zero point
//! (candle tensors carry no quantization metadata).
//!
//! The notes live in a small per-thread ring of the most recent outputs: a layer looks its
//! input up right after the producer ran, so a short history is enough.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use candle_core::{Tensor, TensorId};

use crate::error::Result;
use crate::fake_quant::FakeQuantize;
use crate::qparams::QParams;
pub use crate::record::IoQParams;
use crate::sync::lock;

const HISTORY: usize = 1024;

/// An output fake-quant with an identity that tensors can point back to.
#[derive(Debug)]
pub(crate) struct ActFq {
    pub fq: Mutex<FakeQuantize>,
}

/// A shared handle on the fake-quant that produced a tensor.
pub(crate) type Source = Arc<ActFq>;

impl ActFq {
    pub fn new(fq: FakeQuantize) -> Source {
        Arc::new(ActFq { fq: Mutex::new(fq) })
    }

    /// The producer's current per-tensor scale and zero point and its code range.
    pub fn io_qparams(&self) -> Result<IoQParams> {
        let fq = lock(&self.fq)?;
        let r = fq.quant_range();
        let (scale, zero_point) = match fq.qparams() {
            QParams::PerTensor { scale, zero_point } => (scale, zero_point),
            QParams::PerChannel {
                scale, zero_point, ..
            } => (scale[0], zero_point[0]),
        };
        Ok(IoQParams {
            scale,
            zero_point,
            quant_min: r.quant_min(),
            quant_max: r.quant_max(),
        })
    }
}

thread_local! {
    static RECENT: RefCell<VecDeque<(TensorId, Weak<ActFq>)>> =
        RefCell::new(VecDeque::with_capacity(HISTORY));
}

/// Notes that `t` came out of `src`.
pub(crate) fn record(t: &Tensor, src: &Source) {
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() == HISTORY {
            r.pop_front();
        }
        r.push_back((t.id(), Arc::downgrade(src)));
    });
}

/// The fake-quant `t` came out of, if it was noted recently.
pub(crate) fn lookup(t: &Tensor) -> Option<Source> {
    let id = t.id();
    RECENT.with(|r| {
        r.borrow()
            .iter()
            .rev()
            .find(|(i, _)| *i == id)
            .and_then(|(_, w)| w.upgrade())
    })
}
