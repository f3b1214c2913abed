//! BatchNorm on CPU f32 tensors `(N, C, ...)` with PyTorch's CPU arithmetic
//! (`batch_norm_cpu_*_contiguous_impl`):
//!
//! - statistics ([`batch_stats`]): per channel, `mean = f32(sum_f64(x) / count)`, then
//!   `var = f32(sum_f64((x - mean)^2)) / count` (the square in f32, summed in f64);
//! - `invstd = f32(1 / sqrt(f64(var) + eps))` ([`inv_std`]);
//! - forward: `y = x * alpha + beta`, `alpha = invstd * weight`, `beta = bias - mean * alpha`
//!   (one pass);
//! - backward: one pass for `sum(dy)` and `sum((x - mean) * dy)` per channel (f64), one for
//!   `dx = (dy - sum/count - (x - mean) * k) * invstd * weight`,
//!   `k = dotp * invstd^2 / count` (training; in eval `dx = dy * invstd * weight`),
//!   `dweight = dotp * invstd`, `dbias = sum`.
//!
//! The op is a candle `CustomOp3` on (x, weight, bias); mean and invstd travel in the op.
//! Work is split over images (per-task f64 partial sums, added in task order) and over
//! `(image, channel)` rows for the elementwise passes.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::sums::sum_f64;
use crate::host::{alloc_with, cpu_f32_slice, with_cpu_f32, CHUNK};

/// `(images, channels, elements per channel and image)` of an `(N, C, ...)` shape.
fn nc_s(dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    if dims.len() < 2 {
        candle_core::bail!("batch_norm: input of shape {dims:?} has no channel dim");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

/// Whether the fused kernels take these tensors (CPU f32, one weight and bias per channel).
pub(crate) fn supported(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    let c = x.dims().get(1).copied();
    [x, weight, bias]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
        && x.elem_count() > 0
        && weight.dims() == [c.unwrap_or(0)]
        && bias.dims() == [c.unwrap_or(0)]
}

/// `sum((x - mean)^2)` with the square in f32, summed in f64.
#[multiversion(targets("x86_64+avx2"))]
fn sq_dev_f64(x: &[f32], mean: f32) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for i in 0..8 {
            let d = ch[i] - mean;
            acc[i] += (d * d) as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &v in rest {
        let d = v - mean;
        s += (d * d) as f64;
    }
    s
}

/// `(sum(dy), sum((x - mean) * dy))`, products in f32, sums in f64.
#[multiversion(targets("x86_64+avx2"))]
fn sum_dot_f64(x: &[f32], dy: &[f32], mean: f32) -> (f64, f64) {
    let mut s = [0f64; 8];
    let mut d = [0f64; 8];
    let n = x.len().min(dy.len());
    let (x, dy) = (&x[..n], &dy[..n]);
    let full = n / 8 * 8;
    for (cx, cd) in x[..full].chunks_exact(8).zip(dy[..full].chunks_exact(8)) {
        for i in 0..8 {
            s[i] += cd[i] as f64;
            d[i] += ((cx[i] - mean) * cd[i]) as f64;
        }
    }
    let (mut ss, mut dd): (f64, f64) = (s.iter().sum(), d.iter().sum());
    for (&xv, &g) in x[full..].iter().zip(&dy[full..]) {
        ss += g as f64;
        dd += ((xv - mean) * g) as f64;
    }
    (ss, dd)
}

/// `y = x * a + b`.
#[multiversion(targets("x86_64+avx2"))]
fn affine(x: &[f32], y: &mut [MaybeUninit<f32>], a: f32, b: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write(v * a + b);
    }
}

/// `y = max(x * a + b, 0)`.
#[multiversion(targets("x86_64+avx2"))]
fn affine_relu(x: &[f32], y: &mut [MaybeUninit<f32>], a: f32, b: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        o.write((v * a + b).max(0.0));
    }
}

/// `g` where `y > 0`, else 0, as a bit mask (a select the compiler vectorises; a branch it
/// does not).
#[inline(always)]
fn relu_mask(g: f32, y: f32) -> f32 {
    f32::from_bits(g.to_bits() & ((y > 0.0) as u32).wrapping_neg())
}

/// [`sum_dot_f64`] of the gradient behind a ReLU whose output is `y`: `dy` where `y > 0`,
/// else 0 (PyTorch's `threshold_backward`). The sums are added per block of 256 values, so
/// they may differ from [`sum_dot_f64`]'s on the masked gradient in the last f64 bits.
fn sum_dot_f64_relu(x: &[f32], dy: &[f32], y: &[f32], mean: f32) -> (f64, f64) {
    // Blocks of masked gradients on the stack, summed by the unmasked kernel.
    const B: usize = 256;
    let n = x.len().min(dy.len()).min(y.len());
    let (mut ss, mut dd) = (0f64, 0f64);
    let mut g = [0f32; B];
    for start in (0..n).step_by(B) {
        let len = B.min(n - start);
        mask_relu(
            &dy[start..start + len],
            &y[start..start + len],
            &mut g[..len],
        );
        let (a, b) = sum_dot_f64(&x[start..start + len], &g[..len], mean);
        ss += a;
        dd += b;
    }
    (ss, dd)
}

/// `g = dy` where `y > 0`, else 0.
#[multiversion(targets("x86_64+avx2"))]
fn mask_relu(dy: &[f32], y: &[f32], g: &mut [f32]) {
    for ((o, &d), &yv) in g.iter_mut().zip(dy).zip(y) {
        *o = relu_mask(d, yv);
    }
}

/// [`dx_train`] of the gradient behind a ReLU whose output is `y`.
#[multiversion(targets("x86_64+avx2"))]
#[allow(clippy::too_many_arguments)]
fn dx_train_relu(
    x: &[f32],
    dy: &[f32],
    y: &[f32],
    dx: &mut [MaybeUninit<f32>],
    mean: f32,
    k: f32,
    gm: f32,
    iw: [f32; 2],
) {
    let [invstd, w] = iw;
    for (((o, &xv), &g), &yv) in dx.iter_mut().zip(x).zip(dy).zip(y) {
        let g = relu_mask(g, yv);
        o.write((g - gm - (xv - mean) * k) * invstd * w);
    }
}

/// [`dx_eval`] of the gradient behind a ReLU whose output is `y`.
#[multiversion(targets("x86_64+avx2"))]
fn dx_eval_relu(dy: &[f32], y: &[f32], dx: &mut [MaybeUninit<f32>], invstd: f32, w: f32) {
    for ((o, &g), &yv) in dx.iter_mut().zip(dy).zip(y) {
        o.write(relu_mask(g, yv) * invstd * w);
    }
}

/// Training `dx = (dy - gm - (x - mean) * k) * invstd * w`.
#[multiversion(targets("x86_64+avx2"))]
fn dx_train(
    x: &[f32],
    dy: &[f32],
    dx: &mut [MaybeUninit<f32>],
    mean: f32,
    k: f32,
    gm: f32,
    iw: [f32; 2],
) {
    let [invstd, w] = iw;
    for ((o, &xv), &g) in dx.iter_mut().zip(x).zip(dy) {
        o.write((g - gm - (xv - mean) * k) * invstd * w);
    }
}

/// Eval `dx = dy * invstd * w`.
#[multiversion(targets("x86_64+avx2"))]
fn dx_eval(dy: &[f32], dx: &mut [MaybeUninit<f32>], invstd: f32, w: f32) {
    for (o, &g) in dx.iter_mut().zip(dy) {
        o.write(g * invstd * w);
    }
}

/// Image ranges for the reduction tasks (one when small).
fn image_tasks(n: usize, per_image: usize) -> Vec<(usize, usize)> {
    let threads = super::num_threads();
    let tasks = if threads == 1 || n * per_image < 2 * CHUNK {
        1
    } else {
        threads.min(n)
    };
    (0..tasks)
        .map(|t| (t * n / tasks, (t + 1) * n / tasks))
        .collect()
}

/// Per-channel f64 sums of `f(image, channel)` over all images, in parallel over image ranges
/// (partials added in task order). `K` values per channel.
fn reduce<const K: usize>(
    n: usize,
    c: usize,
    s: usize,
    f: impl Fn(usize, usize) -> [f64; K] + Sync,
) -> Vec<[f64; K]> {
    let run = |(a, b): (usize, usize)| {
        let mut acc = vec![[0f64; K]; c];
        for img in a..b {
            for (ch, slot) in acc.iter_mut().enumerate() {
                let v = f(img, ch);
                for k in 0..K {
                    slot[k] += v[k];
                }
            }
        }
        acc
    };
    let tasks = image_tasks(n, c * s);
    let parts: Vec<Vec<[f64; K]>> = if tasks.len() > 1 {
        tasks.into_par_iter().map(run).collect()
    } else {
        tasks.into_iter().map(run).collect()
    };
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![[0f64; K]; c]);
    for p in it {
        for (a, b) in acc.iter_mut().zip(p) {
            for k in 0..K {
                a[k] += b[k];
            }
        }
    }
    acc
}

/// Fills an `(N*C) x s` output row by row with `f(row, channel, out)`, in parallel chunks of
/// rows when large.
///
/// # Safety
/// `f` must initialise every element of the row `out` it is given (`s` of them).
unsafe fn map_rows(
    n: usize,
    c: usize,
    s: usize,
    f: impl Fn(usize, usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let total = n * c * s;
    let rows_per = (CHUNK / s.max(1)).max(1);
    let run = |(i, chunk): (usize, &mut [MaybeUninit<f32>])| {
        for (j, row) in chunk.chunks_mut(s).enumerate() {
            let r = i * rows_per + j;
            f(r, r % c, row);
        }
    };
    let fill = |spare: &mut [MaybeUninit<f32>]| {
        if total < 2 * CHUNK || super::num_threads() == 1 {
            spare.chunks_mut(rows_per * s).enumerate().for_each(run);
        } else {
            spare.par_chunks_mut(rows_per * s).enumerate().for_each(run);
        }
    };
    // SAFETY: the chunks cover the output and hold whole rows (`rows_per * s` values, the
    // last one fewer rows: `total` is a multiple of `s`), `run` hands `f` each row of its
    // chunk, and `f` initialises its whole row (this function's contract).
    unsafe { alloc_with(total, fill) }
}

/// Per-channel batch mean and biased variance of a contiguous CPU f32 `(N, C, ...)` tensor,
/// as PyTorch's CPU kernel computes them.
pub(crate) fn batch_stats(x: &Tensor) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let (n, c, s) = nc_s(x.dims())?;
    let count = n * s;
    let r = with_cpu_f32(x, |xs| {
        let row = |img: usize, ch: usize| &xs[(img * c + ch) * s..][..s];
        let sums = reduce::<1>(n, c, s, |img, ch| [sum_f64(row(img, ch))]);
        let mean: Vec<f32> = sums.iter().map(|v| (v[0] / count as f64) as f32).collect();
        let sq = reduce::<1>(n, c, s, |img, ch| [sq_dev_f64(row(img, ch), mean[ch])]);
        let var: Vec<f32> = sq.iter().map(|v| v[0] as f32 / count as f32).collect();
        (mean, var)
    });
    r.ok_or_else(|| candle_core::Error::Msg("batch_stats: input is not contiguous CPU f32".into()))
}

/// `f32(1 / sqrt(f64(var) + eps))` per channel.
pub(crate) fn inv_std(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect()
}

/// The fused normalisation on (x, weight, bias) with the statistics it normalises with.
struct BatchNormOp {
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// Batch statistics (the mean and variance depend on x) or running ones.
    train: bool,
    /// A ReLU on the output, in the same pass (and its mask in the backward's passes).
    relu: bool,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    cpu_f32_slice(s, l, &format!("batch_norm: {what}"))
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "qat-batch-norm"
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
        let (n, c, s) = nc_s(l1.dims())?;
        let (x, w, b) = (
            slice(s1, l1, "input")?,
            slice(s2, l2, "weight")?,
            slice(s3, l3, "bias")?,
        );
        if w.len() != c || b.len() != c || self.mean.len() != c || self.invstd.len() != c {
            candle_core::bail!(
                "batch_norm: {c} channels but {} weights, {} biases",
                w.len(),
                b.len()
            );
        }
        let alpha: Vec<f32> = (0..c).map(|ch| self.invstd[ch] * w[ch]).collect();
        let beta: Vec<f32> = (0..c).map(|ch| b[ch] - self.mean[ch] * alpha[ch]).collect();
        let row = |r: usize, ch: usize, out: &mut [MaybeUninit<f32>]| {
            if self.relu {
                affine_relu(&x[r * s..][..s], out, alpha[ch], beta[ch])
            } else {
                affine(&x[r * s..][..s], out, alpha[ch], beta[ch])
            }
        };
        // SAFETY: `affine(_relu)` writes `out` zipped with an input row of `s` values (the
        // slice panics if shorter), i.e. the whole row.
        let y = unsafe { map_rows(n, c, s, row) };
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_dw, need_db) = (x.track_op(), w.track_op(), b.track_op());
        if !need_dx && !need_dw && !need_db {
            return Ok((None, None, None));
        }
        let (n, c, s) = nc_s(x.dims())?;
        let count = n * s;
        let dy = dy.to_dtype(DType::F32)?.contiguous()?;
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        // The output, for the ReLU's mask (read only with a ReLU).
        let y = y.contiguous()?;
        let (mean, invstd) = (&self.mean, &self.invstd);
        let relu = self.relu;
        let sums_needed = need_dw || need_db || (need_dx && self.train);
        let res = with_cpu_f32(&x, |xs| {
            with_cpu_f32(&w, |ws| {
                with_cpu_f32(&dy, |dys| {
                    with_cpu_f32(&y, |ys| {
                        let sums = if sums_needed {
                            reduce::<2>(n, c, s, |img, ch| {
                                let r = (img * c + ch) * s;
                                let (xr, dr) = (&xs[r..r + s], &dys[r..r + s]);
                                let (a, d) = if relu {
                                    sum_dot_f64_relu(xr, dr, &ys[r..r + s], mean[ch])
                                } else {
                                    sum_dot_f64(xr, dr, mean[ch])
                                };
                                [a, d]
                            })
                        } else {
                            Vec::new()
                        };
                        let dx = need_dx.then(|| {
                            if self.train {
                                let coef: Vec<(f32, f32)> = (0..c)
                                    .map(|ch| {
                                        let [sum, dotp] = sums[ch];
                                        let k =
                                            dotp as f32 * invstd[ch] * invstd[ch] / count as f32;
                                        let gm = (sum / count as f64) as f32;
                                        (k, gm)
                                    })
                                    .collect();
                                let row = |r: usize, ch: usize, out: &mut [MaybeUninit<f32>]| {
                                    let (k, gm) = coef[ch];
                                    let (xr, dr) = (&xs[r * s..][..s], &dys[r * s..][..s]);
                                    let iw = [invstd[ch], ws[ch]];
                                    if relu {
                                        let yr = &ys[r * s..][..s];
                                        dx_train_relu(xr, dr, yr, out, mean[ch], k, gm, iw)
                                    } else {
                                        dx_train(xr, dr, out, mean[ch], k, gm, iw)
                                    }
                                };
                                // SAFETY: `dx_train(_relu)` writes `out` zipped with rows of
                                // `s` values (the slices panic if shorter): the whole row.
                                unsafe { map_rows(n, c, s, row) }
                            } else {
                                let row = |r: usize, ch: usize, out: &mut [MaybeUninit<f32>]| {
                                    let dr = &dys[r * s..][..s];
                                    if relu {
                                        dx_eval_relu(dr, &ys[r * s..][..s], out, invstd[ch], ws[ch])
                                    } else {
                                        dx_eval(dr, out, invstd[ch], ws[ch])
                                    }
                                };
                                // SAFETY: `dx_eval(_relu)` writes `out` zipped with rows of
                                // `s` values (the slices panic if shorter): the whole row.
                                unsafe { map_rows(n, c, s, row) }
                            }
                        });
                        let dw = need_dw.then(|| {
                            (0..c)
                                .map(|ch| (sums[ch][1] * invstd[ch] as f64) as f32)
                                .collect::<Vec<f32>>()
                        });
                        let db =
                            need_db.then(|| sums.iter().map(|v| v[0] as f32).collect::<Vec<f32>>());
                        (dx, dw, db)
                    })
                })
            })
        });
        let Some(Some(Some(Some((dx, dw, db))))) = res else {
            candle_core::bail!("batch_norm backward: tensors are not CPU f32");
        };
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
                .transpose()?,
            dw.map(|v| Tensor::from_vec(v, w.shape(), dev))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, b.shape(), dev))
                .transpose()?,
        ))
    }
}

/// `y = (x - mean) * invstd * weight + bias` per channel, fused, with gradients to x, weight
/// and bias; `max(y, 0)` with `relu` (the ReLU's mask folded into the backward's passes).
/// `train` says the statistics are the batch's own (`mean`, `invstd` from [`batch_stats`]
/// and [`inv_std`]), so that the input gradient includes their dependence on x; otherwise
/// they are constants (running statistics).
pub(crate) fn batch_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    train: bool,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let c = nc_s(x.dims())?.1;
    if mean.len() != c || invstd.len() != c {
        candle_core::bail!("batch_norm: {} statistics for {c} channels", mean.len());
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let op = BatchNormOp {
        mean,
        invstd,
        train,
        relu,
    };
    x.apply_op3(&weight, &bias, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Tolerance: |got - want| <= TOL * (1 + max |want|).
    const TOL: f32 = 2e-5;

    fn close(what: &str, got: &Tensor, want: &Tensor) {
        crate::kernels::assert_close(what, got, want, TOL)
    }

    /// The composite of candle ops BatchNorm was built from before (batch statistics when
    /// `stats` is None, else the given mean and variance as constants).
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        stats: Option<(&Tensor, &Tensor)>,
        eps: f64,
    ) -> Tensor {
        let rank = x.rank();
        let mut shape = vec![1; rank];
        shape[1] = x.dims()[1];
        let (mean, var) = match stats {
            None => {
                let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
                let n = (x.elem_count() / x.dims()[1]) as f64;
                let mean = (x.sum_keepdim(dims.as_slice()).unwrap() / n).unwrap();
                let var = (x
                    .broadcast_sub(&mean)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_keepdim(dims.as_slice())
                    .unwrap()
                    / n)
                    .unwrap();
                (mean, var)
            }
            Some((m, v)) => (
                m.reshape(shape.as_slice()).unwrap(),
                v.reshape(shape.as_slice()).unwrap(),
            ),
        };
        let inv = (var + eps).unwrap().sqrt().unwrap().recip().unwrap();
        x.broadcast_sub(&mean)
            .unwrap()
            .broadcast_mul(&inv)
            .unwrap()
            .broadcast_mul(&w.reshape(shape.as_slice()).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape(shape.as_slice()).unwrap())
            .unwrap()
    }

    fn check(dims: &[usize], train: bool, relu: bool) {
        let dev = Device::Cpu;
        let c = dims[1];
        let eps = 1e-5;
        // An offset and scale per channel, so that the statistics matter.
        let x = Var::from_tensor(
            &(Tensor::randn(0f32, 1., dims, &dev).unwrap() * 3.0)
                .unwrap()
                .affine(1.0, 0.5)
                .unwrap(),
        )
        .unwrap();
        let w = Var::randn(1f32, 0.3, c, &dev).unwrap();
        let b = Var::randn(0f32, 0.3, c, &dev).unwrap();
        let rm = Tensor::randn(0f32, 1., c, &dev).unwrap();
        let rv = Tensor::rand(0.5f32, 2., c, &dev).unwrap();
        let (ours, theirs) = if train {
            let (mean, var) = batch_stats(x.as_tensor()).unwrap();
            let invstd = inv_std(&var, eps);
            let ours = batch_norm(
                x.as_tensor(),
                w.as_tensor(),
                b.as_tensor(),
                mean,
                invstd,
                true,
                relu,
            )
            .unwrap();
            (
                ours,
                reference(x.as_tensor(), w.as_tensor(), b.as_tensor(), None, eps),
            )
        } else {
            let mean: Vec<f32> = rm.to_vec1().unwrap();
            let invstd = inv_std(&rv.to_vec1::<f32>().unwrap(), eps);
            let ours = batch_norm(
                x.as_tensor(),
                w.as_tensor(),
                b.as_tensor(),
                mean,
                invstd,
                false,
                relu,
            )
            .unwrap();
            (
                ours,
                reference(
                    x.as_tensor(),
                    w.as_tensor(),
                    b.as_tensor(),
                    Some((&rm, &rv)),
                    eps,
                ),
            )
        };
        let theirs = if relu { theirs.relu().unwrap() } else { theirs };
        let what = format!("{dims:?} train={train} relu={relu}");
        close(&format!("y {what}"), &ours, &theirs);
        let vars = [("dx", &x), ("dw", &w), ("db", &b)];
        crate::kernels::assert_same_grads(&what, &ours, &theirs, &vars, TOL);
    }

    #[test]
    fn batch_norm_matches_candle_ops_train_and_eval() {
        for dims in [
            vec![4, 3],
            vec![2, 5, 7],
            vec![3, 4, 5, 6],
            vec![1, 2, 9, 9],
            vec![2, 3, 2, 3, 4],
            // Large enough for the parallel passes.
            vec![16, 8, 24, 24],
        ] {
            for relu in [false, true] {
                check(&dims, true, relu);
                check(&dims, false, relu);
            }
        }
    }

    /// The statistics are PyTorch's: f64 sums; the mean rounded to f32 before the variance.
    #[test]
    fn batch_stats_match_f64_definition() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (5, 3, 7, 11), &dev).unwrap() + 100.0).unwrap();
        let (mean, var) = batch_stats(&x).unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        for ch in 0..3 {
            let vals: Vec<f32> = (0..5)
                .flat_map(|n| v[(n * 3 + ch) * 77..][..77].to_vec())
                .collect();
            let m = (vals.iter().map(|&a| a as f64).sum::<f64>() / vals.len() as f64) as f32;
            let s: f64 = vals.iter().map(|&a| ((a - m) * (a - m)) as f64).sum();
            assert_eq!(mean[ch], m);
            assert!((var[ch] - s as f32 / vals.len() as f32).abs() <= 1e-6 * var[ch].abs());
        }
    }

    /// Constant weight and bias (no variables) get no gradient; x still does.
    #[test]
    fn only_tracked_arguments_get_gradients() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1., (4, 2, 3), &dev).unwrap();
        let w = Tensor::ones(2, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let (mean, var) = batch_stats(x.as_tensor()).unwrap();
        let y = batch_norm(
            x.as_tensor(),
            &w,
            &b,
            mean,
            inv_std(&var, 1e-5),
            true,
            false,
        )
        .unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
    }
}
