//! im2col / col2im for one image and one channel group.
//!
//! The column matrix has one row per (channel, kernel row, kernel column) tap, in the weight's
//! order, and one column per output position (row-major over the output map): the forward
//! convolution is then `weight (O, C*KH*KW) @ col`.

/// The geometry of one 2-D convolution (per spatial dim: padding, stride, dilation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    /// Input channels of one group.
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
}

impl Window {
    /// Output positions per image.
    pub fn cols(&self) -> usize {
        self.oh * self.ow
    }

    /// Rows of the column matrix (taps per output position).
    pub fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// The output indices `o` in `0..out` whose input index `o * stride + off - pad` lies in
    /// `0..len`, as a range (`off` is the tap's offset `k * dilation`).
    fn valid(off: usize, pad: usize, stride: usize, len: usize, out: usize) -> (usize, usize) {
        // o * stride + off >= pad
        let lo = if pad > off {
            (pad - off).div_ceil(stride)
        } else {
            0
        };
        // o * stride + off < len + pad
        let hi = if len + pad > off {
            (len + pad - off).div_ceil(stride)
        } else {
            0
        };
        (lo.min(out), hi.min(out).max(lo.min(out)))
    }

    /// For each tap `(ci, i, j)` and each output row `y`, calls `f(tap_row, y, Some((x_row,
    /// col_lo, col_hi, x_start)))` where the input row is inside the image (outputs
    /// `col_lo..col_hi` read `x_row[x_start + (o - col_lo) * stride]`), or
    /// `f(tap_row, y, None)` where it is padding.
    #[inline(always)]
    fn for_each_row(&self, mut f: impl FnMut(usize, usize, Option<(usize, usize, usize, usize)>)) {
        let [ph, pw] = self.pad;
        let [sh, sw] = self.stride;
        let [dh, dw] = self.dilation;
        for ci in 0..self.c {
            for i in 0..self.kh {
                let (ylo, yhi) = Self::valid(i * dh, ph, sh, self.h, self.oh);
                for j in 0..self.kw {
                    let tap = (ci * self.kh + i) * self.kw + j;
                    let (xlo, xhi) = Self::valid(j * dw, pw, sw, self.w, self.ow);
                    for y in 0..self.oh {
                        if y < ylo || y >= yhi || xlo >= xhi {
                            f(tap, y, None);
                            continue;
                        }
                        let iy = y * sh + i * dh - ph;
                        let x0 = xlo * sw + j * dw - pw;
                        f(tap, y, Some(((ci * self.h + iy) * self.w, xlo, xhi, x0)));
                    }
                }
            }
        }
    }

    /// Fills `col` (`rows() x cols()`, row-major) from the group's input `x` (`c x h x w`).
    pub fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (ow, sw) = (self.ow, self.stride[1]);
        let cols = self.cols();
        debug_assert!(col.len() >= self.rows() * cols && x.len() >= self.c * self.h * self.w);
        self.for_each_row(|tap, y, src| {
            let out = &mut col[tap * cols + y * ow..][..ow];
            match src {
                None => out.fill(0.0),
                Some((row, lo, hi, x0)) => {
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let out = &mut out[lo..hi];
                    if sw == 1 {
                        out.copy_from_slice(&x[row + x0..][..hi - lo]);
                    } else {
                        let src = &x[row + x0..];
                        for (k, o) in out.iter_mut().enumerate() {
                            *o = src[k * sw];
                        }
                    }
                }
            }
        });
    }

    /// Adds `col` (`rows() x cols()`) back onto the group's input gradient `dx` (`c x h x
    /// w`), the adjoint of [`Window::im2col`]. `dx` must be initialised (zeros to start).
    pub fn col2im(&self, col: &[f32], dx: &mut [f32]) {
        let (ow, sw) = (self.ow, self.stride[1]);
        let cols = self.cols();
        debug_assert!(col.len() >= self.rows() * cols && dx.len() >= self.c * self.h * self.w);
        self.for_each_row(|tap, y, src| {
            if let Some((row, lo, hi, x0)) = src {
                let inp = &col[tap * cols + y * ow + lo..][..hi - lo];
                if sw == 1 {
                    for (d, &g) in dx[row + x0..][..hi - lo].iter_mut().zip(inp) {
                        *d += g;
                    }
                } else {
                    let dst = &mut dx[row + x0..];
                    for (k, &g) in inp.iter().enumerate() {
                        dst[k * sw] += g;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(len: usize, k: usize, p: usize, s: usize, d: usize) -> usize {
        (len + 2 * p - d * (k - 1) - 1) / s + 1
    }

    /// im2col against the definition, and col2im as its adjoint (<col2im(g), x> == <g,
    /// im2col(x)>) on every option mix.
    #[test]
    fn im2col_matches_definition_and_col2im_is_its_adjoint() {
        for (c, h, w, k, p, s, d) in [
            (1, 5, 6, 3, 1, 1, 1),
            (2, 7, 5, 3, 0, 2, 1),
            (3, 6, 6, 3, 2, 2, 2),
            (2, 4, 9, 5, 2, 1, 1),
            (1, 8, 3, 1, 0, 2, 1),
            (2, 9, 9, 3, 1, 3, 2),
        ] {
            let win = Window {
                c,
                h,
                w,
                kh: k,
                kw: k,
                oh: out(h, k, p, s, d),
                ow: out(w, k, p, s, d),
                pad: [p, p],
                stride: [s, s],
                dilation: [d, d],
            };
            let x: Vec<f32> = (0..c * h * w).map(|i| (i as f32 * 0.7).sin()).collect();
            let mut col = vec![f32::NAN; win.rows() * win.cols()];
            win.im2col(&x, &mut col);
            for ci in 0..c {
                for i in 0..k {
                    for j in 0..k {
                        for y in 0..win.oh {
                            for xx in 0..win.ow {
                                let iy = (y * s + i * d) as isize - p as isize;
                                let ix = (xx * s + j * d) as isize - p as isize;
                                let want =
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        0.0
                                    } else {
                                        x[(ci * h + iy as usize) * w + ix as usize]
                                    };
                                let got =
                                    col[((ci * k + i) * k + j) * win.cols() + y * win.ow + xx];
                                assert_eq!(got, want, "{c} {h} {w} {k} {p} {s} {d}");
                            }
                        }
                    }
                }
            }
            let g: Vec<f32> = (0..col.len()).map(|i| (i as f32 * 0.3).cos()).collect();
            let mut dx = vec![0f32; x.len()];
            win.col2im(&g, &mut dx);
            let lhs: f64 = dx.iter().zip(&x).map(|(&a, &b)| a as f64 * b as f64).sum();
            let rhs: f64 = g.iter().zip(&col).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!((lhs - rhs).abs() < 1e-4 * (1.0 + rhs.abs()), "{lhs} {rhs}");
        }
    }
}
