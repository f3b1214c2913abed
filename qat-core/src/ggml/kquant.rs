//! Q4_K and Q6_K on the CPU. Their scales come from an iterative search (candle's
//! `make_qkx1_quants` / `make_qx_quants`); rather than restate it, the blocks are candle's
//! own (`QTensor::quantize`) and so is the dequantization, which makes both bit-exact by
//! construction. The straight-through mask is computed here from the stored scales, with
//! candle's final code expression (`BlockQ4K` / `BlockQ6K::from_float` in
//! `quantized/k_quants.rs`):
//! - Q4_K, sub-block `j` of 32: `d = f16 d * sc_j`, `dm = f16 dmin * m_j`; when `d != 0`,
//!   `l = round((x + dm) / d)` clamped to `0..=15`;
//! - Q6_K, sub-block `j` of 16: `d = f16 d * scale_j`; when `d != 0`, `l = round(x / d)`
//!   clamped to `-32..=31`.
//!
//! An element is clamped when `l` lay outside its range (NaN included); a sub-block whose
//! `d` is 0 has no clamped element.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

/// Weights per block.
pub(crate) const QK_K: usize = 256;

/// The two K-quant types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KindK {
    Q4K,
    Q6K,
}

impl KindK {
    fn dtype(self) -> GgmlDType {
        match self {
            KindK::Q4K => GgmlDType::Q4K,
            KindK::Q6K => GgmlDType::Q6K,
        }
    }

    pub(crate) fn block_bytes(self) -> usize {
        match self {
            KindK::Q4K => 144,
            KindK::Q6K => 210,
        }
    }
}

fn qtensor(kind: KindK, x: &[f32]) -> candle_core::Result<QTensor> {
    QTensor::quantize(&Tensor::from_slice(x, x.len(), &Device::Cpu)?, kind.dtype())
}

/// candle's blocks of `x` (`x.len()` a multiple of 256) into `out`.
pub(crate) fn quantize(kind: KindK, x: &[f32], out: &mut [u8]) -> candle_core::Result<()> {
    let q = qtensor(kind, x)?;
    let data = q.data()?;
    if data.len() != out.len() {
        candle_core::bail!(
            "{kind:?}: candle wrote {} bytes for {} values, expected {}",
            data.len(),
            x.len(),
            out.len()
        );
    }
    out.copy_from_slice(&data);
    Ok(())
}

/// dequantize(quantize(x)) with candle's own kernels.
pub(crate) fn forward(kind: KindK, x: &[f32]) -> candle_core::Result<Vec<f32>> {
    qtensor(kind, x)?.dequantize(&Device::Cpu)?.to_vec1::<f32>()
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// candle's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `dx = dy` where the element's code was not clamped, 0 where it was.
pub(crate) fn backward(
    kind: KindK,
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> candle_core::Result<()> {
    let mut blocks = vec![0u8; x.len() / QK_K * kind.block_bytes()];
    quantize(kind, x, &mut blocks)?;
    let iter = x
        .chunks_exact(QK_K)
        .zip(dy.chunks_exact(QK_K))
        .zip(dx.chunks_exact_mut(QK_K))
        .zip(blocks.chunks_exact(kind.block_bytes()));
    for (((xb, db), ob), bb) in iter {
        match kind {
            KindK::Q4K => {
                // d, dmin (f16), scales[12], qs[128].
                let (d, dmin, scales) = (f16_at(bb, 0), f16_at(bb, 2), &bb[4..16]);
                for j in 0..QK_K / 32 {
                    let (sc, m) = scale_min_k4(j, scales);
                    let d = d * sc as f32;
                    let dm = dmin * m as f32;
                    for i in 32 * j..32 * (j + 1) {
                        let ok = d == 0.0 || (0.0..=15.0).contains(&((xb[i] + dm) / d).round());
                        ob[i] = if ok { db[i] } else { 0.0 };
                    }
                }
            }
            KindK::Q6K => {
                // ql[128], qh[64], scales[16] (i8), d (f16).
                let d = f16_at(bb, 208);
                for j in 0..QK_K / 16 {
                    let d = d * (bb[192 + j] as i8) as f32;
                    for i in 16 * j..16 * (j + 1) {
                        let ok = d == 0.0 || (-32.0..=31.0).contains(&(xb[i] / d).round());
                        ob[i] = if ok { db[i] } else { 0.0 };
                    }
                }
            }
        }
    }
    Ok(())
}
