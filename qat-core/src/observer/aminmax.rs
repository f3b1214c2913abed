//! Minimum and maximum of a tensor, whole or per channel, in one pass over memory, with a
//! check that every value is finite.

use candle_core::{DType, Tensor};
use multiversion::multiversion;

use crate::error::{Error, Result};
use crate::host::{par_reduce, with_cpu_f32};

const LANES: usize = 16;

/// (min, max, every value finite) of a slice; `(+inf, -inf, true)` for an empty one.
#[multiversion(targets("x86_64+avx2"))]
fn slice_min_max(x: &[f32]) -> (f32, f32, bool) {
    let mut mn = [f32::INFINITY; LANES];
    let mut mx = [f32::NEG_INFINITY; LANES];
    // v * 0 is 0 for finite v and NaN for NaN or +-inf: the sum stays 0 only if all are finite.
    let mut bad = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let v = c[i];
            mn[i] = if v < mn[i] { v } else { mn[i] };
            mx[i] = if v > mx[i] { v } else { mx[i] };
            bad[i] += v * 0.0;
        }
    }
    for (i, &v) in rest.iter().enumerate() {
        mn[i] = if v < mn[i] { v } else { mn[i] };
        mx[i] = if v > mx[i] { v } else { mx[i] };
        bad[i] += v * 0.0;
    }
    let lo = mn
        .iter()
        .fold(f32::INFINITY, |a, &b| if b < a { b } else { a });
    let hi = mx
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    (lo, hi, bad.iter().all(|&b| b == 0.0))
}

fn merge(a: (f32, f32, bool), b: (f32, f32, bool)) -> (f32, f32, bool) {
    (a.0.min(b.0), a.1.max(b.1), a.2 && b.2)
}

fn non_finite(observer: &'static str) -> Error {
    Error::ObserverInput {
        observer,
        what: "the input holds NaN or infinite values".into(),
        fix: "find where the model produces non-finite values (learning rate, division by zero) \
              and feed only finite tensors"
            .into(),
    }
}

fn check_float(x: &Tensor, observer: &'static str) -> Result<()> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(()),
        dt => Err(Error::ObserverInput {
            observer,
            what: format!("the input has dtype {dt:?}, observers take float tensors"),
            fix: "convert the tensor to f32 (or f16/bf16) before observing it".into(),
        }),
    }
}

/// Minimum and maximum over the whole tensor. The tensor must be non-empty and finite.
pub(crate) fn tensor_min_max(x: &Tensor, observer: &'static str) -> Result<(f32, f32)> {
    check_float(x, observer)?;
    let fast = with_cpu_f32(x, |s| par_reduce(s, slice_min_max, merge));
    let (mn, mx, finite) = match fast {
        Some(r) => r,
        None if x.device().is_cpu() => {
            let x = x.to_dtype(DType::F32)?.contiguous()?;
            with_cpu_f32(&x, |s| par_reduce(s, slice_min_max, merge))
                .ok_or_else(|| Error::tensor("could not read CPU tensor", "report this as a bug"))?
        }
        None => {
            let flat = x.to_dtype(DType::F32)?.flatten_all()?;
            let finite = flat.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? == 0.0;
            let mn = flat.min(0)?.to_scalar::<f32>()?;
            let mx = flat.max(0)?.to_scalar::<f32>()?;
            (mn, mx, finite)
        }
    };
    if !finite {
        return Err(non_finite(observer));
    }
    Ok((mn, mx))
}

/// Per-channel minima and maxima along `axis` (every other dim reduced).
pub(crate) fn channel_min_max(
    x: &Tensor,
    axis: usize,
    observer: &'static str,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_float(x, observer)?;
    let dims = x.dims();
    if axis >= dims.len() {
        return Err(Error::ObserverInput {
            observer,
            what: format!(
                "channel axis {axis} is out of range for a tensor of shape {:?}",
                dims
            ),
            fix: "set ch_axis to an existing dimension (0 for conv/linear weights)".into(),
        });
    }
    let c = dims[axis];
    let inner: usize = dims[axis + 1..].iter().product();
    let compute = |s: &[f32]| {
        let mut mn = vec![f32::INFINITY; c];
        let mut mx = vec![f32::NEG_INFINITY; c];
        let mut finite = true;
        if inner == 1 {
            // Channels are the last dim: reduce row by row, vectorised over channels.
            let mut bad = vec![0.0f32; c];
            for row in s.chunks_exact(c) {
                for j in 0..c {
                    let v = row[j];
                    mn[j] = if v < mn[j] { v } else { mn[j] };
                    mx[j] = if v > mx[j] { v } else { mx[j] };
                    bad[j] += v * 0.0;
                }
            }
            finite = bad.iter().all(|&b| b == 0.0);
        } else {
            for (b, block) in s.chunks_exact(inner).enumerate() {
                let ch = b % c;
                let (lo, hi, ok) = par_reduce(block, slice_min_max, merge);
                mn[ch] = mn[ch].min(lo);
                mx[ch] = mx[ch].max(hi);
                finite &= ok;
            }
        }
        (mn, mx, finite)
    };
    let x32;
    let x = if x.device().is_cpu() && x.dtype() != DType::F32 {
        x32 = x.to_dtype(DType::F32)?;
        &x32
    } else {
        x
    };
    let fast = match with_cpu_f32(x, compute) {
        Some(r) => Some(r),
        None if x.device().is_cpu() => with_cpu_f32(&x.contiguous()?, compute),
        None => None,
    };
    let (mn, mx, finite) = match fast {
        Some(r) => r,
        None => {
            let y = x
                .to_dtype(DType::F32)?
                .transpose(0, axis)?
                .contiguous()?
                .flatten_from(1)?;
            let finite = y.affine(0.0, 0.0)?.sum_all()?.to_scalar::<f32>()? == 0.0;
            (y.min(1)?.to_vec1()?, y.max(1)?.to_vec1()?, finite)
        }
    };
    if !finite {
        return Err(non_finite(observer));
    }
    Ok((mn, mx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn whole_tensor() {
        let v: Vec<f32> = (0..100_000)
            .map(|i| ((i * 7919) % 1000) as f32 - 300.0)
            .collect();
        let t = Tensor::from_vec(v, (100, 1000), &Device::Cpu).unwrap();
        assert_eq!(tensor_min_max(&t, "t").unwrap(), (-300.0, 699.0));
        let t2 = t.t().unwrap();
        assert_eq!(tensor_min_max(&t2, "t").unwrap(), (-300.0, 699.0));
    }

    #[test]
    fn rejects_non_finite() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let t = Tensor::new(&[1.0f32, bad, 2.0], &Device::Cpu).unwrap();
            assert!(matches!(
                tensor_min_max(&t, "MinMaxObserver"),
                Err(Error::ObserverInput { .. })
            ));
            assert!(channel_min_max(&t.reshape((3, 1)).unwrap(), 0, "o").is_err());
        }
    }

    #[test]
    fn per_channel_any_axis() {
        let t = Tensor::arange(0f32, 24., &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let (mn, mx) = channel_min_max(&t, 1, "o").unwrap();
        assert_eq!(mn, vec![0.0, 4.0, 8.0]);
        assert_eq!(mx, vec![15.0, 19.0, 23.0]);
        let (mn, mx) = channel_min_max(&t, 2, "o").unwrap();
        assert_eq!(mn, vec![0.0, 1.0, 2.0, 3.0]);
        assert_eq!(mx, vec![20.0, 21.0, 22.0, 23.0]);
        assert!(channel_min_max(&t, 3, "o").is_err());
    }
}
