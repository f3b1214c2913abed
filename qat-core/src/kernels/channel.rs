//! Per-channel bias add and division with a per-channel backward: candle's broadcast ops
//! reduce their gradients with a slow generic sum over every other dim, which took 29% of a
//! float and 40% of a QAT training step of MnistNet.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::sums::{dot_f64, sum_f64};
use crate::error::Result;
use crate::host::{alloc_with, cpu_f32_slice, with_cpu_f32, CHUNK};

/// Channel of element `i` for `inner` elements per channel run and `c` channels.
fn runs(dims: &[usize], dim: usize) -> (usize, usize) {
    (dims[dim], dims[dim + 1..].iter().product::<usize>().max(1))
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    cpu_f32_slice(s, l, "per-channel op")
}

#[derive(Clone, Copy)]
enum Kind {
    Add,
    Div,
}

struct ChannelOp {
    kind: Kind,
    dim: usize,
}

/// Channel runs per rayon task: about `CHUNK` elements each.
fn min_runs(inner: usize) -> usize {
    (CHUNK / inner.max(1)).max(1)
}

/// Folds per-run sums into per-channel sums (run `r` belongs to channel `r % c`).
fn channel_sums(rows: Vec<f64>, c: usize) -> Vec<f64> {
    let mut sums = vec![0f64; c];
    for (r, v) in rows.into_iter().enumerate() {
        sums[r % c] += v;
    }
    sums
}

fn no_f32(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{what}: expected a contiguous f32 CPU tensor"))
}

impl CustomOp2 for ChannelOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Add => "channel-add",
            Kind::Div => "channel-div",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, p) = (slice(s1, l1)?, slice(s2, l2)?);
        let (c, inner) = runs(l1.dims(), self.dim);
        let kind = self.kind;
        let fill = |out: &mut [MaybeUninit<f32>]| {
            out.par_chunks_mut(inner)
                .zip(y.par_chunks(inner))
                .enumerate()
                .with_min_len(min_runs(inner))
                .for_each(|(r, (o, run))| {
                    let v = p[r % c];
                    match kind {
                        Kind::Add => o.iter_mut().zip(run).for_each(|(o, &a)| {
                            o.write(a + v);
                        }),
                        Kind::Div => o.iter_mut().zip(run).for_each(|(o, &a)| {
                            o.write(a / v);
                        }),
                    }
                })
        };
        // SAFETY: `out` and `y` have the same length, so their chunks of `inner` pair up
        // one to one with equal lengths, and each output chunk is written zipped with its
        // input chunk: whole.
        let out = unsafe { alloc_with(y.len(), fill) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        p: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (c, inner) = runs(y.dims(), self.dim);
        let grad = grad.contiguous()?;
        let pv = p.to_vec1::<f32>()?;
        let (dy, sums) = match self.kind {
            Kind::Add => {
                let rows = with_cpu_f32(&grad, |g| {
                    g.par_chunks(inner)
                        .with_min_len(min_runs(inner))
                        .map(sum_f64)
                        .collect::<Vec<f64>>()
                })
                .ok_or_else(|| no_f32("channel-add backward"))?;
                (grad.clone(), channel_sums(rows, c))
            }
            Kind::Div => {
                // d/dy (y / s) = 1 / s;  d/ds = -sum(dy * y) / s^2 = -sum(dy * out) / s.
                let res = res.contiguous()?;
                let (dy, rows) = with_cpu_f32(&grad, |g| {
                    with_cpu_f32(&res, |o| {
                        let mut rows = Vec::new();
                        // The output and its gradient have the op's output shape.
                        assert_eq!(g.len(), o.len(), "channel-div backward: shapes differ");
                        let fill = |dy: &mut [MaybeUninit<f32>]| {
                            rows = dy
                                .par_chunks_mut(inner)
                                .zip(g.par_chunks(inner).zip(o.par_chunks(inner)))
                                .enumerate()
                                .with_min_len(min_runs(inner))
                                .map(|(r, (d, (gr, orun)))| {
                                    let s = pv[r % c];
                                    d.iter_mut().zip(gr).for_each(|(d, &v)| {
                                        d.write(v / s);
                                    });
                                    -dot_f64(gr, orun) / s as f64
                                })
                                .collect::<Vec<f64>>()
                        };
                        // SAFETY: `dy`, `g` and `o` have one length (asserted above), so
                        // their chunks of `inner` pair up with equal lengths, and each `dy`
                        // chunk is written zipped with its `g` chunk: whole.
                        let dy = unsafe { alloc_with(g.len(), fill) };
                        (dy, rows)
                    })
                })
                .flatten()
                .ok_or_else(|| no_f32("channel-div backward"))?;
                (
                    Tensor::from_vec(dy, y.shape(), y.device())?,
                    channel_sums(rows, c),
                )
            }
        };
        let dp: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
        Ok((Some(dy), Some(Tensor::from_vec(dp, p.shape(), p.device())?)))
    }
}

fn fused_ok(y: &Tensor, p: &Tensor, dim: usize) -> bool {
    y.device().is_cpu()
        && y.dtype() == candle_core::DType::F32
        && p.dtype() == candle_core::DType::F32
        && p.rank() == 1
        && dim < y.rank()
        && y.dims()[dim] == p.elem_count()
}

fn shaped(p: &Tensor, rank: usize, dim: usize) -> Result<Tensor> {
    let mut s = vec![1; rank];
    s[dim] = p.elem_count();
    Ok(p.reshape(s)?)
}

/// `y + b` with `b` (shape `[C]`) along `dim`.
pub(crate) fn add_channel(y: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    if fused_ok(y, b, dim) {
        return Ok(y.contiguous()?.apply_op2(
            &b.contiguous()?,
            ChannelOp {
                kind: Kind::Add,
                dim,
            },
        )?);
    }
    Ok(y.broadcast_add(&shaped(b, y.rank(), dim)?)?)
}

/// `y / s` with `s` (shape `[C]`) along `dim`.
pub(crate) fn div_channel(y: &Tensor, s: &Tensor, dim: usize) -> Result<Tensor> {
    if fused_ok(y, s, dim) {
        return Ok(y.contiguous()?.apply_op2(
            &s.contiguous()?,
            ChannelOp {
                kind: Kind::Div,
                dim,
            },
        )?);
    }
    Ok(y.broadcast_div(&shaped(s, y.rank(), dim)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_broadcast_ops_and_their_gradients() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, dim) in [
            (vec![3, 4, 5, 2], 1usize),
            (vec![6, 4], 1),
            (vec![2, 3, 4], 2),
        ] {
            let y = Var::from_tensor(&Tensor::randn(0f32, 1., shape.as_slice(), &dev)?)?;
            let c = shape[dim];
            let p = Var::from_tensor(&(Tensor::rand(0.5f32, 2., c, &dev)?))?;
            let g = Tensor::randn(0f32, 1., shape.as_slice(), &dev)?;
            for div in [false, true] {
                let ours = if div {
                    div_channel(y.as_tensor(), p.as_tensor(), dim)?
                } else {
                    add_channel(y.as_tensor(), p.as_tensor(), dim)?
                };
                let pr = shaped(p.as_tensor(), shape.len(), dim)?;
                let reference = if div {
                    y.as_tensor().broadcast_div(&pr)?
                } else {
                    y.as_tensor().broadcast_add(&pr)?
                };
                let (a, b) = (
                    ours.flatten_all()?.to_vec1::<f32>()?,
                    reference.flatten_all()?.to_vec1::<f32>()?,
                );
                assert_eq!(a, b);
                let ga = (ours * &g)?.sum_all()?.backward()?;
                let gb = (reference * &g)?.sum_all()?.backward()?;
                for v in [&y, &p] {
                    let x = ga
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let w = gb
                        .get(v.as_tensor())
                        .unwrap()
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    for (x, w) in x.iter().zip(&w) {
                        assert!((x - w).abs() <= 1e-4 * (1.0 + w.abs()), "{x} vs {w}");
                    }
                }
            }
        }
        Ok(())
    }
}
