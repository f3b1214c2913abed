//! Attention's head split and merge as single candle ops, the split optionally fused with the
//! interleaved rotary embedding of [`super::rope`].
//!
//! - split: `(batch, seq, heads * d)` -> `(batch, heads, seq, d)`, the values of
//!   `y.reshape((b, t, h, d)).transpose(1, 2).contiguous()` (then `rope_i` when fused);
//! - merge: `(batch, heads, seq, d)` -> `(batch, seq, heads * d)`, the values of
//!   `y.transpose(1, 2).reshape((b, t, h * d))`.
//!
//! The composites are three to four graph nodes per projection, each of which gets a gradient
//! buffer that candle's backward zero-fills on one thread and adds into; these are one node,
//! whose backward is the other direction (with the inverse rotation: the same arithmetic as
//! `rope_i`'s backward, `rope_i(dy, cos, -sin)`), so values and gradients are the composite's
//! bit for bit (up to the sign of an exact zero gradient, which candle's zero-filled buffers
//! turn to `+0.0`).

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::host::{alloc_with, cpu_f32_slice, CHUNK};

/// The geometry of a split or merge: `b` batches, `t` positions, `h` heads of `d` values.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

/// The rotation applied while moving rows: `cos`, `sin` `(t, d / 2)` row-major, and whether
/// `sin` is negated (the inverse rotation, for the backward).
#[derive(Clone, Copy)]
struct Rotation<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    inverse: bool,
}

/// Moves the rows of `src` into the other layout: `split` reads `(b, t, h, d)` and writes
/// `(b, h, t, d)`, otherwise the reverse; each row rotated on the way when `rot` is given.
fn move_rows(
    src: &[f32],
    g: Geometry,
    split: bool,
    rot: Option<Rotation>,
) -> candle_core::Result<Vec<f32>> {
    let Geometry { b, t, h, d } = g;
    let rows = b * t * h;
    // Offset in `src` of destination row `r`.
    let src_row = |r: usize| -> usize {
        if split {
            // r = (bi, hi, ti) in (b, h, t); source (bi, ti, hi) in (b, t, h).
            let (bi, rest) = (r / (h * t), r % (h * t));
            let (hi, ti) = (rest / t, rest % t);
            ((bi * t + ti) * h + hi) * d
        } else {
            // r = (bi, ti, hi) in (b, t, h); source (bi, hi, ti) in (b, h, t).
            let (bi, rest) = (r / (t * h), r % (t * h));
            let (ti, hi) = (rest / h, rest % h);
            ((bi * h + hi) * t + ti) * d
        }
    };
    let position = |r: usize| -> usize {
        if split {
            r % t
        } else {
            (r / h) % t
        }
    };
    let rows_per_task = (CHUNK / d.max(1)).max(1);
    let fill = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(rows_per_task * d)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (i, dst) in chunk.chunks_exact_mut(d).enumerate() {
                    let r = c * rows_per_task + i;
                    let s = &src[src_row(r)..src_row(r) + d];
                    match rot {
                        None => {
                            for (o, &v) in dst.iter_mut().zip(s) {
                                o.write(v);
                            }
                        }
                        Some(Rotation { cos, sin, inverse }) => {
                            let p = position(r) * (d / 2);
                            let (cr, sr) = (&cos[p..p + d / 2], &sin[p..p + d / 2]);
                            for (((o, x), &c), &sn) in dst
                                .chunks_exact_mut(2)
                                .zip(s.chunks_exact(2))
                                .zip(cr)
                                .zip(sr)
                            {
                                // rope_i's products and order; the inverse with `-sin` as
                                // rope_i's backward passes it.
                                let sn = if inverse { -sn } else { sn };
                                o[0].write(x[0] * c - x[1] * sn);
                                o[1].write(x[0] * sn + x[1] * c);
                            }
                        }
                    }
                }
            });
    };
    if src.len() != rows * d || rot.is_some() && !d.is_multiple_of(2) {
        candle_core::bail!("heads: {} values for {rows} rows of {d}", src.len());
    }
    if rows * d == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `out` has `rows * d` elements; `par_chunks_mut(rows_per_task * d)` splits it
    // into chunks of whole rows (its length is a multiple of `d`: as the source's, checked
    // above, and `d` is even when a rotation is given, checked above), and
    // every row of every chunk is written whole (`chunks_exact_mut(d)` covers the chunk; the
    // rotated rows write both elements of each of their `d / 2` pairs).
    Ok(unsafe { alloc_with(rows * d, fill) })
}

/// The split's geometry from a `(b, t, h * d)` shape.
fn split_geometry(dims: &[usize], h: usize) -> candle_core::Result<Geometry> {
    match dims {
        &[b, t, hd] if h > 0 && hd.is_multiple_of(h) => Ok(Geometry { b, t, h, d: hd / h }),
        _ => candle_core::bail!(
            "split heads: the input needs shape (batch, seq, heads * head_dim) with a multiple \
             of {h} heads, got {dims:?}"
        ),
    }
}

/// The merge's geometry from a `(b, h, t, d)` shape.
fn merge_geometry(dims: &[usize]) -> candle_core::Result<Geometry> {
    match dims {
        &[b, h, t, d] => Ok(Geometry { b, t, h, d }),
        _ => candle_core::bail!(
            "merge heads: the input needs shape (batch, heads, seq, head_dim), got {dims:?}"
        ),
    }
}

/// cos and sin as the kernel reads them, checked against the geometry.
fn rotation<'a>(
    g: Geometry,
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
    inverse: bool,
) -> candle_core::Result<Rotation<'a>> {
    let cos = cpu_f32_slice(s2, l2, "heads rope: cos")?;
    let sin = cpu_f32_slice(s3, l3, "heads rope: sin")?;
    if !g.d.is_multiple_of(2) || cos.len() != g.t * g.d / 2 || sin.len() != cos.len() {
        candle_core::bail!(
            "heads rope: cos/sin of {} / {} values for {} positions x head_dim {}",
            cos.len(),
            sin.len(),
            g.t,
            g.d
        );
    }
    Ok(Rotation { cos, sin, inverse })
}

/// Split (`(b, t, h * d)` -> `(b, h, t, d)`) or merge, without rotation.
struct Heads {
    /// The head count of a split; a merge reads it from its input.
    split: Option<usize>,
}

impl CustomOp1 for Heads {
    fn name(&self) -> &'static str {
        if self.split.is_some() {
            "qat-split-heads"
        } else {
            "qat-merge-heads"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s, l, "heads: input")?;
        let (g, out) = match self.split {
            Some(h) => {
                let g = split_geometry(l.dims(), h)?;
                (g, Shape::from((g.b, g.h, g.t, g.d)))
            }
            None => {
                let g = merge_geometry(l.dims())?;
                (g, Shape::from((g.b, g.t, g.h * g.d)))
            }
        };
        Ok((
            CpuStorage::F32(move_rows(x, g, self.split.is_some(), None)?),
            out,
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dy = dy.detach().contiguous()?;
        let back = match self.split {
            Some(_) => Heads { split: None },
            None => Heads {
                split: Some(x.dim(1)?),
            },
        };
        Ok(Some(dy.apply_op1_no_bwd(&back)?))
    }
}

/// Split fused with the rotary embedding (`inverse: false`, args `(y, cos, sin)`), or its
/// backward: the inverse rotation fused with the merge (`inverse: true`, args `(dy, cos,
/// sin)`).
struct HeadsRope {
    heads: usize,
    inverse: bool,
}

impl CustomOp3 for HeadsRope {
    fn name(&self) -> &'static str {
        if self.inverse {
            "qat-merge-heads-rope-backward"
        } else {
            "qat-split-heads-rope-i"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s1, l1, "heads rope: input")?;
        let (g, out) = if self.inverse {
            let g = merge_geometry(l1.dims())?;
            (g, Shape::from((g.b, g.t, g.h * g.d)))
        } else {
            let g = split_geometry(l1.dims(), self.heads)?;
            (g, Shape::from((g.b, g.h, g.t, g.d)))
        };
        let rot = rotation(g, (s2, l2), (s3, l3), self.inverse)?;
        Ok((
            CpuStorage::F32(move_rows(x, g, !self.inverse, Some(rot))?),
            out,
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.inverse {
            candle_core::bail!("heads rope: the backward's own op has no backward");
        }
        if !x.track_op() {
            return Ok((None, None, None));
        }
        // cos and sin are constants.
        let back = HeadsRope {
            heads: self.heads,
            inverse: true,
        };
        let dx = dy
            .detach()
            .contiguous()?
            .apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}

fn fused(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// `(b, t, h * d)` -> `(b, h, t, d)`, contiguous: one op on CPU f32, candle's
/// reshape/transpose/contiguous elsewhere.
pub(crate) fn split_heads(y: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let g = split_geometry(y.dims(), heads)?;
    if fused(&[y]) {
        y.contiguous()?.apply_op1(Heads { split: Some(heads) })
    } else {
        y.reshape((g.b, g.t, g.h, g.d))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// [`split_heads`] followed by the interleaved rotary embedding with `cos`, `sin` `(>= t, d /
/// 2)` (their first `t` rows), as one op on CPU f32.
pub(crate) fn split_heads_rope_i(
    y: &Tensor,
    heads: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let g = split_geometry(y.dims(), heads)?;
    let (ct, cd) = match cos.dims() {
        &[ct, cd] => (ct, cd),
        _ => (0, 0),
    };
    if sin.dims() != cos.dims() || cd * 2 != g.d || ct < g.t {
        candle_core::bail!(
            "split heads + rope: a head dim of {} at {} positions needs cos and sin of ({}.., \
             {}), got {:?} and {:?}",
            g.d,
            g.t,
            g.t,
            g.d / 2,
            cos.dims(),
            sin.dims()
        );
    }
    let (cos, sin) = (cos.narrow(0, 0, g.t)?, sin.narrow(0, 0, g.t)?);
    if fused(&[y, &cos, &sin]) {
        let op = HeadsRope {
            heads,
            inverse: false,
        };
        y.contiguous()?
            .apply_op3(&cos.contiguous()?, &sin.contiguous()?, op)
    } else {
        super::rope::rope_i(&split_heads(y, heads)?, &cos, &sin)
    }
}

/// `(b, h, t, d)` -> `(b, t, h * d)`, contiguous: one op on CPU f32, candle's
/// transpose/reshape elsewhere.
pub(crate) fn merge_heads(y: &Tensor) -> candle_core::Result<Tensor> {
    let g = merge_geometry(y.dims())?;
    if fused(&[y]) {
        y.contiguous()?.apply_op1(Heads { split: None })
    } else {
        y.transpose(1, 2)?.reshape((g.b, g.t, g.h * g.d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    use crate::kernels::{assert_same_bits, bits};

    fn same_bits(what: &str, x: &Var, ours: &Tensor, theirs: &Tensor) {
        assert_same_bits(what, ours, theirs, &[("x", x)]);
    }

    #[test]
    fn split_and_merge_equal_the_composites_bit_for_bit() {
        let dev = Device::Cpu;
        // Small, and large enough for several parallel tasks with a ragged last one.
        for (b, t, h, d) in [(2, 3, 2, 4), (5, 64, 4, 32), (3, 17, 3, 6)] {
            let y =
                Var::from_tensor(&Tensor::randn(0f32, 1., (b, t, h * d), &dev).unwrap()).unwrap();
            let theirs = y
                .reshape((b, t, h, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
            let ours = split_heads(&y, h).unwrap();
            same_bits(&format!("split {b}x{t}x{h}x{d}"), &y, &ours, &theirs);

            let z =
                Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, t, d), &dev).unwrap()).unwrap();
            let theirs = z.transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap();
            let ours = merge_heads(&z).unwrap();
            same_bits(&format!("merge {b}x{t}x{h}x{d}"), &z, &ours, &theirs);

            // With the rotation: cos/sin with more rows than positions.
            let ang = Tensor::randn(0f32, 2., (t + 3, d / 2), &dev).unwrap();
            let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
            let theirs = super::super::rope::rope_i(
                &y.reshape((b, t, h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                &cos,
                &sin,
            )
            .unwrap();
            let ours = split_heads_rope_i(&y, h, &cos, &sin).unwrap();
            same_bits(&format!("split+rope {b}x{t}x{h}x{d}"), &y, &ours, &theirs);
            // and candle's forward-only rope_i gives the same values.
            let c = cos.narrow(0, 0, t).unwrap().contiguous().unwrap();
            let s = sin.narrow(0, 0, t).unwrap().contiguous().unwrap();
            let fast = candle_nn::rotary_emb::rope_i(
                &y.reshape((b, t, h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap(),
                &c,
                &s,
            )
            .unwrap();
            assert_eq!(bits(&ours), bits(&fast), "candle rope_i");
        }
    }

    #[test]
    fn split_and_merge_refuse_shapes_they_cannot_take() {
        let dev = Device::Cpu;
        let y = Tensor::zeros((2, 3, 10), DType::F32, &dev).unwrap();
        assert!(split_heads(&y, 3).is_err(), "10 features in 3 heads");
        assert!(split_heads(&y, 0).is_err());
        assert!(merge_heads(&y).is_err(), "rank 3");
        let ang = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        assert!(
            split_heads_rope_i(&y, 2, &ang, &ang).is_err(),
            "head dim 5 is odd"
        );
        let y = Tensor::zeros((2, 4, 8), DType::F32, &dev).unwrap();
        assert!(
            split_heads_rope_i(&y, 2, &ang, &ang).is_err(),
            "3 rows for 4 positions"
        );
        let flat = Tensor::zeros(8, DType::F32, &dev).unwrap();
        let err = split_heads_rope_i(&y, 2, &flat, &flat)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs cos and sin of (4.., 2)"), "{err}");
        // Empty heads (head_dim 0) and empty batches give empty tensors, as candle's ops.
        let e = Tensor::zeros((2, 3, 0), DType::F32, &dev).unwrap();
        assert_eq!(split_heads(&e, 2).unwrap().dims(), &[2, 2, 3, 0]);
        let e4 = Tensor::zeros((2, 2, 3, 0), DType::F32, &dev).unwrap();
        assert_eq!(merge_heads(&e4).unwrap().dims(), &[2, 3, 0]);
        let b0 = Tensor::zeros((0, 3, 8), DType::F32, &dev).unwrap();
        assert_eq!(split_heads(&b0, 2).unwrap().dims(), &[0, 2, 3, 4]);
        // Other dtypes take candle's ops: the same values.
        let yb = Tensor::randn(0f32, 1., (2, 3, 8), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let a = split_heads(&yb, 2).unwrap();
        let b = yb
            .reshape((2, 3, 2, 4))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let (a, b) = (
            a.flatten_all().unwrap().to_dtype(DType::F32).unwrap(),
            b.flatten_all().unwrap().to_dtype(DType::F32).unwrap(),
        );
        assert_eq!(bits(&a), bits(&b));
    }
}
