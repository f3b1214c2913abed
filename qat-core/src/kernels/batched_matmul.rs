//! Batched matmuls of many small matrices (attention's `q · kᵀ` and `p · v`, one product per
//! (batch, head)) as one candle `CustomOp2`, the batch split over rayon's threads.
//!
//! candle's CPU matmul runs the batch one product after another, each handed to the `gemm`
//! crate with its thread count; products of 64 x 64 x 32 are below gemm's threading
//! threshold, so at two threads attention's six batched products per block (two forward,
//! four backward) ran on one. Here each product is one single-threaded gemm call with the
//! strides candle passes for contiguous operands (the same arithmetic: the values are candle's
//! bit for bit; strided operands are copied contiguous first), and the batch is shared out. The backward computes what candle's matmul backward and, for `a ·
//! bᵀ`, its transpose node compute: `da = g · op(b)ᵀ`, `db = aᵀ · g` (written transposed for
//! `a · bᵀ`), with the same products.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::matmul::{sgemm, Dst, View};
use crate::host::{alloc_with, cpu_f32_slice};

/// `c_i = op(a_i) · op(b_i)` over the batch, where `op(x) = xᵀ` when the flag is set, each
/// operand stored contiguous as `(batch.., rows, cols)`; `c` stored `(batch.., m, n)`, or
/// `(batch.., n, m)` (its transpose) when `tc`.
#[derive(Clone, Copy, Debug)]
pub(super) struct BatchedGemm {
    ta: bool,
    tb: bool,
    tc: bool,
}

/// The shapes of one [`BatchedGemm`]: batch count, `m`, `n`, `k`, and the output dims.
pub(super) struct Plan {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub out: Vec<usize>,
}

impl BatchedGemm {
    pub(super) fn new(ta: bool, tb: bool, tc: bool) -> Self {
        BatchedGemm { ta, tb, tc }
    }

    fn plan(&self, a: &[usize], b: &[usize]) -> candle_core::Result<Plan> {
        let split = |d: &[usize]| -> Option<(usize, usize, Vec<usize>)> {
            match d {
                [lead @ .., r, c] => Some((*r, *c, lead.to_vec())),
                _ => None,
            }
        };
        let (Some((ra, ca, la)), Some((rb, cb, lb))) = (split(a), split(b)) else {
            candle_core::bail!("batched matmul: operands of rank >= 2, got {a:?} and {b:?}");
        };
        let (m, k) = if self.ta { (ca, ra) } else { (ra, ca) };
        let (k2, n) = if self.tb { (cb, rb) } else { (rb, cb) };
        if la != lb || k != k2 {
            candle_core::bail!(
                "batched matmul: {a:?} and {b:?} do not multiply (transposed: {}, {})",
                self.ta,
                self.tb
            );
        }
        let mut out = la.clone();
        out.extend(if self.tc { [n, m] } else { [m, n] });
        Ok(Plan {
            batch: la.iter().product(),
            m,
            n,
            k,
            out,
        })
    }
}

/// An operand stored row-major with `cols` columns, seen transposed when `t`.
fn view(data: &[f32], t: bool, cols: usize) -> View<'_> {
    if t {
        View::transposed(data, cols)
    } else {
        View::rows(data, cols)
    }
}

impl BatchedGemm {
    pub(super) fn run(&self, a: &[f32], b: &[f32], p: &Plan) -> candle_core::Result<Vec<f32>> {
        let Plan { batch, m, n, k, .. } = *p;
        let (a_len, b_len, c_len) = (m * k, k * n, m * n);
        // One product takes the threads (gemm splits it when it is large enough); a batch
        // is shared out, one single-threaded product at a time (the values are the same
        // either way: gemm splits the output, never a sum).
        let par = if batch == 1 {
            super::matmul::parallelism(super::num_threads())
        } else {
            Parallelism::None
        };
        if a.len() != batch * a_len || b.len() != batch * b_len {
            candle_core::bail!(
                "batched matmul: {} and {} values for {batch} products of {m}x{k} and {k}x{n}",
                a.len(),
                b.len()
            );
        }
        // The stored column counts of a and b.
        let (ca, cb) = (if self.ta { m } else { k }, if self.tb { k } else { n });
        let product = |i: usize, c: &mut [MaybeUninit<f32>]| {
            let av = view(&a[i * a_len..(i + 1) * a_len], self.ta, ca);
            let bv = view(&b[i * b_len..(i + 1) * b_len], self.tb, cb);
            let dst = if self.tc {
                Dst::uninit_strided(c, 1, m)
            } else {
                Dst::uninit_rows(c, n)
            };
            sgemm(m, n, k, dst, false, av, bv, par);
        };
        let fill = |out: &mut [MaybeUninit<f32>]| {
            if c_len > 0 && batch == 1 {
                product(0, out);
            } else if c_len > 0 {
                out.par_chunks_mut(c_len)
                    .enumerate()
                    .for_each(|(i, c)| product(i, c));
            }
        };
        // SAFETY: `out` holds `batch * c_len` elements, split into the `batch` chunks of
        // `c_len = m * n` (none when `c_len` is 0; the whole of `out` when `batch` is 1); each chunk is the destination of one
        // `m x n` product, row-major or (`tc`) column-major, which writes all `m * n` of its
        // places (sgemm overwrites every element of its destination, zeros when `k` is 0,
        // and asserts that the destination lies inside the chunk and that no two elements
        // share a place).
        Ok(unsafe { alloc_with(batch * c_len, fill) })
    }
}

impl CustomOp2 for BatchedGemm {
    fn name(&self) -> &'static str {
        "qat-batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = self.plan(l1.dims(), l2.dims())?;
        let a = cpu_f32_slice(s1, l1, "batched matmul: lhs")?;
        let b = cpu_f32_slice(s2, l2, "batched matmul: rhs")?;
        let c = self.run(a, b, &p)?;
        Ok((CpuStorage::F32(c), Shape::from(p.out)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        dc: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if self.ta || self.tc {
            candle_core::bail!("batched matmul: only the forward products have a backward");
        }
        let g = dc.detach().contiguous()?;
        let (need_a, need_b) = (a.track_op(), b.track_op());
        let (a, b) = (a.detach(), b.detach());
        // candle: lhs_grad = g.matmul(rhs.t()), rhs = b or (tb) bᵀ.
        let da = if need_a {
            let op = BatchedGemm {
                ta: false,
                tb: !self.tb,
                tc: false,
            };
            Some(g.apply_op2_no_bwd(&b, &op)?)
        } else {
            None
        };
        // candle: rhs_grad = lhs.t().matmul(g), then (tb) the transpose node's transpose.
        let db = if need_b {
            let op = BatchedGemm {
                ta: true,
                tb: false,
                tc: self.tb,
            };
            Some(a.apply_op2_no_bwd(&g, &op)?)
        } else {
            None
        };
        Ok((da, db))
    }
}

fn fused(a: &Tensor, b: &Tensor) -> bool {
    [a, b]
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
        && a.rank() >= 3
}

/// `a · b` over `(batch.., m, k)` and `(batch.., k, n)`: the values and gradients of candle's
/// `a.matmul(&b)`, with the batch split over threads on CPU f32 (rank >= 3); bit for bit for
/// contiguous operands (strided ones are copied first; candle's GEMM reads their strides, which
/// can change the last bit of a sum).
pub(crate) fn batched_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fused(a, b) {
        let op = BatchedGemm {
            ta: false,
            tb: false,
            tc: false,
        };
        a.contiguous()?.apply_op2(&b.contiguous()?, op)
    } else {
        a.matmul(b)
    }
}

/// `a · bᵀ` over `(batch.., m, k)` and `(batch.., n, k)`: the values and gradients of
/// candle's `a.matmul(&b.t()?)`, with the batch split over threads on CPU f32 (rank >= 3).
pub(crate) fn batched_matmul_t(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if fused(a, b) {
        let op = BatchedGemm {
            ta: false,
            tb: true,
            tc: false,
        };
        a.contiguous()?.apply_op2(&b.contiguous()?, op)
    } else {
        a.matmul(&b.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::kernels::assert_same_bits;

    #[test]
    fn batched_products_equal_candles_values_and_gradients_bit_for_bit() {
        let dev = Device::Cpu;
        // Attention's shapes (b, h, t, d), odd ones, and one large enough for gemm's own
        // threading in candle's call.
        for (lead, m, k, n) in [
            (vec![2, 4], 64, 32, 64),
            (vec![3], 5, 7, 3),
            (vec![1, 3], 17, 2, 9),
            (vec![2], 300, 200, 260),
        ] {
            let mk = |r: usize, c: usize| {
                let mut d = lead.clone();
                d.extend([r, c]);
                Var::from_tensor(&Tensor::randn(0f32, 1., d, &dev).unwrap()).unwrap()
            };
            let (a, b, bt) = (mk(m, k), mk(k, n), mk(n, k));
            for (what, ours, theirs, rhs) in [
                (
                    "a·b",
                    batched_matmul(&a, &b).unwrap(),
                    a.matmul(&b).unwrap(),
                    &b,
                ),
                (
                    "a·bᵀ",
                    batched_matmul_t(&a, &bt).unwrap(),
                    a.matmul(&bt.t().unwrap()).unwrap(),
                    &bt,
                ),
            ] {
                let case = format!("{what} {lead:?} {m}x{k}x{n}");
                assert_same_bits(&case, &ours, &theirs, &[("a", &a), ("b", rhs)]);
            }
        }
    }

    #[test]
    fn batched_products_refuse_what_does_not_multiply() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
        let b = Tensor::zeros((3, 4, 5), DType::F32, &dev).unwrap();
        assert!(batched_matmul(&a, &b).is_err(), "batch 2 vs 3");
        let c = Tensor::zeros((2, 5, 5), DType::F32, &dev).unwrap();
        assert!(batched_matmul(&a, &c).is_err(), "k 4 vs 5");
        assert!(batched_matmul_t(&a, &c).is_err(), "k 4 vs 5, transposed");
        // An empty inner dim gives zeros, as candle's matmul.
        let e = Tensor::zeros((2, 3, 0), DType::F32, &dev).unwrap();
        let f = Tensor::zeros((2, 0, 4), DType::F32, &dev).unwrap();
        let z = batched_matmul(&e, &f).unwrap();
        assert_eq!(z.dims(), &[2, 3, 4]);
        assert!(z
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }
}
