//! Strided f32 block transposes, for moving images between channels-first (`c x h x w`,
//! candle's and PyTorch's layout) and channels-last (`h x w x c`) order in the convolution
//! kernels. 8 x 8 tiles use AVX shuffles where the CPU has them (24 shuffles per 64 values,
//! against a scalar loop that writes one value per strided store); edge tiles use masked loads
//! and stores, so that short rows (a 14-pixel image row) stay on the vector path.

/// `dst[j * dst_rs + i] = src[i * src_rs + j]` for `i < rows`, `j < cols`.
///
/// Panics if a slice is too short for the block (a bug in the caller, not user input).
pub(crate) fn transpose(
    src: &[f32],
    src_rs: usize,
    dst: &mut [f32],
    dst_rs: usize,
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        src.len() >= (rows - 1) * src_rs + cols,
        "transpose: source too short"
    );
    assert!(
        dst.len() >= (cols - 1) * dst_rs + rows,
        "transpose: destination too short"
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx") {
        for i in (0..rows).step_by(8) {
            for j in (0..cols).step_by(8) {
                let (nr, nc) = ((rows - i).min(8), (cols - j).min(8));
                // SAFETY: AVX is available; the tile's `nr` rows and `nc` columns lie inside
                // the block, whose extent the asserts above checked against both slices, and
                // a partial tile reads and writes only those.
                unsafe {
                    x86::tile8(
                        src.as_ptr().add(i * src_rs + j),
                        src_rs,
                        dst.as_mut_ptr().add(j * dst_rs + i),
                        dst_rs,
                        nr,
                        nc,
                    )
                }
            }
        }
        return;
    }
    for i in 0..rows {
        for j in 0..cols {
            dst[j * dst_rs + i] = src[i * src_rs + j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Lane masks: `MASKS[8 - n..]` loads as the mask of the first `n` lanes.
    static MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    /// Transposes the first `nr` rows and `nc` columns (each 1..=8) of an 8 x 8 tile.
    ///
    /// # Safety
    /// AVX must be available; `src` must be valid for reads of `nr` rows of `nc` values `ss`
    /// apart, `dst` for writes of `nc` rows of `nr` values `ds` apart.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn tile8(
        src: *const f32,
        ss: usize,
        dst: *mut f32,
        ds: usize,
        nr: usize,
        nc: usize,
    ) {
        // SAFETY: AVX is available and `src`/`dst` cover `nr` rows of `nc` values and `nc`
        // rows of `nr` values (this function's contract); `8 - nc` and `8 - nr` are in `0..8`
        // (both in `1..=8`), so the masks are 8 lanes inside `MASKS`; rows `k >= nr` are not
        // read and columns `k >= nc` not stored, and partial rows go through masked loads and
        // stores of the first `nc` (`nr`) lanes only.
        unsafe {
            let load_mask = _mm256_loadu_si256(MASKS[8 - nc..].as_ptr() as *const __m256i);
            let r = |k: usize| {
                if k >= nr {
                    _mm256_setzero_ps()
                } else if nc == 8 {
                    _mm256_loadu_ps(src.add(k * ss))
                } else {
                    _mm256_maskload_ps(src.add(k * ss), load_mask)
                }
            };
            let (r0, r1, r2, r3, r4, r5, r6, r7) = (r(0), r(1), r(2), r(3), r(4), r(5), r(6), r(7));
            let t0 = _mm256_unpacklo_ps(r0, r1);
            let t1 = _mm256_unpackhi_ps(r0, r1);
            let t2 = _mm256_unpacklo_ps(r2, r3);
            let t3 = _mm256_unpackhi_ps(r2, r3);
            let t4 = _mm256_unpacklo_ps(r4, r5);
            let t5 = _mm256_unpackhi_ps(r4, r5);
            let t6 = _mm256_unpacklo_ps(r6, r7);
            let t7 = _mm256_unpackhi_ps(r6, r7);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let store_mask = _mm256_loadu_si256(MASKS[8 - nr..].as_ptr() as *const __m256i);
            let w = |k: usize, v: __m256| {
                if k >= nc {
                } else if nr == 8 {
                    _mm256_storeu_ps(dst.add(k * ds), v)
                } else {
                    _mm256_maskstore_ps(dst.add(k * ds), store_mask, v)
                }
            };
            w(0, _mm256_permute2f128_ps::<0x20>(s0, s4));
            w(1, _mm256_permute2f128_ps::<0x20>(s1, s5));
            w(2, _mm256_permute2f128_ps::<0x20>(s2, s6));
            w(3, _mm256_permute2f128_ps::<0x20>(s3, s7));
            w(4, _mm256_permute2f128_ps::<0x31>(s0, s4));
            w(5, _mm256_permute2f128_ps::<0x31>(s1, s5));
            w(6, _mm256_permute2f128_ps::<0x31>(s2, s6));
            w(7, _mm256_permute2f128_ps::<0x31>(s3, s7));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_matches_definition_on_tiles_and_edges() {
        for (rows, cols) in [(1, 1), (3, 5), (8, 8), (16, 9), (13, 24), (17, 31), (8, 3)] {
            let (src_rs, dst_rs) = (cols + 3, rows + 2);
            let src: Vec<f32> = (0..rows * src_rs).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; cols * dst_rs];
            transpose(&src, src_rs, &mut dst, dst_rs, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(dst[j * dst_rs + i], src[i * src_rs + j], "{rows}x{cols}");
                }
                // The gaps between destination rows are untouched.
                for j in 0..cols {
                    for g in rows..dst_rs {
                        assert!(dst[j * dst_rs + g].is_nan());
                    }
                }
            }
        }
    }
}
