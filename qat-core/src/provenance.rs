//! Which fake-quant produced a tensor. While a prepared model runs, every output fake-quant
//! notes the tensors it produced, and every layer notes which fake-quant its input came from;
//! `convert` reads those notes to give each integer layer its input's scale and zero point
//! (candle tensors carry no quantization metadata).
//!
//! Each producer keeps the ids of its own last outputs and a process-wide registry of the
//! live producers answers lookups (see [`crate::recent`]): a consumer finds its producer
//! whichever thread either ran on, a clone's layers find the clone's producers, and a lookup
//! that fails finds nothing rather than a stale producer.

use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::error::Result;
use crate::fake_quant::FakeQuantize;
use crate::qparams::QParams;
use crate::recent::{RecentIds, Registry};
pub use crate::record::IoQParams;
use crate::sync::lock;

/// Every live output fake-quant of the process.
static PRODUCERS: Registry<ActFq> = Registry::new();

/// An output fake-quant with an identity that tensors can point back to.
#[derive(Debug)]
pub(crate) struct ActFq {
    pub fq: Mutex<FakeQuantize>,
    /// Its recent outputs (and those of quantization-transparent ops applied to them).
    outputs: RecentIds,
}

/// A shared handle on the fake-quant that produced a tensor.
pub(crate) type Source = Arc<ActFq>;

impl ActFq {
    /// A producer, registered so that lookups from any thread find it.
    pub fn new(fq: FakeQuantize) -> Source {
        let src = Arc::new(ActFq {
            fq: Mutex::new(fq),
            outputs: RecentIds::default(),
        });
        PRODUCERS.register(&src);
        src
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

/// Notes that `t` came out of `src`.
pub(crate) fn record(t: &Tensor, src: &Source) {
    src.outputs.note(t)
}

/// Notes that `to` (a reshape of `from`) came from wherever `from` came from, if anywhere.
pub(crate) fn alias(from: &Tensor, to: &Tensor) {
    if let Some(src) = lookup(from, None) {
        record(to, &src);
    }
}

/// The fake-quant `t` came out of, if any of the live ones produced it recently; `hint` (the
/// producer found last time) is tried first.
pub(crate) fn lookup(t: &Tensor, hint: Option<&Source>) -> Option<Source> {
    match hint {
        Some(h) if h.outputs.contains(t) => Some(h.clone()),
        _ => PRODUCERS.find(|p| p.outputs.contains(t)),
    }
}
