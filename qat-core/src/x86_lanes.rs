//! AVX2 helpers the explicit x86-64 kernels share: reducing 8 vectors (twice) to one, one
//! vector's reduction per lane (the step that lets 8 groups or blocks compute their scales together).

use std::arch::x86_64::*;

/// `([op_a-fold(a_0), .., op_a-fold(a_7)], [op_b-fold(b_0), .., op_b-fold(b_7)])` for the
/// pairs `(a_i, b_i) = f(i)`: each vector reduced by its operation (associative and
/// commutative lane-wise, such as `max` or `min` on NaN-free data) into lane `i`, an 8x8
/// transpose folded into the reduction. The pairs are consumed as they come (two at a
/// time), so that only a few partial results are live: `f` can load and reduce a block per
/// call without 16 vectors spilling.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn reduce8x2(
    mut f: impl FnMut(usize) -> (__m256, __m256),
    op_a: impl Fn(__m256, __m256) -> __m256,
    op_b: impl Fn(__m256, __m256) -> __m256,
) -> (__m256, __m256) {
    let z = _mm256_setzero_ps();
    let (mut qa, mut qb) = ([z; 2], [z; 2]);
    for h in 0..2 {
        let (mut pa, mut pb) = ([z; 2], [z; 2]);
        for k in 0..2 {
            let i = 4 * h + 2 * k;
            let (a0, b0) = f(i);
            let (a1, b1) = f(i + 1);
            pa[k] = pair(&op_a, a0, a1);
            pb[k] = pair(&op_b, b0, b1);
        }
        qa[h] = quad(&op_a, pa[0], pa[1]);
        qb[h] = quad(&op_b, pb[0], pb[1]);
    }
    (join(&op_a, qa[0], qa[1]), join(&op_b, qb[0], qb[1]))
}

/// Per 128-bit half: `[a0 b0 a1 b1] op [a2 b2 a3 b3]`.
#[target_feature(enable = "avx2")]
#[inline]
fn pair<F: Fn(__m256, __m256) -> __m256>(op: &F, a: __m256, b: __m256) -> __m256 {
    op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b))
}

/// Per 128-bit half: `[p0 p1 q0 q1] op [p2 p3 q2 q3]`, one lane per input vector.
#[target_feature(enable = "avx2")]
#[inline]
fn quad<F: Fn(__m256, __m256) -> __m256>(op: &F, a: __m256, b: __m256) -> __m256 {
    op(
        _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
        _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
    )
}

/// The low halves of vectors 0-3 beside their high halves (and likewise 4-7), folded.
#[target_feature(enable = "avx2")]
#[inline]
fn join<F: Fn(__m256, __m256) -> __m256>(op: &F, lo: __m256, hi: __m256) -> __m256 {
    op(
        _mm256_permute2f128_ps::<0x20>(lo, hi),
        _mm256_permute2f128_ps::<0x31>(lo, hi),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lane `i` of the result is vector `i`'s maximum (and minimum), for distinct values in
    /// every position.
    #[test]
    fn reduce8x2_puts_each_vectors_fold_in_its_lane() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let data: Vec<[f32; 8]> = (0..8)
            .map(|i| std::array::from_fn(|j| ((i * 8 + j) * 37 % 64) as f32 - 20.0))
            .collect();
        // SAFETY: AVX2 detected above; the loads read 8 f32s of each array.
        let (mx, mn) = unsafe {
            let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(data[i].as_ptr()));
            let (a, b) = reduce8x2(
                |i| (v[i], v[i]),
                |a, b| _mm256_max_ps(a, b),
                |a, b| _mm256_min_ps(a, b),
            );
            let (mut mx, mut mn) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(mx.as_mut_ptr(), a);
            _mm256_storeu_ps(mn.as_mut_ptr(), b);
            (mx, mn)
        };
        for i in 0..8 {
            let want_max = data[i].iter().copied().fold(f32::MIN, f32::max);
            let want_min = data[i].iter().copied().fold(f32::MAX, f32::min);
            assert_eq!((mx[i], mn[i]), (want_max, want_min), "vector {i}");
        }
    }
}
