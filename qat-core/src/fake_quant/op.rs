//! `fake_quantize_per_tensor` / `fake_quantize_per_channel`: PyTorch's
//! `torch.fake_quantize_per_{tensor,channel}_affine` with the straight-through backward.
//!
//! On the CPU each direction is one fused candle `CustomOp` (one pass over memory,
//! multi-threaded for large tensors); elsewhere the same arithmetic runs as a composite of
//! candle ops, so CUDA and Metal tensors work and give identical values.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};

use super::kernel::{self, Grid};
use crate::error::{Error, Result};
use crate::host::alloc_fill;
use crate::qparams::{QParams, QuantRange};

/// Where the grids apply: one for the whole tensor, or one per slice along an axis.
#[derive(Clone, Debug)]
pub(crate) enum Grids {
    PerTensor(Grid),
    /// `inner` elements per run; run `r` uses grid `r % grids.len()`.
    PerChannel {
        grids: Arc<Vec<Grid>>,
        inner: usize,
    },
}

impl Grids {
    pub fn build(qparams: &QParams, range: &QuantRange, dims: &[usize]) -> Result<Self> {
        qparams.validate(range)?;
        let (qmin, qmax) = (range.quant_min(), range.quant_max());
        match qparams {
            QParams::PerTensor { scale, zero_point } => {
                Ok(Grids::PerTensor(Grid::new(*scale, *zero_point, qmin, qmax)))
            }
            QParams::PerChannel {
                scale,
                zero_point,
                axis,
            } => {
                let axis = *axis;
                if axis >= dims.len() {
                    return Err(Error::qparams(
                        format!("axis {axis} is out of range for a tensor of shape {dims:?}"),
                        "use an axis below the tensor's rank (0 for conv/linear weights)",
                    ));
                }
                if scale.len() != dims[axis] {
                    return Err(Error::qparams(
                        format!(
                            "{} scales for {} channels along axis {axis} of shape {dims:?}",
                            scale.len(),
                            dims[axis]
                        ),
                        "give one scale and zero point per channel",
                    ));
                }
                let grids = scale
                    .iter()
                    .zip(zero_point)
                    .map(|(&s, &z)| Grid::new(s, z, qmin, qmax))
                    .collect();
                Ok(Grids::PerChannel {
                    grids: Arc::new(grids),
                    inner: dims[axis + 1..].iter().product(),
                })
            }
        }
    }

    /// Runs `f(grid, start, end)` over the runs of `[off, off + len)` that share a grid.
    #[inline]
    pub(crate) fn for_runs(&self, off: usize, len: usize, mut f: impl FnMut(Grid, usize, usize)) {
        match self {
            Grids::PerTensor(g) => f(*g, 0, len),
            Grids::PerChannel { grids, inner } => {
                let inner = (*inner).max(1);
                let mut i = 0;
                while i < len {
                    let run = (off + i) / inner;
                    let end = ((run + 1) * inner - off).min(len);
                    f(grids[run % grids.len()], i, end);
                    i = end;
                }
            }
        }
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input is not contiguous"),
    }
}

/// Runs an f32 kernel on f16/bf16 data by converting chunk by chunk.
///
/// # Safety
/// `f(offset, x, out)` must initialise every element of `out` (given an `x` of its length).
unsafe fn via_f32<T: Copy + Sync + Send>(
    x: &[T],
    to: impl Fn(T) -> f32 + Sync,
    from: impl Fn(f32) -> T + Sync + Send,
    f: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<T> {
    let fill = |off: usize, out: &mut [MaybeUninit<f32>]| {
        let xs: Vec<f32> = x[off..off + out.len()].iter().map(|&v| to(v)).collect();
        f(off, &xs, out)
    };
    // SAFETY: `f` initialises each chunk whole (this function's contract).
    let y = unsafe { alloc_fill(x.len(), fill) };
    y.into_iter().map(from).collect()
}

/// `f(offset, x, out)` over the input's chunks into a new storage of its dtype.
///
/// # Safety
/// As [`via_f32`]: `f` must initialise every element of each `out` it is given.
unsafe fn map_storage(
    s: &CpuStorage,
    layout: &Layout,
    op: &str,
    f: impl Fn(usize, &[f32], &mut [MaybeUninit<f32>]) + Sync,
) -> candle_core::Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(v) => {
            let x = contiguous(v, layout, op)?;
            // SAFETY: `f` initialises each chunk whole (this function's contract).
            CpuStorage::F32(unsafe {
                alloc_fill(x.len(), |off, out| f(off, &x[off..off + out.len()], out))
            })
        }
        CpuStorage::F16(v) => {
            let x = contiguous(v, layout, op)?;
            // SAFETY: `f` initialises each chunk whole (this function's contract).
            CpuStorage::F16(unsafe { via_f32(x, |h| h.to_f32(), half::f16::from_f32, f) })
        }
        CpuStorage::BF16(v) => {
            let x = contiguous(v, layout, op)?;
            // SAFETY: `f` initialises each chunk whole (this function's contract).
            CpuStorage::BF16(unsafe { via_f32(x, |h| h.to_f32(), half::bf16::from_f32, f) })
        }
        _ => candle_core::bail!("{op}: dtype {:?} is not supported", s.dtype()),
    })
}

/// The fused forward on CPU; its backward is [`FakeQuantGrad`].
struct FakeQuantOp(Grids);

impl CustomOp1 for FakeQuantOp {
    fn name(&self) -> &'static str {
        "fake-quantize"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let grids = &self.0;
        let fill = |off: usize, x: &[f32], y: &mut [MaybeUninit<f32>]| {
            grids.for_runs(off, x.len(), |g, a, b| {
                kernel::forward(&x[a..b], &mut y[a..b], g)
            })
        };
        // SAFETY: `for_runs` splits `0..x.len()` (= `y.len()`) into consecutive runs, and
        // `kernel::forward` writes each run of `y` zipped with the run of `x`: all of `y`.
        let out = unsafe { map_storage(s, l, self.name(), fill) }?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        Ok(Some(
            x.apply_op2_no_bwd(&dy, &FakeQuantGrad(self.0.clone()))?,
        ))
    }
}

/// The straight-through backward, `dx = dy * mask(x)`, fused on CPU.
struct FakeQuantGrad(Grids);

impl CustomOp2 for FakeQuantGrad {
    fn name(&self) -> &'static str {
        "fake-quantize-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let grids = &self.0;
        let run = |x: &[f32], dy: &[f32]| {
            let fill = |off: usize, dx: &mut [MaybeUninit<f32>]| {
                let n = dx.len();
                let (x, dy) = (&x[off..off + n], &dy[off..off + n]);
                grids.for_runs(off, n, |g, a, b| {
                    kernel::backward(&x[a..b], &dy[a..b], &mut dx[a..b], g)
                })
            };
            // SAFETY: `for_runs` splits each chunk into consecutive runs, and
            // `kernel::backward` writes each run of `dx` zipped with runs of `x` and `dy` of
            // its length (the slices panic if shorter): every chunk whole.
            unsafe { alloc_fill(x.len(), fill) }
        };
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(dy)) => CpuStorage::F32(run(
                contiguous(x, l1, "fq-grad")?,
                contiguous(dy, l2, "fq-grad")?,
            )),
            _ => {
                // f16/bf16: widen both, compute, narrow back.
                let x = s1_to_f32(s1, l1)?;
                let dy = s1_to_f32(s2, l2)?;
                narrow_like(s1, run(&x, &dy))?
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

fn s1_to_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    Ok(match s {
        CpuStorage::F32(v) => contiguous(v, l, "fq")?.to_vec(),
        CpuStorage::F16(v) => contiguous(v, l, "fq")?.iter().map(|h| h.to_f32()).collect(),
        CpuStorage::BF16(v) => contiguous(v, l, "fq")?.iter().map(|h| h.to_f32()).collect(),
        _ => candle_core::bail!("fake-quantize: dtype {:?} is not supported", s.dtype()),
    })
}

fn narrow_like(like: &CpuStorage, v: Vec<f32>) -> candle_core::Result<CpuStorage> {
    Ok(match like {
        CpuStorage::F16(_) => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        CpuStorage::BF16(_) => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        _ => CpuStorage::F32(v),
    })
}

pub(crate) fn check_float_input(x: &Tensor, what: &str) -> Result<()> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        dt => Err(Error::tensor(
            format!("{what} got a {dt:?} tensor; fake quantization takes f32, f16 or bf16"),
            "convert the input to f32 first (integer tensors are already quantized)",
        )),
    }
}

/// Fake-quantizes `x` with `qparams` over `range`: `(clamp(zp + round_half_even(x *
/// (1/scale)), qmin, qmax) - zp) * scale`, gradient `dy * [qmin <= q <= qmax]` (straight
/// through, masked by the unclamped code). f32, f16 and bf16 inputs (computed in f32,
/// returned in the input's dtype); empty tensors pass through.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::fake_quant::fake_quantize;
/// use qat_core::{QParams, QuantRange};
/// let x = Tensor::new(&[-0.26f32, 0.05, 0.15, 0.33, 9.0], &Device::Cpu)?;
/// let qp = QParams::PerTensor { scale: 0.1, zero_point: 2 };
/// let y = fake_quantize(&x, &qp, &QuantRange::explicit(0, 7)?)?;
/// // -0.26 clamps at qmin, 0.05 ties to even (0), 0.15 ties to even (0.2), 9.0 clamps at qmax.
/// assert_eq!(y.to_vec1::<f32>()?, vec![-0.2, 0.0, 0.2, 0.3, 0.5]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn fake_quantize(x: &Tensor, qparams: &QParams, range: &QuantRange) -> Result<Tensor> {
    check_float_input(x, "fake_quantize")?;
    let grids = Grids::build(qparams, range, x.dims())?;
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    if x.device().is_cpu() {
        Ok(x.contiguous()?.apply_op1(FakeQuantOp(grids))?)
    } else {
        composite(x, qparams, range)
    }
}

/// The straight-through backward of [`fake_quantize`] on its own: `grad_y * [qmin <= q <=
/// qmax]`, the kernel autograd runs (one fused pass on CPU). Exposed for benchmarks and
/// tests; training code gets it through `backward()`.
#[doc(hidden)]
pub fn fake_quantize_backward(
    x: &Tensor,
    grad_y: &Tensor,
    qparams: &QParams,
    range: &QuantRange,
) -> Result<Tensor> {
    check_float_input(x, "fake_quantize_backward")?;
    if grad_y.dims() != x.dims() {
        return Err(Error::tensor(
            format!(
                "fake_quantize_backward: grad_y has shape {:?}, x has {:?}",
                grad_y.dims(),
                x.dims()
            ),
            "pass the gradient of the fake-quant output, which has the input's shape",
        ));
    }
    let grids = Grids::build(qparams, range, x.dims())?;
    if x.elem_count() == 0 {
        return Ok(grad_y.to_dtype(x.dtype())?);
    }
    let dy = grad_y.to_dtype(x.dtype())?.contiguous()?;
    if x.device().is_cpu() {
        return Ok(x
            .contiguous()?
            .apply_op2_no_bwd(&dy, &FakeQuantGrad(grids))?);
    }
    let xf = x.to_dtype(DType::F32)?;
    let [_, inv, lo, hi] = grid_tensors(&xf, qparams, range)?;
    let q = composite_code(&xf, &inv, &lo, &hi)?;
    let in_range = q.broadcast_ge(&lo)?.mul(&q.broadcast_le(&hi)?)?;
    // `where` as the CPU kernel selects: outside the range the gradient is 0 whatever dy is.
    let dy = dy.to_dtype(DType::F32)?;
    Ok(in_range
        .where_cond(&dy, &dy.zeros_like()?)?
        .to_dtype(x.dtype())?)
}

/// `fake_quantize` for one scale and zero point (PyTorch's
/// `torch.fake_quantize_per_tensor_affine`).
pub fn fake_quantize_per_tensor(
    x: &Tensor,
    scale: f32,
    zero_point: i32,
    quant_min: i32,
    quant_max: i32,
) -> Result<Tensor> {
    let range = op_range(quant_min, quant_max)?;
    fake_quantize(x, &QParams::PerTensor { scale, zero_point }, &range)
}

/// `fake_quantize` with a scale and zero point per slice along `axis` (PyTorch's
/// `torch.fake_quantize_per_channel_affine`).
pub fn fake_quantize_per_channel(
    x: &Tensor,
    scale: &[f32],
    zero_point: &[i32],
    axis: usize,
    quant_min: i32,
    quant_max: i32,
) -> Result<Tensor> {
    let range = op_range(quant_min, quant_max)?;
    let qp = QParams::PerChannel {
        scale: scale.to_vec(),
        zero_point: zero_point.to_vec(),
        axis,
    };
    fake_quantize(x, &qp, &range)
}

/// The range of a bare fake-quant op: PyTorch asks only quant_min < quant_max here (and
/// that the zero point lies inside, checked with the qparams).
pub(crate) fn op_range(quant_min: i32, quant_max: i32) -> Result<QuantRange> {
    QuantRange::explicit(quant_min, quant_max)
}

/// The same arithmetic as the fused CPU op, built from candle ops (any device). Values are
/// identical to [`fake_quantize`]; the gradient is the same straight-through mask.
pub fn fake_quantize_composite(
    x: &Tensor,
    qparams: &QParams,
    range: &QuantRange,
) -> Result<Tensor> {
    check_float_input(x, "fake_quantize_composite")?;
    Grids::build(qparams, range, x.dims())?;
    if x.elem_count() == 0 {
        return Ok(x.clone());
    }
    composite(x, qparams, range)
}

/// Per-grid constants as tensors broadcastable against `x` (shape `[1,..,C,..,1]` per
/// channel).
pub(crate) fn grid_tensors(
    x: &Tensor,
    qparams: &QParams,
    range: &QuantRange,
) -> Result<[Tensor; 4]> {
    let (qmin, qmax) = (range.quant_min(), range.quant_max());
    let grids: Vec<Grid> = qparams
        .scales()
        .iter()
        .zip(qparams.zero_points())
        .map(|(&s, &z)| Grid::new(s, z, qmin, qmax))
        .collect();
    let mut shape = vec![1usize; x.rank()];
    if let QParams::PerChannel { axis, .. } = qparams {
        shape[*axis] = grids.len();
    }
    let dev = x.device();
    let make = |f: &dyn Fn(&Grid) -> f32| -> Result<Tensor> {
        let v: Vec<f32> = grids.iter().map(f).collect();
        Ok(Tensor::from_vec(v, shape.as_slice(), dev)?)
    };
    Ok([
        make(&|g| g.scale)?,
        make(&|g| g.inv_scale)?,
        make(&|g| g.lo)?,
        make(&|g| g.hi)?,
    ])
}

/// Code relative to the zero point, clamped one step outside the range, rounded half to
/// even with the same 1.5 * 2^23 trick as the kernel.
pub(crate) fn composite_code(x: &Tensor, inv: &Tensor, lo: &Tensor, hi: &Tensor) -> Result<Tensor> {
    const MAGIC: f64 = 12_582_912.0;
    let v = x.broadcast_mul(inv)?;
    let v = v
        .broadcast_maximum(&(lo - 1.0)?)?
        .broadcast_minimum(&(hi + 1.0)?)?;
    Ok(v.affine(1.0, MAGIC)?.affine(1.0, -MAGIC)?)
}

fn composite(x: &Tensor, qparams: &QParams, range: &QuantRange) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let [scale, inv, lo, hi] = grid_tensors(&xf, qparams, range)?;
    let q = composite_code(&xf.detach(), &inv, &lo, &hi)?;
    let in_range = q.broadcast_ge(&lo)?.mul(&q.broadcast_le(&hi)?)?;
    let y = q
        .broadcast_maximum(&lo)?
        .broadcast_minimum(&hi)?
        .broadcast_mul(&scale)?;
    // Value: y exactly (a - a is 0). Gradient: the mask. `where` rather than a product, so
    // that an infinite input (outside the range) contributes 0, not inf * 0.
    let through = in_range.where_cond(&xf, &xf.zeros_like()?)?;
    let y = (y + (&through - through.detach())?)?;
    Ok(y.to_dtype(dtype)?)
}
