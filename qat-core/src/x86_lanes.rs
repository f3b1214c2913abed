//! AVX2 helpers the explicit x86-64 kernels share: reducing 8 vectors to one, one vector's
//! reduction per lane (the step that lets 8 groups or blocks compute their scales together).

use std::arch::x86_64::*;

/// `[op-fold(v[0]), .., op-fold(v[7])]`: each of the 8 vectors reduced by `op` (an
/// associative, commutative lane-wise operation such as `max`, `min` or `or` on NaN-free
/// data) into one lane, in order; an 8x8 transpose folded into the reduction.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn reduce8(v: &[__m256; 8], op: impl Fn(__m256, __m256) -> __m256) -> __m256 {
    // Per 128-bit half: [a0 b0 a1 b1] op [a2 b2 a3 b3].
    let pair = |a: __m256, b: __m256| op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    // Per half: [p0 p1 q0 q1] op [p2 p3 q2 q3], one lane per input vector.
    let quad = |a: __m256, b: __m256| {
        op(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    };
    let lo = quad(pair(v[0], v[1]), pair(v[2], v[3]));
    let hi = quad(pair(v[4], v[5]), pair(v[6], v[7]));
    // The low halves of vectors 0-3 beside their high halves, and likewise 4-7.
    op(
        _mm256_permute2f128_ps::<0x20>(lo, hi),
        _mm256_permute2f128_ps::<0x31>(lo, hi),
    )
}

/// Two [`reduce8`]s at once of the pairs `f(0), .., f(7)`, consumed as they come (two
/// vectors at a time), so that only a few partial results are live: `f` can load and
/// reduce a block per call without the 16 vectors spilling.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn reduce8x2(
    mut f: impl FnMut(usize) -> (__m256, __m256),
    op_a: impl Fn(__m256, __m256) -> __m256,
    op_b: impl Fn(__m256, __m256) -> __m256,
) -> (__m256, __m256) {
    let pair = |op: &dyn Fn(__m256, __m256) -> __m256, a: __m256, b: __m256| {
        op(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b))
    };
    let quad = |op: &dyn Fn(__m256, __m256) -> __m256, a: __m256, b: __m256| {
        op(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        )
    };
    let mut half = |h: usize| {
        let mut two = |k: usize| {
            let ((a0, b0), (a1, b1)) = (f(k), f(k + 1));
            (pair(&op_a, a0, a1), pair(&op_b, b0, b1))
        };
        let ((a01, b01), (a23, b23)) = (two(4 * h), two(4 * h + 2));
        (quad(&op_a, a01, a23), quad(&op_b, b01, b23))
    };
    let ((la, lb), (ha, hb)) = (half(0), half(1));
    let join = |op: &dyn Fn(__m256, __m256) -> __m256, lo: __m256, hi: __m256| {
        op(
            _mm256_permute2f128_ps::<0x20>(lo, hi),
            _mm256_permute2f128_ps::<0x31>(lo, hi),
        )
    };
    (join(&op_a, la, ha), join(&op_b, lb, hb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lane `i` of the result is vector `i`'s maximum (and minimum), for distinct values in
    /// every position.
    #[test]
    fn reduce8_puts_each_vectors_fold_in_its_lane() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let data: Vec<[f32; 8]> = (0..8)
            .map(|i| std::array::from_fn(|j| ((i * 8 + j) * 37 % 64) as f32 - 20.0))
            .collect();
        // SAFETY: AVX2 detected above; the loads read 8 f32s of each array.
        let (mx, mn) = unsafe {
            let v: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(data[i].as_ptr()));
            let mut mx = [0f32; 8];
            let mut mn = [0f32; 8];
            _mm256_storeu_ps(mx.as_mut_ptr(), reduce8(&v, |a, b| _mm256_max_ps(a, b)));
            _mm256_storeu_ps(mn.as_mut_ptr(), reduce8(&v, |a, b| _mm256_min_ps(a, b)));
            let (a, b) = reduce8x2(
                |i| (v[i], v[i]),
                |a, b| _mm256_max_ps(a, b),
                |a, b| _mm256_min_ps(a, b),
            );
            let (mut mx2, mut mn2) = ([0f32; 8], [0f32; 8]);
            _mm256_storeu_ps(mx2.as_mut_ptr(), a);
            _mm256_storeu_ps(mn2.as_mut_ptr(), b);
            assert_eq!((mx, mn), (mx2, mn2));
            (mx, mn)
        };
        for i in 0..8 {
            let want_max = data[i].iter().copied().fold(f32::MIN, f32::max);
            let want_min = data[i].iter().copied().fold(f32::MAX, f32::min);
            assert_eq!((mx[i], mn[i]), (want_max, want_min), "vector {i}");
        }
    }
}
