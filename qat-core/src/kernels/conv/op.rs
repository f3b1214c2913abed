//! The convolution as candle ops (with and without a bias, in 2-D and as 1-D) and their
//! bias passes.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::super::sums::sum_f64;
use super::backward::backward;
use super::forward::forward;
use super::plan::{Conv2dParams, Geom};
use crate::host::{cpu_f32_slice, with_cpu_f32 as cpu_f32};

/// The conv2d op on (input, weight); both contiguous CPU f32.
struct Conv2dOp(Conv2dParams);

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    cpu_f32_slice(s, l, &format!("conv2d: {what}"))
}

/// The forward of both conv ops on (input, weight): the geometry and the output.
fn conv_fwd(
    p: &Conv2dParams,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(Geom, Vec<f32>)> {
    let g = Geom::new(l1.dims(), l2.dims(), p)?;
    let x = f32_slice(s1, l1, "input")?;
    let w = f32_slice(s2, l2, "weight")?;
    Ok((g, forward(x, w, &g)))
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "qat-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, y) = conv_fwd(&self.0, s1, l1, s2, l2)?;
        Ok((CpuStorage::F32(y), Shape::from(g.out_shape().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // An input that is neither a variable nor computed from one gets no gradient (candle
        // would drop it anyway): conv1's input gradient is never computed.
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        if !need_dx && !need_dw {
            return Ok((None, None));
        }
        let g = Geom::new(x.dims(), w.dims(), &self.0)?;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let res = cpu_f32(&x, |xs| {
            cpu_f32(&w, |ws| {
                cpu_f32(&dy, |dys| backward(xs, ws, dys, &g, need_dx, need_dw))
            })
        });
        let Some(Some(Some((dx, dw)))) = res else {
            candle_core::bail!("conv2d backward: tensors are not CPU f32");
        };
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dw = dw
            .map(|v| Tensor::from_vec(v, w.shape(), dev))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// Elements per rayon task in the bias passes.
const BIAS_CHUNK: usize = 1 << 15;

/// Adds `b[o]` to every run of `cols` outputs of channel `o` in `y` (`(N, O, cols)`).
fn add_bias(y: &mut [f32], b: &[f32], cols: usize) {
    let o = b.len();
    if cols == 0 || o == 0 {
        return;
    }
    y.par_chunks_mut(cols)
        .enumerate()
        .with_min_len((BIAS_CHUNK / cols).max(1))
        .for_each(|(r, run)| {
            let v = b[r % o];
            run.iter_mut().for_each(|y| *y += v);
        });
}

/// The bias gradient: per-channel sums of `dy` (`(N, O, cols)`), in f64.
fn bias_grad(dy: &[f32], o: usize, cols: usize) -> Vec<f32> {
    let mut sums = vec![0f64; o];
    if cols == 0 || o == 0 {
        return vec![0.0; o];
    }
    let runs: Vec<f64> = dy
        .par_chunks(cols)
        .with_min_len((BIAS_CHUNK / cols).max(1))
        .map(sum_f64)
        .collect();
    for (r, v) in runs.into_iter().enumerate() {
        sums[r % o] += v;
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// The conv2d op with a bias on (input, weight, bias `[O]`): the bias is added in place to
/// the convolution's output and its gradient summed from the output gradient, without the
/// extra node (and candle's zero-fill and add on its gradient edge) of a separate add.
struct Conv2dBiasOp(Conv2dParams);

impl CustomOp3 for Conv2dBiasOp {
    fn name(&self) -> &'static str {
        "qat-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let b = f32_slice(s3, l3, "bias")?;
        let o = l2.dims().first().copied().unwrap_or(0);
        if b.len() != o {
            candle_core::bail!("conv2d: {} bias values for {o} output channels", b.len());
        }
        let (g, mut y) = conv_fwd(&self.0, s1, l1, s2, l2)?;
        add_bias(&mut y, b, g.win.cols());
        Ok((CpuStorage::F32(y), Shape::from(g.out_shape().to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = CustomOp2::bwd(&Conv2dOp(self.0), x, w, y, dy)?;
        if !b.track_op() {
            return Ok((dx, dw, None));
        }
        let g = Geom::new(x.dims(), w.dims(), &self.0)?;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let Some(db) = cpu_f32(&dy, |d| bias_grad(d, g.o, g.win.cols())) else {
            candle_core::bail!("conv2d backward: the output gradient is not CPU f32");
        };
        Ok((dx, dw, Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// Whether the fused kernels take these tensors (CPU, f32, non-empty).
pub(crate) fn supported(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.elem_count() > 0
        && w.elem_count() > 0
}

/// 2-D convolution of `x (N, C, H, W)` with `w (O, C/groups, KH, KW)`, no bias; gradients
/// flow to both. CPU f32 tensors only (see [`supported`]).
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, p: Conv2dParams) -> candle_core::Result<Tensor> {
    Geom::new(x.dims(), w.dims(), &p)?;
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv2dOp(p))
}

/// [`conv2d`] plus a bias `b (O,)`, in one op; gradients flow to all three.
pub(crate) fn conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    p: Conv2dParams,
) -> candle_core::Result<Tensor> {
    Geom::new(x.dims(), w.dims(), &p)?;
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2dBiasOp(p))
}

/// 1-D convolution of `x (N, C, L)` with `w (O, C/groups, K)`: a conv2d of height 1 (padding
/// along the length only).
pub(crate) fn conv1d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> candle_core::Result<Tensor> {
    let (n, c, l) = x.dims3()?;
    let (o, cg, k) = w.dims3()?;
    let p = Conv2dParams {
        pad: [0, padding],
        stride: [1, stride],
        dilation: [1, dilation],
        groups,
    };
    let (x, w) = (x.reshape((n, c, 1, l))?, w.reshape((o, cg, 1, k))?);
    let y = match b {
        Some(b) => conv2d_bias(&x, &w, b, p)?,
        None => conv2d(&x, &w, p)?,
    };
    let ol = y.dim(3)?;
    y.reshape((n, o, ol))
}
