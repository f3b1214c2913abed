//! Average pooling: AvgPool2d and AdaptiveAvgPool2d (MobileNet's and ResNet's global average
//! pool). Their int8 output keeps their input's scale and zero point, so they own no
//! observer; [`AvgPoolOutput`] says what the QAT model does with the pooled values.

use candle_core::Tensor;

use super::common::{lock, Common, CommonChange, ConvertedIo};
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::model::{Stage, Staged};
use crate::provenance;
use crate::qconfig::Backend;
use crate::qconfig::QConfig;
use crate::quantized::{avg_pool2d_codes, PoolBin, PoolRounding};
use crate::record::{FloatOp, Op};

/// How an average pool's output is quantized. Either way its int8 output keeps its input's
/// qparams and the pool owns no observer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AvgPoolOutput {
    /// The QAT model fake-quantizes the pooled values on the input's grid (the scale, zero
    /// point and range the input's fake-quant has now, without observing them: PT2E's
    /// shared qparams); the converted pool dequantizes, averages and quantizes with those
    /// qparams. The int8 model equals the fake-quant model code for code.
    #[default]
    SharedFakeQuant,
    /// PyTorch's eager mode: the QAT model leaves the pooled values unrounded, and the
    /// converted pool runs PyTorch's int8 kernel (codes summed exactly, one rounding half to
    /// even). Reproduces PyTorch's int8 model; its int8 output then differs from its own
    /// fake-quant output by the rounding the QAT model never saw.
    PyTorchEager,
}

/// The forward both pools share: `float` computes the pooling on floats, `bins` gives the
/// windows for an input's (height, width) and whether PyTorch's QNNPACK engine would run
/// them (else its own kernel), `op` the record of what ran.
fn pool_forward(
    c: &Common,
    output: AvgPoolOutput,
    x: &Tensor,
    what: &str,
    op: impl Fn() -> FloatOp,
    float: impl Fn(&Tensor) -> Result<Tensor>,
    bins: impl Fn(usize, usize) -> Result<Windows>,
) -> Result<Tensor> {
    if let Some(io) = c.converted_io() {
        c.check_input(x, what)?;
        let (h, w) = spatial(x, what)?;
        if output == AvgPoolOutput::SharedFakeQuant {
            return c.converted_float_op(&[x], what, &op, |v| float(&v[0]));
        }
        let q = *io.inputs.first().ok_or_else(|| {
            Error::state(
                format!("{what} has no input qparams"),
                "report this as a bug",
            )
        })?;
        let (rows, cols, qnnpack_runs) = bins(h, w)?;
        let backend = c.converted().and_then(|cv| cv.qconfig).map(|qc| qc.backend);
        let rounding = match backend {
            Some(Backend::Qnnpack) if qnnpack_runs => PoolRounding::Qnnpack { scale: q.scale },
            _ => PoolRounding::Fbgemm,
        };
        let y = avg_pool2d_codes(
            x,
            &rows,
            &cols,
            q.zero_point,
            (q.quant_min, q.quant_max),
            rounding,
        )?;
        c.trace(&[x], &y, || Op::Dequantized {
            op: op(),
            inputs: vec![q],
            output: Some(q),
        });
        return Ok(y);
    }
    c.check_input(x, what)?;
    spatial(x, what)?;
    let y = float(x)?;
    c.trace_float(&[x], &y, &op);
    let Some(src) = c.note_inputs(&[x])? else {
        return Ok(y);
    };
    let y = match output {
        AvgPoolOutput::SharedFakeQuant if lock(&src.fq)?.fake_quant_enabled() => {
            let q = src.io_qparams()?;
            crate::fake_quant::fake_quantize_per_tensor(
                &y,
                q.scale,
                q.zero_point,
                q.quant_min,
                q.quant_max,
            )?
        }
        _ => y,
    };
    provenance::record(&y, &src);
    Ok(y)
}

/// Staged conversion of a pool: its input's qparams in, the same out.
fn pool_stage_convert(c: &Common, what: &str) -> Result<Staged> {
    if c.stage() != Stage::Prepared {
        return c.stage_convert(what, true);
    }
    let inputs = c.input_qparams(what)?;
    let output = inputs.first().copied();
    Ok(Staged::new(CommonChange::Converted(ConvertedIo {
        inputs,
        output,
    })))
}

/// The windows along the height and the width, and whether PyTorch's QNNPACK engine runs
/// them with its own average pooling.
type Windows = (Vec<PoolBin>, Vec<PoolBin>, bool);

/// The (height, width) of an `(N, C, H, W)` input.
fn spatial(x: &Tensor, what: &str) -> Result<(usize, usize)> {
    match x.dims() {
        &[_, _, h, w] => Ok((h, w)),
        d => Err(Error::tensor(
            format!("{what} got an input of shape {d:?}"),
            format!("feed {what} a (N, C, H, W) tensor"),
        )),
    }
}

/// Mean over each bin pair, through candle ops (gradients flow): the general adaptive pool.
fn binned_mean(x: &Tensor, rows: &[PoolBin], cols: &[PoolBin]) -> Result<Tensor> {
    let mut out_rows = Vec::with_capacity(rows.len());
    for r in rows {
        let band = x.narrow(2, r.start, r.end - r.start)?;
        let cells = cols
            .iter()
            .map(|c| {
                band.narrow(3, c.start, c.end - c.start)?
                    .mean_keepdim((2, 3))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        out_rows.push(Tensor::cat(&cells, 3)?);
    }
    Ok(Tensor::cat(&out_rows, 2)?)
}

/// Sliding-window average with zero padding counted: a depthwise convolution with weights
/// `1 / (kh * kw)` on CPU f32 (the fused kernel, whose backward handles any stride), candle's
/// pooling of the zero-padded input elsewhere.
fn sliding_mean(
    x: &Tensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
) -> Result<Tensor> {
    let c = x.dim(1)?;
    let w = Tensor::full(
        1.0f32 / (kernel[0] * kernel[1]) as f32,
        (c, 1, kernel[0], kernel[1]),
        x.device(),
    )?;
    if crate::kernels::conv::supported(x, &w) {
        let p = crate::kernels::conv::Conv2dParams {
            pad: padding,
            stride,
            dilation: [1, 1],
            groups: c,
        };
        return Ok(crate::kernels::conv::conv2d(x, &w, p)?);
    }
    let x = x
        .pad_with_zeros(2, padding[0], padding[0])?
        .pad_with_zeros(3, padding[1], padding[1])?;
    Ok(x.avg_pool2d_with_stride((kernel[0], kernel[1]), (stride[0], stride[1]))?)
}

/// 2-D average pooling (PyTorch's `nn.AvgPool2d` with `ceil_mode=False`,
/// `count_include_pad=True`, no divisor override). Quantization-transparent: no observer;
/// see [`AvgPoolOutput`] for its QAT and int8 forms.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::AvgPool2d;
/// let x = Tensor::arange(0f32, 16.0, &Device::Cpu)?.reshape((1, 1, 4, 4))?;
/// let y = AvgPool2d::new([2, 2], [2, 2], [0, 0])?.forward(&x)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![2.5, 4.5, 10.5, 12.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct AvgPool2d {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    output: AvgPoolOutput,
    pub(crate) common: Common,
}

impl AvgPool2d {
    /// Pooling over `kernel` (height, width) windows every `stride`, with `padding` zeros on
    /// each side (at most half the kernel, as PyTorch requires).
    pub fn new(kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2]) -> Result<Self> {
        if kernel.contains(&0) || stride.contains(&0) {
            return Err(Error::config(
                format!("AvgPool2d with kernel {kernel:?} and stride {stride:?}"),
                "use kernel sizes and strides >= 1",
            ));
        }
        if padding[0] > kernel[0] / 2 || padding[1] > kernel[1] / 2 {
            return Err(Error::config(
                format!("AvgPool2d padding {padding:?} for kernel {kernel:?}"),
                "use a padding of at most half the kernel size (PyTorch's rule)",
            ));
        }
        Ok(AvgPool2d {
            kernel,
            stride,
            padding,
            output: AvgPoolOutput::default(),
            common: Common::default(),
        })
    }
    /// The same pool with `output` as its quantization mode.
    pub fn with_output(mut self, output: AvgPoolOutput) -> Self {
        self.output = output;
        self
    }
    /// Its quantization mode.
    pub fn output(&self) -> AvgPoolOutput {
        self.output
    }
    fn op(&self) -> FloatOp {
        FloatOp::AvgPool2d {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        }
    }
    fn bins(&self, h: usize, w: usize) -> Result<Windows> {
        let axis = |len, i: usize| {
            PoolBin::sliding(len, self.kernel[i], self.stride[i], self.padding[i]).ok_or_else(
                || {
                    Error::tensor(
                        format!(
                            "AvgPool2d's {:?} window (padding {:?}) does not fit a {h}x{w} input",
                            self.kernel, self.padding
                        ),
                        "feed a larger input or use a smaller kernel",
                    )
                },
            )
        };
        // QNNPACK runs every quint8 avg_pool2d without ceil_mode.
        Ok((axis(h, 0)?, axis(w, 1)?, true))
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        pool_forward(
            &self.common,
            self.output,
            x,
            "AvgPool2d",
            || self.op(),
            |x| {
                let (h, w) = spatial(x, "AvgPool2d")?;
                self.bins(h, w)?;
                sliding_mean(x, self.kernel, self.stride, self.padding)
            },
            |h, w| self.bins(h, w),
        )
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<Staged> {
        pool_stage_convert(&self.common, "AvgPool2d")
    }
}

/// Adaptive 2-D average pooling to a fixed (height, width) output (PyTorch's
/// `nn.AdaptiveAvgPool2d`; `[1, 1]` is MobileNet's and ResNet's global average pool).
/// Quantization-transparent: no observer; see [`AvgPoolOutput`] for its QAT and int8 forms.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::AdaptiveAvgPool2d;
/// let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((1, 2, 2, 2))?;
/// let y = AdaptiveAvgPool2d::new([1, 1])?.forward(&x)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.5, 5.5]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct AdaptiveAvgPool2d {
    output_size: [usize; 2],
    output: AvgPoolOutput,
    pub(crate) common: Common,
}

impl AdaptiveAvgPool2d {
    /// Pooling to `output_size` (height, width), each >= 1.
    pub fn new(output_size: [usize; 2]) -> Result<Self> {
        if output_size.contains(&0) {
            return Err(Error::config(
                format!("AdaptiveAvgPool2d to {output_size:?}"),
                "use an output size >= 1 along both dims",
            ));
        }
        Ok(AdaptiveAvgPool2d {
            output_size,
            output: AvgPoolOutput::default(),
            common: Common::default(),
        })
    }
    /// The same pool with `output` as its quantization mode.
    pub fn with_output(mut self, output: AvgPoolOutput) -> Self {
        self.output = output;
        self
    }
    /// Its quantization mode.
    pub fn output(&self) -> AvgPoolOutput {
        self.output
    }
    fn bins(&self, h: usize, w: usize) -> Result<Windows> {
        if h == 0 || w == 0 {
            return Err(Error::tensor(
                format!("AdaptiveAvgPool2d got an empty {h}x{w} input"),
                "feed a non-empty (N, C, H, W) tensor",
            ));
        }
        let [oh, ow] = self.output_size;
        // PyTorch hands an adaptive pool to QNNPACK when the bins tile the input evenly and
        // are not the identity (`enable_qnnpack_for_ada_avgpool`).
        let qnnpack_runs = h.is_multiple_of(oh) && w.is_multiple_of(ow) && (h, w) != (oh, ow);
        Ok((
            PoolBin::adaptive(h, oh),
            PoolBin::adaptive(w, ow),
            qnnpack_runs,
        ))
    }
    fn float(&self, x: &Tensor) -> Result<Tensor> {
        let (h, w) = spatial(x, "AdaptiveAvgPool2d")?;
        let (rows, cols, _) = self.bins(h, w)?;
        let [oh, ow] = self.output_size;
        if oh == 1 && ow == 1 {
            return Ok(x.mean_keepdim((2, 3))?);
        }
        if h.is_multiple_of(oh) && w.is_multiple_of(ow) {
            let k = [h / oh, w / ow];
            return sliding_mean(x, k, k, [0, 0]);
        }
        binned_mean(x, &rows, &cols)
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        let input = match x.dims() {
            &[_, _, h, w] => [h, w],
            _ => [0, 0],
        };
        pool_forward(
            &self.common,
            self.output,
            x,
            "AdaptiveAvgPool2d",
            || FloatOp::AdaptiveAvgPool2d {
                input,
                output: self.output_size,
            },
            |x| self.float(x),
            |h, w| self.bins(h, w),
        )
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<Staged> {
        pool_stage_convert(&self.common, "AdaptiveAvgPool2d")
    }
}

simple_module!(AvgPool2d, observed: false, scheme: Float);
simple_module!(AdaptiveAvgPool2d, observed: false, scheme: Float);
