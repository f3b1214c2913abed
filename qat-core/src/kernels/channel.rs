//! Per-channel bias add and division with a per-channel backward: candle's broadcast ops
//! reduce their gradients with a slow generic sum over every other dim, which took 29% of a
//! float and 40% of a QAT training step of MnistNet.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// Channel of element `i` for `inner` elements per channel run and `c` channels.
fn runs(dims: &[usize], dim: usize) -> (usize, usize) {
    (dims[dim], dims[dim + 1..].iter().product::<usize>().max(1))
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let v = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("per-channel op: input is not contiguous"),
    }
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
        let mut out = Vec::with_capacity(y.len());
        for (r, run) in y.chunks(inner).enumerate() {
            let v = p[r % c];
            match self.kind {
                Kind::Add => out.extend(run.iter().map(|&a| a + v)),
                Kind::Div => out.extend(run.iter().map(|&a| a / v)),
            }
        }
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
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let pv = p.to_vec1::<f32>()?;
        let mut sums = vec![0f64; c];
        let (dy, dp) = match self.kind {
            Kind::Add => {
                for (r, run) in g.chunks(inner).enumerate() {
                    sums[r % c] += run.iter().map(|&v| v as f64).sum::<f64>();
                }
                (grad.clone(), sums)
            }
            Kind::Div => {
                // d/dy (y / s) = 1 / s;  d/ds = -sum(dy * y) / s^2 = -sum(dy * out) / s.
                let o = res.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                let mut dy = Vec::with_capacity(g.len());
                for (r, (gr, orun)) in g.chunks(inner).zip(o.chunks(inner)).enumerate() {
                    let s = pv[r % c];
                    dy.extend(gr.iter().map(|&v| v / s));
                    sums[r % c] -= gr
                        .iter()
                        .zip(orun)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / s as f64;
                }
                (Tensor::from_vec(dy, y.shape(), y.device())?, sums)
            }
        };
        let dp: Vec<f32> = dp.into_iter().map(|v| v as f32).collect();
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
