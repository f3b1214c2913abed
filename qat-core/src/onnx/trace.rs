//! The record the ONNX exporter reads: while a trace is active on this thread, every layer
//! notes what it computed (its op with the parameters it used, which tensors went in and
//! which came out), in the order the model's forward ran them. Outside a trace, recording
//! costs one thread-local flag read.

use std::cell::RefCell;

use candle_core::{Tensor, TensorId};

use crate::nn::ConvConfig;
use crate::provenance::IoQParams;
use crate::quantized::QuantizedWeight;

/// What a weighted layer multiplies with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightedKind {
    Linear,
    /// A convolution over `rank` spatial dims.
    Conv {
        config: ConvConfig,
        rank: usize,
    },
}

/// A float computation (on float inputs, or on dequantized codes inside a converted layer).
#[derive(Clone, Debug)]
pub(crate) enum FloatOp {
    Identity,
    Add,
    AddRelu,
    Mul,
    Cat(usize),
    Relu,
    Sigmoid,
    Tanh,
    /// Inference BatchNorm with the running statistics, optionally followed by ReLU.
    BatchNorm {
        weight: Vec<f32>,
        bias: Vec<f32>,
        mean: Vec<f32>,
        var: Vec<f32>,
        eps: f64,
        relu: bool,
    },
    MaxPool2d {
        kernel: usize,
        stride: usize,
    },
    Flatten(usize),
}

/// One layer's computation.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// QuantStub: float in, codes out.
    Quantize(IoQParams),
    /// A converted conv or linear layer: codes in, codes out.
    IntWeighted {
        kind: WeightedKind,
        weight: QuantizedWeight,
        /// Bias in float and in int32 units of `input.scale * weight scale` (the engine's).
        bias_float: Vec<f32>,
        bias_int: Vec<i32>,
        input: IoQParams,
        output: IoQParams,
        relu: bool,
    },
    /// A float conv or linear layer (BN folded with its running statistics).
    FloatWeighted {
        kind: WeightedKind,
        weight: Tensor,
        bias: Vec<f32>,
        relu: bool,
    },
    /// A converted float op: inputs dequantized with `inputs`, `op` applied, the result
    /// quantized with `output` (kept float when `None`: DeQuantStub).
    Dequantized {
        op: FloatOp,
        inputs: Vec<IoQParams>,
        output: Option<IoQParams>,
    },
    /// An op applied to codes as they are (max pool, flatten, ReLU as `max(q, zero point)`):
    /// the output keeps the input's qparams.
    OnCodes(FloatOp),
    /// A float op on float tensors.
    Float(FloatOp),
}

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
    static TRACE: RefCell<Option<Vec<Event>>> = const { RefCell::new(None) };
}

/// Whether a trace is being recorded on this thread.
pub(crate) fn active() -> bool {
    TRACE.with(|t| t.borrow().is_some())
}

/// Records a step if a trace is active; `op` is only built then.
pub(crate) fn record<T>(key: &T, inputs: &[&Tensor], output: &Tensor, op: impl FnOnce() -> Op) {
    TRACE.with(|t| {
        if let Some(events) = t.borrow_mut().as_mut() {
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

/// Switches the trace off when dropped, so that a forward that fails or panics leaves no
/// trace recording behind it.
struct Active;

impl Drop for Active {
    fn drop(&mut self) {
        TRACE.with(|t| t.borrow_mut().take());
    }
}

/// Runs `f` with a trace active and returns what it recorded; the trace is off again
/// afterwards, whatever `f` did.
pub(crate) fn capture<R>(f: impl FnOnce() -> R) -> (R, Vec<Event>) {
    TRACE.with(|t| *t.borrow_mut() = Some(Vec::new()));
    let _active = Active;
    let r = f();
    let events = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
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
}
