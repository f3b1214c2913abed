//! The f32 GEMM every kernel here uses: the `gemm` crate (the one candle's CPU matmul calls),
//! on strided row/column views, optionally accumulating into the destination.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use gemm::Parallelism;

/// Offset one past the last element of an `m x n` matrix with strides `rs`, `cs` (0 when it
/// is empty); `None` on overflow.
fn extent(m: usize, n: usize, rs: usize, cs: usize) -> Option<usize> {
    if m == 0 || n == 0 {
        return Some(0);
    }
    (m - 1)
        .checked_mul(rs)?
        .checked_add((n - 1).checked_mul(cs)?)?
        .checked_add(1)
}

/// Whether distinct elements of an `m x n` matrix with strides `rs`, `cs` lie at distinct
/// offsets (rows or columns do not interleave), so that a destination can be written by
/// several threads at once.
fn distinct(m: usize, n: usize, rs: usize, cs: usize) -> bool {
    match (m <= 1, n <= 1) {
        (true, true) => true,
        (true, false) => cs >= 1,
        (false, true) => rs >= 1,
        (false, false) => {
            (cs >= 1 && n.checked_mul(cs).is_some_and(|w| rs >= w))
                || (rs >= 1 && m.checked_mul(rs).is_some_and(|h| cs >= h))
        }
    }
}

/// A read-only strided matrix view of a borrowed slice: element `(i, j)` is
/// `data[i * rs + j * cs]`. [`sgemm`] checks that the matrix it reads lies inside `data`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix of `cols` columns stored at the start of `data`.
    pub fn rows(data: &'a [f32], cols: usize) -> View<'a> {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// This view's transpose.
    pub fn t(self) -> View<'a> {
        View {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The transpose of a row-major `(rows, cols)` matrix stored at the start of `data`, seen
    /// as a `(cols, rows)` matrix.
    pub fn transposed(data: &'a [f32], cols: usize) -> View<'a> {
        View {
            data,
            rs: 1,
            cs: cols,
        }
    }

    /// Whether an `m x n` matrix with this view's strides lies inside its slice.
    fn holds(&self, m: usize, n: usize) -> bool {
        extent(m, n, self.rs, self.cs).is_some_and(|e| e <= self.data.len())
    }
}

/// The destination of [`sgemm`]: an exclusively borrowed slice of initialised values, or of
/// uninitialised ones that the product overwrites, with strides (element `(i, j)` at
/// `i * rs + j * cs`).
pub(crate) struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    rs: usize,
    cs: usize,
    /// Whether the values are initialised (only then may the product accumulate into them).
    init: bool,
    _borrow: PhantomData<&'a mut [f32]>,
}

impl<'a> Dst<'a> {
    /// A row-major matrix of `cols` columns at the start of `data`.
    pub fn rows(data: &'a mut [f32], cols: usize) -> Dst<'a> {
        Dst::strided(data, cols, 1)
    }

    /// Any strides over `data`.
    pub fn strided(data: &'a mut [f32], rs: usize, cs: usize) -> Dst<'a> {
        Dst {
            ptr: data.as_mut_ptr(),
            len: data.len(),
            rs,
            cs,
            init: true,
            _borrow: PhantomData,
        }
    }

    /// A row-major matrix of `cols` columns at the start of uninitialised `data`, which the
    /// product overwrites (it must not accumulate).
    pub fn uninit_rows(data: &'a mut [MaybeUninit<f32>], cols: usize) -> Dst<'a> {
        Dst::uninit_strided(data, cols, 1)
    }

    /// Any strides over uninitialised `data`, which the product overwrites.
    pub fn uninit_strided(data: &'a mut [MaybeUninit<f32>], rs: usize, cs: usize) -> Dst<'a> {
        Dst {
            ptr: data.as_mut_ptr().cast::<f32>(),
            len: data.len(),
            rs,
            cs,
            init: false,
            _borrow: PhantomData,
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

/// `dst (m x n) = a (m x k) @ b (k x n)`, or `dst += a @ b` when `accumulate`.
///
/// # Panics
/// When a matrix does not lie inside its slice, when the destination's strides make two of
/// its elements share a place, or when asked to accumulate into uninitialised values: each
/// a bug in the calling kernel (its shapes come from a validated convolution geometry),
/// never a consequence of user input. The checks are O(1) per call, in release builds too.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: Dst<'_>,
    accumulate: bool,
    a: View<'_>,
    b: View<'_>,
    par: Parallelism,
) {
    assert!(a.holds(m, k), "sgemm: lhs {m}x{k} outside its slice");
    assert!(b.holds(k, n), "sgemm: rhs {k}x{n} outside its slice");
    assert!(
        extent(m, n, dst.rs, dst.cs).is_some_and(|e| e <= dst.len),
        "sgemm: destination {m}x{n} outside its slice"
    );
    assert!(
        distinct(m, n, dst.rs, dst.cs),
        "sgemm: destination strides {}x{} alias",
        dst.rs,
        dst.cs
    );
    assert!(
        dst.init || !accumulate,
        "sgemm: accumulating into uninitialised values"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: `i * rs + j * cs < extent <= len` (asserted above), inside the
                    // slice `dst` borrows exclusively.
                    unsafe { dst.ptr.add(i * dst.rs + j * dst.cs).write(0.0) };
                }
            }
        }
        return;
    }
    // SAFETY: the asserts above put every element the product reads inside `a.data` and
    // `b.data`, and every element it writes inside the slice `dst` borrows exclusively (so
    // it overlaps neither operand), at distinct places (threads never write the same one);
    // uninitialised destination values are only written (`read_dst` false when not
    // accumulating, and accumulation asserts initialised values).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs as isize,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        )
    }
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
        let want = |i: usize, j: usize| (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f32>();
        let (va, vb) = (View::rows(&a, k), View::transposed(&bt, k));
        let mut dst = vec![1.0f32; m * n];
        sgemm(
            m,
            n,
            k,
            Dst::rows(&mut dst, n),
            true,
            va,
            vb,
            Parallelism::None,
        );
        // Column-major destination, overwritten.
        let mut cm = vec![f32::NAN; m * n];
        sgemm(
            m,
            n,
            k,
            Dst::strided(&mut cm, 1, m),
            false,
            va,
            vb,
            Parallelism::None,
        );
        // Uninitialised destination, overwritten whole.
        let mut un = vec![MaybeUninit::<f32>::uninit(); m * n];
        sgemm(
            m,
            n,
            k,
            Dst::uninit_rows(&mut un, n),
            false,
            va,
            vb,
            Parallelism::None,
        );
        for i in 0..m {
            for j in 0..n {
                assert!((dst[i * n + j] - 1.0 - want(i, j)).abs() < 1e-5, "{i} {j}");
                assert!((cm[j * m + i] - want(i, j)).abs() < 1e-5, "{i} {j}");
                // SAFETY: the product wrote every element of `un` (m x n, row-major).
                let u = unsafe { un[i * n + j].assume_init() };
                assert!((u - want(i, j)).abs() < 1e-5, "{i} {j}");
            }
        }
        // k = 0: zeros, or the destination unchanged when accumulating.
        let mut z = vec![3.0f32; m * n];
        let e = View::rows(&[], 0);
        sgemm(m, n, 0, Dst::rows(&mut z, n), true, e, e, Parallelism::None);
        assert!(z.iter().all(|&v| v == 3.0));
        sgemm(
            m,
            n,
            0,
            Dst::rows(&mut z, n),
            false,
            e,
            e,
            Parallelism::None,
        );
        assert!(z.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn extents_and_aliasing() {
        assert_eq!(extent(0, 5, 9, 9), Some(0));
        assert_eq!(extent(2, 3, 3, 1), Some(6));
        assert_eq!(extent(2, 3, 1, 2), Some(6));
        assert_eq!(extent(usize::MAX, 2, 2, 1), None);
        assert!(distinct(2, 3, 3, 1) && distinct(2, 3, 1, 2) && distinct(1, 4, 0, 1));
        assert!(!distinct(2, 3, 2, 1) && !distinct(2, 3, 0, 1) && !distinct(3, 1, 0, 5));
    }

    /// Runs `sgemm` on `m x n x k` with `a` and `b` of `la` and `lb` values and a destination
    /// of `ld` values with strides `rs`, `cs`.
    #[allow(clippy::too_many_arguments)]
    fn run(m: usize, n: usize, k: usize, la: usize, lb: usize, ld: usize, rs: usize, cs: usize) {
        let (a, b) = (vec![1f32; la], vec![1f32; lb]);
        let mut d = vec![0f32; ld];
        let (va, vb) = (View::rows(&a, k), View::rows(&b, n));
        sgemm(
            m,
            n,
            k,
            Dst::strided(&mut d, rs, cs),
            false,
            va,
            vb,
            Parallelism::None,
        );
    }

    #[test]
    fn in_bounds_runs() {
        run(2, 3, 4, 8, 12, 6, 3, 1);
    }

    #[test]
    #[should_panic(expected = "lhs 2x4 outside")]
    fn short_lhs_panics() {
        run(2, 3, 4, 7, 12, 6, 3, 1);
    }

    #[test]
    #[should_panic(expected = "rhs 4x3 outside")]
    fn short_rhs_panics() {
        run(2, 3, 4, 8, 11, 6, 3, 1);
    }

    #[test]
    #[should_panic(expected = "destination 2x3 outside")]
    fn short_destination_panics() {
        run(2, 3, 4, 8, 12, 5, 3, 1);
    }

    #[test]
    #[should_panic(expected = "alias")]
    fn aliasing_destination_panics() {
        run(2, 3, 4, 8, 12, 6, 2, 1);
    }

    #[test]
    #[should_panic(expected = "uninitialised")]
    fn accumulating_into_uninitialised_values_panics() {
        let a = [1f32; 4];
        let mut un = [MaybeUninit::<f32>::uninit(); 4];
        let v = View::rows(&a, 2);
        sgemm(
            2,
            2,
            2,
            Dst::uninit_rows(&mut un, 2),
            true,
            v,
            v,
            Parallelism::None,
        );
    }
}
