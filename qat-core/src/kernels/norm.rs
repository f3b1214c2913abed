//! RmsNorm and LayerNorm over the last dim, as candle `CustomOp`s with their own backward:
//! one pass per row forward (statistics, then the normalised row), one pass per row backward
//! for the input gradient with the weight (and bias) gradients summed per task and added up.
//! candle's fused `rms_norm` / `layer_norm` ops have no backward, and their differentiable
//! `*_slow` forms build a graph of six to ten ops per call; these take contiguous CPU f32
//! tensors and fall back to the `*_slow` forms elsewhere.
//!
//! Arithmetic (f32, per row of length `d`): RmsNorm `y = x * r * alpha` with
//! `r = 1 / sqrt(sum(x^2) / d + eps)`, as candle's and candle-transformers' RmsNorm;
//! LayerNorm `y = (x - mean) * r * alpha + beta` with the biased variance
//! `r = 1 / sqrt(sum((x - mean)^2) / d + eps)` (two passes), as PyTorch's.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{cpu_f32_slice, with_cpu_f32, CHUNK};

/// Rows handed to one rayon task: about [`CHUNK`] elements.
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// Runs `f(row_index, out_row)` over the rows of an `rows x d` output, in parallel when large.
fn map_rows(rows: usize, d: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; rows * d];
    if d == 0 {
        return out;
    }
    let per = rows_per_task(d);
    out.par_chunks_mut(per * d)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, row) in chunk.chunks_mut(d).enumerate() {
                f(t * per + i, row);
            }
        });
    out
}

/// Sums `f(row_index, acc)` into per-task accumulators of `k * d` values and adds them up in
/// task order (the weight and bias gradients; deterministic run to run).
fn sum_rows(rows: usize, d: usize, k: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let per = rows_per_task(d);
    let tasks = rows.div_ceil(per);
    (0..tasks)
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0f32; k * d];
            for r in t * per..((t + 1) * per).min(rows) {
                f(r, &mut acc);
            }
            acc
        })
        // In task order, left to right: the gradient does not depend on rayon's split.
        .collect::<Vec<_>>()
        .into_iter()
        .reduce(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0f32; k * d])
}

fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (mut ia, mut ib) = (a.chunks_exact(8), b.chunks_exact(8));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `1 / sqrt(sum(x^2) / d + eps)` of one row.
fn rms_inv(x: &[f32], eps: f32) -> f32 {
    1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt()
}

/// Mean and `1 / sqrt(var + eps)` of one row (biased variance, two passes).
fn mean_inv(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = sum(x) / d;
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = (acc.iter().sum::<f32>()
        + it.remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum::<f32>())
        / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Rows and row length of a tensor normalised over its last dim.
fn rows_d(shape: &[usize]) -> candle_core::Result<(usize, usize)> {
    match shape.split_last() {
        Some((&d, lead)) if d > 0 => Ok((lead.iter().product(), d)),
        _ => candle_core::bail!("norm: the input needs a non-empty last dim, got {shape:?}"),
    }
}

struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "qat-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = rows_d(l1.dims())?;
        let x = cpu_f32_slice(s1, l1, "rms_norm: input")?;
        let a = cpu_f32_slice(s2, l2, "rms_norm: weight")?;
        if a.len() != d {
            candle_core::bail!("rms_norm: {d} features but {} weights", a.len());
        }
        let y = map_rows(rows, d, |r, out| {
            let xr = &x[r * d..][..d];
            let inv = rms_inv(xr, self.eps);
            for ((o, v), w) in out.iter_mut().zip(xr).zip(a) {
                *o = v * inv * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_da) = (x.track_op(), alpha.track_op());
        if !need_dx && !need_da {
            return Ok((None, None));
        }
        let (rows, d) = rows_d(x.dims())?;
        let (x, alpha) = (x.contiguous()?, alpha.contiguous()?);
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let eps = self.eps;
        let res = with_cpu_f32(&x, |xs| {
            with_cpu_f32(&alpha, |a| {
                with_cpu_f32(&dy, |g| {
                    let dx = need_dx.then(|| {
                        map_rows(rows, d, |r, out| {
                            let (xr, gr) = (&xs[r * d..][..d], &g[r * d..][..d]);
                            let inv = rms_inv(xr, eps);
                            // dot(dy * alpha, x)
                            let mut acc = [0f32; 8];
                            let mut i = 0;
                            while i + 8 <= d {
                                for k in 0..8 {
                                    acc[k] += gr[i + k] * a[i + k] * xr[i + k];
                                }
                                i += 8;
                            }
                            let mut dotp = acc.iter().sum::<f32>();
                            for k in i..d {
                                dotp += gr[k] * a[k] * xr[k];
                            }
                            let k3 = inv * inv * inv * dotp / d as f32;
                            for (((o, gv), av), xv) in out.iter_mut().zip(gr).zip(a).zip(xr) {
                                *o = inv * gv * av - xv * k3;
                            }
                        })
                    });
                    let da = need_da.then(|| {
                        sum_rows(rows, d, 1, |r, acc| {
                            let (xr, gr) = (&xs[r * d..][..d], &g[r * d..][..d]);
                            let inv = rms_inv(xr, eps);
                            for ((s, gv), xv) in acc.iter_mut().zip(gr).zip(xr) {
                                *s += gv * xv * inv;
                            }
                        })
                    });
                    (dx, da)
                })
            })
        });
        let Some(Some(Some((dx, da)))) = res else {
            candle_core::bail!("rms_norm backward: tensors are not CPU f32");
        };
        let dev = x.device();
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
                .transpose()?,
            da.map(|v| Tensor::from_vec(v, alpha.shape(), dev))
                .transpose()?,
        ))
    }
}

struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "qat-layer-norm"
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
        let (rows, d) = rows_d(l1.dims())?;
        let x = cpu_f32_slice(s1, l1, "layer_norm: input")?;
        let a = cpu_f32_slice(s2, l2, "layer_norm: weight")?;
        let b = cpu_f32_slice(s3, l3, "layer_norm: bias")?;
        if a.len() != d || b.len() != d {
            candle_core::bail!(
                "layer_norm: {d} features but {} weights, {} biases",
                a.len(),
                b.len()
            );
        }
        let y = map_rows(rows, d, |r, out| {
            let xr = &x[r * d..][..d];
            let (mean, inv) = mean_inv(xr, self.eps);
            for (((o, v), w), c) in out.iter_mut().zip(xr).zip(a).zip(b) {
                *o = (v - mean) * inv * w + c;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        alpha: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (need_dx, need_da, need_db) = (x.track_op(), alpha.track_op(), beta.track_op());
        if !need_dx && !need_da && !need_db {
            return Ok((None, None, None));
        }
        let (rows, d) = rows_d(x.dims())?;
        let (x, alpha) = (x.contiguous()?, alpha.contiguous()?);
        let dy = dy.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let eps = self.eps;
        let res = with_cpu_f32(&x, |xs| {
            with_cpu_f32(&alpha, |a| {
                with_cpu_f32(&dy, |g| {
                    let dx = need_dx.then(|| {
                        map_rows(rows, d, |r, out| {
                            let (xr, gr) = (&xs[r * d..][..d], &g[r * d..][..d]);
                            let (mean, inv) = mean_inv(xr, eps);
                            // mean(dxhat) and mean(dxhat * xhat), dxhat = dy * alpha
                            let (mut s1, mut s2) = ([0f32; 8], [0f32; 8]);
                            let mut i = 0;
                            while i + 8 <= d {
                                for k in 0..8 {
                                    let gh = gr[i + k] * a[i + k];
                                    s1[k] += gh;
                                    s2[k] += gh * (xr[i + k] - mean);
                                }
                                i += 8;
                            }
                            let (mut m1, mut m2) = (s1.iter().sum::<f32>(), s2.iter().sum::<f32>());
                            for k in i..d {
                                let gh = gr[k] * a[k];
                                m1 += gh;
                                m2 += gh * (xr[k] - mean);
                            }
                            let m1 = m1 / d as f32;
                            let m2 = m2 * inv / d as f32;
                            for (((o, gv), av), xv) in out.iter_mut().zip(gr).zip(a).zip(xr) {
                                let xhat = (xv - mean) * inv;
                                *o = inv * (gv * av - m1 - xhat * m2);
                            }
                        })
                    });
                    let sums = (need_da || need_db).then(|| {
                        sum_rows(rows, d, 2, |r, acc| {
                            let (xr, gr) = (&xs[r * d..][..d], &g[r * d..][..d]);
                            let (mean, inv) = mean_inv(xr, eps);
                            let (da, db) = acc.split_at_mut(d);
                            for (((sa, sb), gv), xv) in da.iter_mut().zip(db).zip(gr).zip(xr) {
                                *sa += gv * (xv - mean) * inv;
                                *sb += gv;
                            }
                        })
                    });
                    (dx, sums)
                })
            })
        });
        let Some(Some(Some((dx, sums)))) = res else {
            candle_core::bail!("layer_norm backward: tensors are not CPU f32");
        };
        let dev = x.device();
        let (da, db) = match sums {
            Some(mut s) => {
                let db = s.split_off(d);
                (need_da.then_some(s), need_db.then_some(db))
            }
            None => (None, None),
        };
        Ok((
            dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
                .transpose()?,
            da.map(|v| Tensor::from_vec(v, alpha.shape(), dev))
                .transpose()?,
            db.map(|v| Tensor::from_vec(v, beta.shape(), dev))
                .transpose()?,
        ))
    }
}

fn fused(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
}

/// RmsNorm over the last dim, differentiable in `x` and `alpha`: the fused kernel on CPU f32,
/// candle's `rms_norm_slow` elsewhere.
pub(crate) fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if fused(&[x, alpha]) {
        x.contiguous()?
            .apply_op2(&alpha.contiguous()?, RmsNormOp { eps })
    } else {
        candle_nn::ops::rms_norm_slow(x, alpha, eps)
    }
}

/// LayerNorm over the last dim, differentiable in `x`, `alpha` and `beta`: the fused kernel on
/// CPU f32, candle's `layer_norm_slow` elsewhere.
pub(crate) fn layer_norm(
    x: &Tensor,
    alpha: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> candle_core::Result<Tensor> {
    if fused(&[x, alpha, beta]) {
        x.contiguous()?.apply_op3(
            &alpha.contiguous()?,
            &beta.contiguous()?,
            LayerNormOp { eps },
        )
    } else {
        candle_nn::ops::layer_norm_slow(x, alpha, beta, eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{assert_close, assert_same_grads};
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic values without a global RNG: a simple LCG mapped to [-2, 2).
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn rms_norm_matches_candle_values_and_gradients() {
        for (shape, seed) in [
            (vec![3, 5, 37], 1u64),
            (vec![70, 128], 2),
            (vec![2, 1, 8], 3),
        ] {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&randn(&shape, seed)).unwrap();
            let a = Var::from_tensor(&randn(&[d], seed + 10)).unwrap();
            let ours = rms_norm(&x, &a, 1e-5).unwrap();
            let theirs = candle_nn::ops::rms_norm_slow(&x, &a, 1e-5).unwrap();
            assert_close("rms_norm", &ours, &theirs, 1e-5);
            let fused_fwd = candle_nn::ops::rms_norm(&x, &a, 1e-5).unwrap();
            assert_close("rms_norm vs candle fused", &ours, &fused_fwd, 1e-6);
            assert_same_grads(
                "rms_norm",
                &ours,
                &theirs,
                &[("x", &x), ("alpha", &a)],
                1e-4,
            );
        }
    }

    #[test]
    fn layer_norm_matches_candle_values_and_gradients() {
        for (shape, seed) in [
            (vec![3, 5, 37], 4u64),
            (vec![70, 128], 5),
            (vec![2, 1, 8], 6),
        ] {
            let d = *shape.last().unwrap();
            let x = Var::from_tensor(&(randn(&shape, seed) + 3.0).unwrap()).unwrap();
            let a = Var::from_tensor(&randn(&[d], seed + 10)).unwrap();
            let b = Var::from_tensor(&randn(&[d], seed + 20)).unwrap();
            let ours = layer_norm(&x, &a, &b, 1e-5).unwrap();
            let theirs = candle_nn::ops::layer_norm_slow(&x, &a, &b, 1e-5).unwrap();
            assert_close("layer_norm", &ours, &theirs, 1e-5);
            assert_same_grads(
                "layer_norm",
                &ours,
                &theirs,
                &[("x", &x), ("alpha", &a), ("beta", &b)],
                1e-4,
            );
        }
    }

    #[test]
    fn large_inputs_run_in_parallel_with_the_same_result() {
        let x = Var::from_tensor(&randn(&[600, 96], 7)).unwrap();
        let a = Var::from_tensor(&randn(&[96], 8)).unwrap();
        let ours = rms_norm(&x, &a, 1e-6).unwrap();
        let theirs = candle_nn::ops::rms_norm_slow(&x, &a, 1e-6).unwrap();
        assert_close("rms_norm large", &ours, &theirs, 1e-5);
        assert_same_grads(
            "rms_norm large",
            &ours,
            &theirs,
            &[("x", &x), ("alpha", &a)],
            1e-4,
        );
    }

    #[test]
    fn an_empty_last_dim_is_an_error() {
        let x = Tensor::zeros((2, 0), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = Tensor::zeros(0, candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(rms_norm(&x, &a, 1e-5).is_err());
    }
}
