//! A Linear layer's product `y = x · wᵀ` as one candle `CustomOp2` on the CPU, for inputs of
//! any rank (the leading dims folded into rows).
//!
//! candle's `broadcast_matmul` builds four graph nodes for it (`reshape`, `w.t()`, `matmul`,
//! `reshape`), and its backward gives each node a gradient buffer that it zero-fills and adds
//! into; for a (batch, tokens, features) activation that is two extra activation-sized
//! buffers per Linear, zero-filled on one thread. Here the product is one node: the forward
//! makes the GEMM call candle's CPU matmul makes, with the same strides (so the values are
//! candle's, bit for bit; in f32 into an output that is not zero-filled first, other dtypes
//! through candle's matmul itself), and the backward computes what candle's matmul backward
//! computes, `dx = dy · w` and `dw = (xᵀ · dy)ᵀ`, with the same products (`dw` written
//! through transposed strides, so that it comes out contiguous). The gradients equal the composite's except
//! possibly for the sign of an exact zero (candle adds `dy` into a zero buffer before using it,
//! which turns `-0.0` into `+0.0`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use super::batched_matmul::{BatchedGemm, Plan};
use crate::host::cpu_f32_slice;

use crate::error::Result;

/// `y = x · wᵀ` for `x` of shape `(..., k)` (contiguous) and `w` of shape `(n, k)`.
struct LinearMatmul;

/// `(rows, k, n)` of the product, checked.
fn linear_dims(x: &[usize], w: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match (x.split_last(), w) {
        (Some((&k, lead)), &[n, k2]) if !lead.is_empty() && k == k2 => {
            Ok((lead.iter().product(), k, n))
        }
        _ => candle_core::bail!(
            "linear: the input (..., k) and the weight (n, k) do not fit: {x:?} and {w:?}"
        ),
    }
}

impl CustomOp2 for LinearMatmul {
    fn name(&self) -> &'static str {
        "qat-linear-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = linear_dims(l1.dims(), l2.dims())?;
        if !l1.is_contiguous() {
            candle_core::bail!("linear: the input is not contiguous");
        }
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (s1, s2) {
            // f32: the product gemm computes for candle's matmul, into a buffer that is not
            // zero-filled first (candle's is, on one thread).
            let x = cpu_f32_slice(s1, l1, "linear: input")?;
            let w = cpu_f32_slice(s2, l2, "linear: weight")?;
            let plan = Plan {
                batch: 1,
                m,
                n,
                k,
                out: dims.clone(),
            };
            let y = BatchedGemm::new(false, true, false).run(x, w, &plan)?;
            return Ok((CpuStorage::F32(y), Shape::from(dims)));
        }
        // The layouts candle's `broadcast_matmul` hands its matmul: the input folded to
        // (m, k) in place, the weight's transpose as a view.
        let lhs = Layout::contiguous_with_offset((m, k), l1.start_offset());
        let rhs = l2.transpose(0, 1)?;
        let y = s1.matmul(s2, (1, m, n, k), &lhs, &rhs)?;
        Ok((y, Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k, n) = linear_dims(x.dims(), w.dims())?;
        // Detached: the gradients are plain values, not new graphs over the forward's tensors.
        // Contiguous once for both products (a no-op for the gradients candle accumulates).
        let g = dy.detach().reshape((m, n))?.contiguous()?;
        let f32 = g.dtype() == DType::F32 && w.dtype() == DType::F32;
        let dx = if !x.track_op() {
            None
        } else if f32 {
            // candle: `grad.matmul(&rhs.t())` with rhs = w.t(), i.e. w's own layout.
            let op = BatchedGemm::new(false, false, false);
            let w = w.detach().contiguous()?;
            Some(g.apply_op2_no_bwd(&w, &op)?.reshape(x.dims())?)
        } else {
            Some(g.matmul(&w.detach())?.reshape(x.dims())?)
        };
        let dw = if !w.track_op() {
            None
        } else if f32 {
            // candle: `lhs.t().matmul(&grad)` for the transposed weight, then the transpose's
            // backward; here written through transposed strides, contiguous (n, k).
            let op = BatchedGemm::new(true, false, true);
            let x = x.detach().reshape((m, k))?;
            Some(x.apply_op2_no_bwd(&g, &op)?)
        } else {
            Some(x.detach().reshape((m, k))?.t()?.matmul(&g)?.t()?)
        };
        Ok((dx, dw))
    }
}

/// `x · wᵀ` as one op when `x` (rank >= 2) and `w` are contiguous CPU tensors; `None` otherwise
/// (the caller runs candle's `matmul` / `broadcast_matmul`, which give the same values).
pub(crate) fn linear_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let fits = matches!(x.device(), Device::Cpu)
        && x.rank() >= 2
        && x.is_contiguous()
        && w.rank() == 2
        && w.is_contiguous()
        && x.dtype() == w.dtype();
    if !fits {
        return Ok(None);
    }
    Ok(Some(x.apply_op2(w, LinearMatmul)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    use crate::kernels::{assert_same_bits, bits};

    /// candle's product and gradients: what `Linear` computed before this op.
    fn composite(x: &Tensor, w: &Tensor) -> Tensor {
        let wt = w.t().unwrap();
        if x.rank() == 2 {
            x.matmul(&wt).unwrap()
        } else {
            x.broadcast_matmul(&wt).unwrap()
        }
    }

    #[test]
    fn linear_matmul_equals_candles_product_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        for (xs, n) in [
            (vec![5, 7], 3),
            (vec![4, 16, 128], 352),
            (vec![2, 3, 5, 33], 17),
        ] {
            let k = *xs.last().unwrap();
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., xs.clone(), &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&Tensor::randn(0f32, 0.1, (n, k), &dev).unwrap()).unwrap();
            let ours = linear_matmul(&x, &w).unwrap().unwrap();
            let theirs = composite(&x, &w);
            assert_same_bits(&format!("{xs:?}"), &ours, &theirs, &[("x", &x), ("w", &w)]);
        }
    }

    #[test]
    fn linear_matmul_takes_other_float_dtypes_and_skips_untracked_operands() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (3, 4, 8), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let w = Var::from_tensor(
            &Tensor::randn(0f32, 1., (5, 8), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        )
        .unwrap();
        let ours = linear_matmul(&x, &w).unwrap().unwrap();
        assert_eq!(bits(&ours), bits(&composite(&x, &w)));
        let grads = ours.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_some() && grads.get(&x).is_none());
    }

    #[test]
    fn linear_matmul_leaves_what_it_does_not_take_to_the_caller() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 8), &dev).unwrap();
        // A strided input or weight (e.g. a weight stored (in, out) and loaded transposed),
        // a vector and mixed dtypes go to candle's matmul.
        let xt = Tensor::randn(0f32, 1., (8, 3), &dev).unwrap().t().unwrap();
        assert!(linear_matmul(&xt, &w).unwrap().is_none());
        let wt = Tensor::randn(0f32, 1., (8, 5), &dev).unwrap().t().unwrap();
        let x3 = Tensor::randn(0f32, 1., (2, 3, 8), &dev).unwrap();
        assert!(linear_matmul(&x3, &wt).unwrap().is_none());
        let v = Tensor::randn(0f32, 1., 8, &dev).unwrap();
        assert!(linear_matmul(&v, &w).unwrap().is_none());
        let xb = Tensor::zeros((2, 8), DType::BF16, &dev).unwrap();
        assert!(linear_matmul(&xb, &w).unwrap().is_none());
        // A shape mismatch is an error, not a wrong product.
        let x = Tensor::randn(0f32, 1., (2, 7), &dev).unwrap();
        assert!(linear_matmul(&x, &w).is_err());
    }
}
