//! Rotary embeddings on interleaved pairs (Llama's convention) as a candle `CustomOp3` with a
//! backward. candle's fused `candle_nn::rotary_emb::rope_i` has none (its output is cut from
//! the graph, so q's and k's projections would get no gradient), and its differentiable
//! `rope_i_slow` builds a graph of a dozen ops.
//!
//! Arithmetic (f32), for each pair `(x0, x1) = (x[2i], x[2i + 1])` of a row at position `t`,
//! with `c = cos[t][i]`, `s = sin[t][i]`: `y0 = x0 * c - x1 * s`, `y1 = x0 * s + x1 * c`,
//! the products and order of `rope_i`'s CPU kernel (equal bit for bit). The backward is the
//! inverse rotation, the same op with `-sin`.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{cpu_f32_slice, CHUNK};

struct RopeI;

impl CustomOp3 for RopeI {
    fn name(&self) -> &'static str {
        "qat-rope-i"
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
        let (_, _, t, d) = l1.shape().dims4()?;
        let x = cpu_f32_slice(s1, l1, "rope_i: input")?;
        let cos = cpu_f32_slice(s2, l2, "rope_i: cos")?;
        let sin = cpu_f32_slice(s3, l3, "rope_i: sin")?;
        if cos.len() != t * d / 2 || sin.len() != t * d / 2 {
            candle_core::bail!(
                "rope_i: cos/sin of {} / {} values for {t} positions x {} pairs",
                cos.len(),
                sin.len(),
                d / 2
            );
        }
        let mut y = vec![0f32; x.len()];
        let td = (t * d).max(2);
        // Whole (batch, head) slices per task, about CHUNK elements each.
        let per = (CHUNK / td).max(1) * td;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(ys, xs)| {
                for (yr, xr) in ys.chunks_mut(td).zip(xs.chunks(td)) {
                    for (i, (yp, xp)) in yr.chunks_exact_mut(2).zip(xr.chunks_exact(2)).enumerate()
                    {
                        let (c, s) = (cos[i], sin[i]);
                        yp[0] = xp[0] * c - xp[1] * s;
                        yp[1] = xp[0] * s + xp[1] * c;
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        // The rotation's transpose is the rotation by -angle. cos and sin are constants.
        let dx = rope_i(dy, cos, &sin.neg()?)?;
        Ok((Some(dx), None, None))
    }
}

/// Interleaved-pair rotary embedding of `x` `(batch, heads, seq, head_dim)` with `cos`, `sin`
/// `(>= seq, head_dim / 2)` (their first `seq` rows are used), differentiable in `x`: the
/// fused kernel on CPU f32, candle's `rope_i_slow` elsewhere.
pub(crate) fn rope_i(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (ct, cd) = cos.dims2()?;
    if sin.dims() != cos.dims() || cd * 2 != d || ct < t {
        candle_core::bail!(
            "rope_i: x {:?} needs cos and sin of ({t}.., {}), got {:?} and {:?}",
            x.dims(),
            d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
    let fused = [x, &cos, &sin]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32);
    if fused {
        x.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeI)
    } else {
        candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn rope_equals_candle_rope_i_bit_for_bit_and_its_gradient_is_the_slow_forms() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (2, 3, 7, 8), &dev).unwrap()).unwrap();
        let ang = Tensor::randn(0f32, 2., (9, 4), &dev).unwrap();
        let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
        let ours = rope_i(&x, &cos, &sin).unwrap();
        let (c7, s7) = (
            cos.narrow(0, 0, 7).unwrap().contiguous().unwrap(),
            sin.narrow(0, 0, 7).unwrap().contiguous().unwrap(),
        );
        let fast = candle_nn::rotary_emb::rope_i(&x, &c7, &s7).unwrap();
        let a: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = fast.flatten_all().unwrap().to_vec1().unwrap();
        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
        let slow = candle_nn::rotary_emb::rope_i_slow(&x, &cos, &sin).unwrap();
        crate::kernels::assert_same_grads("rope dx", &ours, &slow, &[("x", &x)], 1e-6);
        // A strided input (a transposed view) and the errors.
        let xt = x
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(!xt.is_contiguous());
        let again = rope_i(&xt, &cos, &sin).unwrap();
        crate::kernels::assert_close("strided", &again, &ours, 0.0);
        assert!(rope_i(&x, &cos.narrow(0, 0, 6).unwrap(), &sin).is_err());
        assert!(rope_i(&x, &cos.narrow(1, 0, 3).unwrap(), &sin).is_err());
    }
}
