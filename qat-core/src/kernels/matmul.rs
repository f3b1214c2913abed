//! The f32 GEMM every kernel here uses: the `gemm` crate (the one candle's CPU matmul calls),
//! on strided row/column views, optionally accumulating into the destination.

use gemm::Parallelism;

/// A read-only strided matrix view: element `(i, j)` lies at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl View {
    /// A row-major `(rows, cols)` matrix stored at the start of `data`.
    pub fn rows(data: &[f32], cols: usize) -> View {
        View {
            ptr: data.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// This view's transpose.
    pub fn t(self) -> View {
        View {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The transpose of a row-major `(rows, cols)` matrix stored at the start of `data`, seen
    /// as a `(cols, rows)` matrix.
    pub fn transposed(data: &[f32], cols: usize) -> View {
        View {
            ptr: data.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }
}

/// Multi-threading of one GEMM: `threads > 1` hands it to rayon (the `gemm` crate itself only
/// splits products above its threading threshold).
pub(crate) fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst (m x n) = a (m x k) @ b (k x n)`, or `dst += a @ b` when `accumulate`; `dst` is
/// row-major with row stride `dst_rs`.
///
/// # Safety
/// `dst` must be valid for writes (and, when `accumulate`, reads) of an `m x n` matrix with
/// row stride `dst_rs` and unit column stride; `a` and `b` must be valid for reads of `m x k`
/// and `k x n` matrices with their strides; `dst` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: View,
    b: View,
    par: Parallelism,
) {
    sgemm_strided(m, n, k, dst, dst_rs, 1, accumulate, a, b, par)
}

/// [`sgemm`] with any destination strides: element `(i, j)` of `dst` at `i * dst_rs + j *
/// dst_cs`.
///
/// # Safety
/// As [`sgemm`], for the destination's strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    dst_cs: usize,
    accumulate: bool,
    a: View,
    b: View,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *dst.add(i * dst_rs + j * dst_cs) = 0.0;
                }
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_naive_with_strides_and_accumulation() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        // b stored transposed: (n, k) row-major.
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut dst = vec![1.0f32; m * n];
        unsafe {
            sgemm(
                m,
                n,
                k,
                dst.as_mut_ptr(),
                n,
                true,
                View::rows(&a, k),
                View::transposed(&bt, k),
                Parallelism::None,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
                assert!((dst[i * n + j] - want).abs() < 1e-5, "{i} {j}");
            }
        }
    }
}
