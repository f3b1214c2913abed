//! The portable kernel: plain Rust over the kernels' layout, for CPUs without AVX2 and other
//! targets.

use std::ops::Range;

use super::{PackedWeight, Panel, KG};

/// The portable kernel: for each weight row, k-group by k-group over all positions (the
/// inner loop runs over contiguous positions and vectorises).
pub(super) fn portable(
    w: &PackedWeight,
    rows: Range<usize>,
    corr: &[i32],
    panel: &Panel,
    out: &mut [i32],
) {
    let p = panel.positions;
    let s = panel.stride * KG;
    let bytes = panel.bytes();
    for ((o, out), &c) in rows.zip(out.chunks_exact_mut(p)).zip(corr) {
        out.fill(c.wrapping_neg());
        let wrow = &w.codes[o * w.kp..(o + 1) * w.kp];
        for (g, w4) in wrow.chunks_exact(KG).enumerate() {
            let (w0, w1, w2, w3) = (w4[0] as i32, w4[1] as i32, w4[2] as i32, w4[3] as i32);
            let acts = &bytes[g * s..g * s + p * KG];
            for (acc, x) in out.iter_mut().zip(acts.chunks_exact(KG)) {
                let d = x[0] as i32 * w0 + x[1] as i32 * w1 + x[2] as i32 * w2 + x[3] as i32 * w3;
                *acc = acc.wrapping_add(d);
            }
        }
    }
}
