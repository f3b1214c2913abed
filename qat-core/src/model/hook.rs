//! The hook through which a layer describes what it computed: while a capture is active on
//! this thread, every layer notes its op (a [`crate::record::Op`] with the parameters it
//! used), which tensors went in and which came out, in the order the model's forward ran
//! them. The ONNX exporter reads these records; outside a capture, recording costs one
//! thread-local flag read. Captures nest: an inner capture records on its own and the outer
//! one resumes after it.

use std::cell::RefCell;

use candle_core::{Tensor, TensorId};

use crate::record::Op;

/// One recorded step.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    /// Identifies the layer (the address of its state) to find its module path.
    pub key: usize,
    pub inputs: Vec<TensorId>,
    pub output: TensorId,
    pub output_dims: Vec<usize>,
    pub op: Op,
}

thread_local! {
    /// The captures in progress on this thread, innermost last; layers record into the last.
    static TRACE: RefCell<Vec<Vec<Event>>> = const { RefCell::new(Vec::new()) };
}

/// Whether a trace is being recorded on this thread.
pub(crate) fn active() -> bool {
    TRACE.with(|t| !t.borrow().is_empty())
}

/// Records a step if a trace is active; `op` is only built then.
pub(crate) fn record<T>(key: &T, inputs: &[&Tensor], output: &Tensor, op: impl FnOnce() -> Op) {
    TRACE.with(|t| {
        if let Some(events) = t.borrow_mut().last_mut() {
            events.push(Event {
                key: key as *const T as usize,
                inputs: inputs.iter().map(|x| x.id()).collect(),
                output: output.id(),
                output_dims: output.dims().to_vec(),
                op: op(),
            });
        }
    })
}

/// Ends the capture it was made for when dropped (that capture's events are discarded if
/// [`capture`] did not take them), so that a forward that fails or panics leaves no capture
/// behind it, and an outer capture resumes.
struct Active {
    depth: usize,
}

impl Drop for Active {
    fn drop(&mut self) {
        TRACE.with(|t| t.borrow_mut().truncate(self.depth));
    }
}

/// Runs `f` with a capture active and returns what it recorded; afterwards the previous
/// capture (if any) records again, whatever `f` did.
pub(crate) fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<Event>) {
    let depth = TRACE.with(|t| {
        let mut t = t.borrow_mut();
        t.push(Vec::new());
        t.len() - 1
    });
    let active = Active { depth };
    let r = f();
    let events = TRACE.with(|t| {
        let mut t = t.borrow_mut();
        if t.len() == depth + 1 {
            t.pop().unwrap_or_default()
        } else {
            Vec::new()
        }
    });
    drop(active);
    (r, events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_switches_the_trace_off_even_after_a_panic() {
        let caught = std::panic::catch_unwind(|| capture(|| -> () { panic!("forward failed") }));
        assert!(caught.is_err());
        assert!(!active());
        let (_, events) = capture(|| assert!(active()));
        assert!(events.is_empty());
        assert!(!active());
    }

    #[test]
    fn a_nested_capture_leaves_the_outer_one_recording() {
        let a = Tensor::new(&[1f32], &candle_core::Device::Cpu).unwrap();
        let b = Tensor::new(&[2f32], &candle_core::Device::Cpu).unwrap();
        let op = || Op::Float(crate::record::FloatOp::Identity);
        let ((_, inner), outer) = capture(|| {
            record(&1u8, &[&a], &b, op);
            let inner = capture(|| record(&2u8, &[&b], &a, op));
            record(&3u8, &[&a], &a, op);
            inner
        });
        assert_eq!(inner.len(), 1);
        assert_eq!(outer.len(), 2);
        assert_eq!(outer[0].output, b.id());
        assert!(!active());
    }
}
