// The benches' deterministic input data (included by path).
#![allow(dead_code)]

/// `n` deterministic values in [-1.5, 3.0) (a 64-bit LCG, top 24 bits); `seed` 0 gives the
/// sequence of the fake-quant benches.
pub fn lcg_data(n: usize, seed: u64) -> Vec<f32> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            -1.5 + 4.5 * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}
