//! The neutral records a layer emits: its input and output qparams, its converted state
//! (what [`crate::checkpoint`] saves) and the op it computed (what the ONNX exporter reads
//! through [`crate::model::hook`]). Plain data: nothing here knows layers, kernels or files.

use candle_core::Tensor;

use crate::geometry::{ConvConfig, ConvTransposeConfig};

/// Scale, zero point and code range of an activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IoQParams {
    /// Step between codes.
    pub scale: f32,
    /// Code of 0.0.
    pub zero_point: i32,
    /// Lowest code the activation trained with.
    pub quant_min: i32,
    /// Highest code the activation trained with.
    pub quant_max: i32,
}

/// What a converted layer needs to run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Int8State {
    /// Weight codes (weighted layers), row-major.
    pub weight_codes: Vec<i8>,
    /// Weight shape.
    pub weight_shape: Vec<usize>,
    /// Weight scales (one, or one per output channel); zero points are 0.
    pub weight_scales: Vec<f32>,
    /// Float bias added after rescaling.
    pub bias: Vec<f32>,
    /// Int32 bias added to the sums (qnnpack's arithmetic; zeros otherwise).
    pub bias_int32: Vec<i32>,
    /// Qparams of each input.
    pub inputs: Vec<IoQParams>,
    /// Qparams of the output.
    pub output: Option<IoQParams>,
}

/// Int8 weight codes as a record: symmetric (zero point 0), one scale for the whole tensor or
/// one per output channel (axis 0).
#[derive(Clone, Debug, PartialEq)]
pub struct WeightCodes {
    /// Codes, row-major.
    pub codes: Vec<i8>,
    /// Shape; axis 0 is the output channel.
    pub shape: Vec<usize>,
    /// One scale, or one per output channel.
    pub scales: Vec<f32>,
}

impl WeightCodes {
    /// Output channels (axis 0).
    pub fn out_channels(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }
    /// Codes per output channel.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// What a weighted layer multiplies with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum WeightedKind {
    Linear,
    /// A convolution over `rank` spatial dims.
    Conv {
        config: ConvConfig,
        rank: usize,
    },
    /// A transposed convolution over `rank` spatial dims. Its converted weight is recorded in
    /// the direct convolution's layout the int8 kernel runs (see
    /// `crate::quantized::conv_transpose`).
    ConvTranspose {
        config: ConvTransposeConfig,
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
    /// RmsNorm over the last dim.
    RmsNorm {
        weight: Vec<f32>,
        eps: f64,
    },
    /// LayerNorm over the last dim (biased variance).
    LayerNorm {
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f64,
    },
    /// x * sigmoid(x).
    Silu,
    /// GELU, exact (erf) or with the tanh approximation.
    Gelu {
        tanh: bool,
    },
    /// min(max(x, 0), 6).
    Relu6,
    /// x * min(max(x + 3, 0), 6) / 6.
    Hardswish,
    /// min(max(x + 3, 0), 6) / 6.
    Hardsigmoid,
    /// x for x > 0, else `slope * x`.
    LeakyRelu(f64),
    /// x for x > 0, else `alpha * (exp(x) - 1)`.
    Elu(f64),
    /// Average pooling over (height, width) windows, zero padding counted in the divisor
    /// (PyTorch's default `count_include_pad=True`).
    AvgPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },
    /// Adaptive average pooling of an `input` (height, width) to an `output` one (PyTorch's
    /// bins).
    AdaptiveAvgPool2d {
        input: [usize; 2],
        output: [usize; 2],
    },
    /// Nearest-neighbour upsampling by integer (height, width) factors.
    UpsampleNearest([usize; 2]),
}

/// One layer's computation.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// QuantStub: float in, codes out.
    Quantize(IoQParams),
    /// A converted conv or linear layer: codes in, codes out.
    IntWeighted {
        kind: WeightedKind,
        weight: WeightCodes,
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
