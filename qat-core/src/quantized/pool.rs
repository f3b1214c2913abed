//! Max pooling on u8 codes, a converted model's `MaxPool2d`: the largest code of each window
//! is the code of the largest value (quantization is monotone), so the codes pass through
//! without dequantizing.

use candle_core::Tensor;
use multiversion::multiversion;
use rayon::prelude::*;

use super::qtensor::on_u8;
use crate::error::{Error, Result};

/// Output planes below which a batch runs on the calling thread.
const PAR_PLANES: usize = 256;

/// `k x k` max pooling every `stride` (no padding, windows inside the input) of `x`, a 4-D
/// `U8` tensor `(N, C, H, W)`: `(N, C, (H - k) / stride + 1, (W - k) / stride + 1)` on `x`'s
/// device, the same codes as candle's `max_pool2d_with_stride` on them. Errors when `x` is
/// not 4-D `U8`, when `k` or `stride` is 0 or when the window does not fit the input.
pub(crate) fn max_pool2d_codes(x: &Tensor, k: usize, stride: usize) -> Result<Tensor> {
    let &[n, c, h, w] = x.dims() else {
        return Err(Error::tensor(
            format!("a converted MaxPool2d got an input of shape {:?}", x.dims()),
            "feed a 4-D (N, C, H, W) tensor of u8 codes",
        ));
    };
    if k == 0 || stride == 0 || h < k || w < k {
        return Err(Error::tensor(
            format!("a {k}x{k} max pool with stride {stride} over a {h}x{w} input"),
            "use kernel size and stride >= 1 and an input at least as large as the window",
        ));
    }
    let (oh, ow) = ((h - k) / stride + 1, (w - k) / stride + 1);
    let y = on_u8(x, "the converted MaxPool2d input", |xs| {
        let mut y = vec![0u8; n * c * oh * ow];
        if oh * ow == 0 {
            return y;
        }
        let g = Window { k, stride, w, ow };
        if n * c >= PAR_PLANES && rayon::current_num_threads() > 1 {
            y.par_chunks_mut(oh * ow)
                .zip(xs.par_chunks_exact(h * w))
                .for_each(|(y, x)| plane(&g, x, y));
        } else {
            y.chunks_mut(oh * ow)
                .zip(xs.chunks_exact(h * w))
                .for_each(|(y, x)| plane(&g, x, y));
        }
        y
    })?;
    Ok(Tensor::from_vec(y, (n, c, oh, ow), x.device())?)
}

/// The geometry of one plane.
struct Window {
    k: usize,
    stride: usize,
    /// Input width.
    w: usize,
    ow: usize,
}

/// One `(H, W)` plane into its `(OH, OW)` maxima.
fn plane(g: &Window, x: &[u8], y: &mut [u8]) {
    for (oy, out) in y.chunks_exact_mut(g.ow).enumerate() {
        let top = oy * g.stride * g.w;
        if g.k == 2 && g.stride == 2 {
            let (a, b) = (&x[top..top + g.w], &x[top + g.w..top + 2 * g.w]);
            row_2x2(&a[..2 * g.ow], &b[..2 * g.ow], out);
        } else {
            out.fill(0);
            for ky in 0..g.k {
                let row = &x[top + ky * g.w..top + (ky + 1) * g.w];
                for (ox, o) in out.iter_mut().enumerate() {
                    let at = ox * g.stride;
                    *o = row[at..at + g.k].iter().fold(*o, |m, &v| m.max(v));
                }
            }
        }
    }
}

/// One output row of 2x2 windows, stride 2: `out[i] = max(a[2i], a[2i+1], b[2i], b[2i+1])`.
#[multiversion(targets("x86_64+avx2"))]
fn row_2x2(a: &[u8], b: &[u8], out: &mut [u8]) {
    for ((o, a), b) in out.iter_mut().zip(a.chunks_exact(2)).zip(b.chunks_exact(2)) {
        *o = a[0].max(a[1]).max(b[0].max(b[1]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn matches_candle_max_pool() {
        let mut s: u32 = 3;
        for &(n, c, h, w, k, stride) in &[
            (2, 3, 8, 8, 2, 2),
            (1, 2, 7, 9, 2, 2),
            (3, 4, 28, 28, 2, 2),
            (2, 2, 9, 7, 3, 2),
            (1, 3, 6, 5, 3, 1),
            (1, 1, 4, 4, 4, 4),
            (2, 300, 4, 4, 2, 2),
        ] {
            let v: Vec<u8> = (0..n * c * h * w)
                .map(|_| {
                    s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (s >> 24) as u8
                })
                .collect();
            let x = Tensor::from_vec(v, (n, c, h, w), &Device::Cpu).unwrap();
            let want = x.max_pool2d_with_stride(k, stride).unwrap();
            let got = max_pool2d_codes(&x, k, stride).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                "{:?}",
                (n, c, h, w, k, stride)
            );
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let x = Tensor::zeros((1, 1, 3, 3), DType::U8, &Device::Cpu).unwrap();
        assert!(max_pool2d_codes(&x, 4, 1).is_err());
        assert!(max_pool2d_codes(&x, 0, 1).is_err());
        assert!(max_pool2d_codes(&x, 2, 0).is_err());
        let f = Tensor::zeros((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d_codes(&f, 2, 2).is_err());
        let x3 = Tensor::zeros((1, 3, 3), DType::U8, &Device::Cpu).unwrap();
        assert!(max_pool2d_codes(&x3, 2, 2).is_err());
    }
}
