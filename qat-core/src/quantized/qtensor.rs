//! Quantize f32 tensors to u8 activation codes and back, and the CPU access to `U8` tensors
//! the int8 kernels share.

use candle_core::{DType, Storage, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::qparams::check_scale;

/// Elements handed to one rayon task by the elementwise loops here.
const CHUNK: usize = 1 << 15;

/// 1.5 * 2^23: `(v + MAGIC) - MAGIC` is `v` rounded half to even for |v| < 2^22.
pub(super) const MAGIC: f32 = 12_582_912.0;

/// Rounds half to even (as `std::nearbyint`); exact for |v| < 2^22, so callers clamp first.
/// Free of libm calls, so loops over it vectorise.
#[inline(always)]
pub(crate) fn round_small(v: f32) -> f32 {
    (v + MAGIC) - MAGIC
}

/// `round_half_even(v) + zero_point` as a u8 code, for `v` already clamped so that the code
/// lies in `0..=255`: `v + MAGIC` rounds `v` to an integer held in the low mantissa bits, the
/// zero point adds to it exactly, and the low byte of the bits is the code. (A float to u8
/// cast would not vectorise.)
#[inline(always)]
pub(crate) fn code_from_clamped(v: f32, zero_point: f32) -> u8 {
    ((v + MAGIC) + zero_point).to_bits() as u8
}

/// `v` clamped to `lo..=hi`; NaN gives `lo` (as PyTorch's float-to-int conversion, which
/// turns NaN into the most negative integer, then clamps).
#[inline(always)]
pub(crate) fn clamp_nan_lo(v: f32, lo: f32, hi: f32) -> f32 {
    v.max(lo).min(hi)
}

/// Runs `f` on the u8 codes of `t`: in place for a contiguous `U8` tensor on the CPU, on a
/// copy otherwise. Errors when `t` is not `U8`.
pub(crate) fn on_u8<R>(t: &Tensor, what: &str, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
    if t.dtype() != DType::U8 {
        return Err(Error::tensor(
            format!("{what} has dtype {:?}, not u8 codes", t.dtype()),
            "quantize activations first (qat_core::quantized::quantize gives a U8 tensor)",
        ));
    }
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            if let Some(s) = cpu.as_slice::<u8>().ok().and_then(|s| s.get(start..end)) {
                return Ok(f(s));
            }
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<u8>()?))
}

/// Runs `f` on the values of `t` as f32: in place for a contiguous f32 tensor on the CPU, on
/// a converted copy otherwise.
fn on_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    if t.dtype() == DType::F32 {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            if let Some(s) = cpu.as_slice::<f32>().ok().and_then(|s| s.get(start..end)) {
                return Ok(f(s));
            }
        }
    }
    Ok(f(&t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?))
}

/// Largest code of a slice (0 when empty).
#[multiversion(targets("x86_64+avx2"))]
pub(crate) fn max_code(codes: &[u8]) -> u8 {
    codes.iter().fold(0u8, |m, &c| m.max(c))
}

/// Checks an activation (u8) range and a zero point inside it.
pub(crate) fn check_u8_range(
    zero_point: i32,
    quant_min: i32,
    quant_max: i32,
    what: &str,
) -> Result<()> {
    if quant_min < 0 || quant_max > 255 || quant_min >= quant_max {
        return Err(Error::qparams(
            format!("{what}: the range {quant_min}..={quant_max} is not an unsigned 8-bit range"),
            "give 0 <= quant_min < quant_max <= 255 (e.g. 0..=127 for the fbgemm/x86 presets, \
             0..=255 for qnnpack)",
        ));
    }
    if zero_point < quant_min || zero_point > quant_max {
        return Err(Error::qparams(
            format!("{what}: zero point {zero_point} is outside {quant_min}..={quant_max}"),
            "use the zero point the observer computed for this range",
        ));
    }
    Ok(())
}

/// One activation quantization grid, relative to the zero point.
#[derive(Clone, Copy)]
struct Grid {
    inv_scale: f32,
    lo: f32,
    hi: f32,
    zero_point: f32,
}

#[multiversion(targets("x86_64+avx2"))]
fn quantize_slice(x: &[f32], out: &mut [u8], g: Grid) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = code_from_clamped(clamp_nan_lo(v * g.inv_scale, g.lo, g.hi), g.zero_point);
    }
}

#[multiversion(targets("x86_64+avx2"))]
fn dequantize_slice(q: &[u8], out: &mut [f32], scale: f32, zero_point: f32) {
    for (o, &c) in out.iter_mut().zip(q) {
        *o = (c as f32 - zero_point) * scale;
    }
}

/// Quantizes f32 values to unsigned 8-bit activation codes, as PyTorch's
/// `quantize_per_tensor` and ONNX `QuantizeLinear`:
/// `q = clamp(zero_point + round_half_even(x * (1 / scale)), quant_min, quant_max)`, with the
/// reciprocal taken in f32 and multiplied (not `x / scale`). NaN gives `quant_min`.
///
/// Returns a `U8` tensor of `x`'s shape on `x`'s device (the work runs on the CPU). Clamp to
/// the range the activation's fake-quant trained with (`0..=127` for the fbgemm/x86
/// presets, `0..=255` for qnnpack), so that the int8 model sees what the QAT model saw.
///
/// Errors when the scale is not finite and positive, when the range is not inside `0..=255`
/// or the zero point is outside it.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::quantized::quantize;
/// let x = Tensor::new(&[-1.0f32, 0.05, 0.15, 0.25, 9.0], &Device::Cpu)?;
/// let q = quantize(&x, 0.1, 10, 0, 127)?;
/// // 0.05 / 0.1 = 0.5 and 0.25 / 0.1 = 2.5 are ties: they round to even.
/// assert_eq!(q.to_vec1::<u8>()?, vec![0, 10, 12, 12, 100]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn quantize(
    x: &Tensor,
    scale: f32,
    zero_point: i32,
    quant_min: i32,
    quant_max: i32,
) -> Result<Tensor> {
    check_scale(scale)?;
    check_u8_range(zero_point, quant_min, quant_max, "quantize")?;
    let g = Grid {
        inv_scale: 1.0 / scale,
        lo: (quant_min - zero_point) as f32,
        hi: (quant_max - zero_point) as f32,
        zero_point: zero_point as f32,
    };
    let out = on_f32(x, |xs| {
        let mut out = vec![0u8; xs.len()];
        if xs.len() < 2 * CHUNK {
            quantize_slice(xs, &mut out, g);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(xs.par_chunks(CHUNK))
                .for_each(|(o, x)| quantize_slice(x, o, g));
        }
        out
    })?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// Dequantizes u8 activation codes: `(q - zero_point) * scale` in f32.
///
/// `q` must be a `U8` tensor; the result is an f32 tensor of its shape on its device.
/// Errors when the scale is not finite and positive or the zero point is outside `0..=255`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::quantized::dequantize;
/// let q = Tensor::new(&[0u8, 10, 12, 100], &Device::Cpu)?;
/// let x = dequantize(&q, 0.5, 10)?;
/// assert_eq!(x.to_vec1::<f32>()?, vec![-5.0, 0.0, 1.0, 45.0]);
/// # Ok::<(), qat_core::Error>(())
/// ```
pub fn dequantize(q: &Tensor, scale: f32, zero_point: i32) -> Result<Tensor> {
    check_scale(scale)?;
    if !(0..=255).contains(&zero_point) {
        return Err(Error::qparams(
            format!("dequantize: zero point {zero_point} is outside 0..=255"),
            "use the zero point the u8 codes were quantized with",
        ));
    }
    let out = on_u8(q, "dequantize input", |qs| {
        let mut out = vec![0f32; qs.len()];
        if qs.len() < 2 * CHUNK {
            dequantize_slice(qs, &mut out, scale, zero_point as f32);
        } else {
            out.par_chunks_mut(CHUNK)
                .zip(qs.par_chunks(CHUNK))
                .for_each(|(o, q)| dequantize_slice(q, o, scale, zero_point as f32));
        }
        out
    })?;
    Ok(Tensor::from_vec(out, q.shape(), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn reference(x: f32, scale: f32, zp: i32, qmin: i32, qmax: i32) -> u8 {
        let q = zp as i64 + (x * (1.0f32 / scale)).round_ties_even() as i64;
        q.clamp(qmin as i64, qmax as i64) as u8
    }

    #[test]
    fn quantize_matches_reference_and_ties() {
        let mut s: u32 = 7;
        let mut xs: Vec<f32> = (0..100_000)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.4) * 9.0
            })
            .collect();
        // Exact ties of x * (1 / scale).
        for i in -300..300 {
            xs.push((i as f32 + 0.5) * 0.03125);
        }
        let x = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        for &(scale, zp, qmin, qmax) in &[
            (0.03125f32, 60, 0, 127),
            (0.037, 0, 0, 255),
            (0.011, 128, 0, 255),
            (0.02, 3, 0, 15),
        ] {
            let q = quantize(&x, scale, zp, qmin, qmax)
                .unwrap()
                .to_vec1::<u8>()
                .unwrap();
            for (i, (&v, &got)) in xs.iter().zip(&q).enumerate() {
                assert_eq!(got, reference(v, scale, zp, qmin, qmax), "x[{i}] = {v}");
            }
        }
    }

    #[test]
    fn quantize_special_values_and_strided_input() {
        let x = Tensor::new(
            &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30],
            &Device::Cpu,
        )
        .unwrap();
        let q = quantize(&x, 0.1, 5, 0, 127).unwrap();
        assert_eq!(q.to_vec1::<u8>().unwrap(), vec![0, 127, 0, 127, 0]);
        let x = Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &Device::Cpu).unwrap();
        let q = quantize(&x.t().unwrap(), 0.1, 0, 0, 255).unwrap();
        assert_eq!(q.to_vec2::<u8>().unwrap(), vec![vec![1, 3], vec![2, 4]]);
    }

    #[test]
    fn quantize_rejects_bad_arguments() {
        let x = Tensor::new(&[0.0f32], &Device::Cpu).unwrap();
        for (scale, zp, qmin, qmax) in [
            (0.0f32, 0, 0, 255),
            (f32::NAN, 0, 0, 255),
            (0.1, 0, -128, 127),
            (0.1, 0, 0, 256),
            (0.1, 200, 0, 127),
            (0.1, 0, 5, 5),
        ] {
            let e = quantize(&x, scale, zp, qmin, qmax).unwrap_err();
            assert!(matches!(e, Error::QParams { .. }), "{e}");
        }
    }

    #[test]
    fn dequantize_roundtrip_and_checks() {
        let q = Tensor::new(&[0u8, 1, 128, 255], &Device::Cpu).unwrap();
        let x = dequantize(&q, 0.25, 128).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(x, vec![-32.0, -31.75, 0.0, 31.75]);
        let back = quantize(
            &Tensor::new(x.as_slice(), &Device::Cpu).unwrap(),
            0.25,
            128,
            0,
            255,
        )
        .unwrap();
        assert_eq!(back.to_vec1::<u8>().unwrap(), vec![0, 1, 128, 255]);
        let f = Tensor::new(&[1.0f32], &Device::Cpu).unwrap();
        assert!(matches!(dequantize(&f, 0.1, 0), Err(Error::Tensor { .. })));
        assert!(matches!(
            dequantize(&q, 0.1, 300),
            Err(Error::QParams { .. })
        ));
    }

    #[test]
    fn max_code_of_slices() {
        assert_eq!(max_code(&[]), 0);
        let v: Vec<u8> = (0..1000).map(|i| (i % 97) as u8).collect();
        assert_eq!(max_code(&v), 96);
    }
}
