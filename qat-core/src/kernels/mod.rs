//! Fused CPU kernels for training, as candle `CustomOp`s with their own backward:
//!
//! - [`conv`]: conv2d (and conv1d as a conv2d of height 1) by im2col + GEMM forward, GEMM +
//!   col2im for the input gradient (skipped for inputs that need none), GEMM for the weight
//!   gradient; the column matrix tap-major for few channels, channels-last for 8 or more
//!   (`im2col`, with the tile transposes of `transpose`);
//! - [`batch_norm`]: BatchNorm statistics, normalisation and backward in a few passes with
//!   PyTorch's CPU arithmetic, optionally with the ReLU that follows it in a fused layer;
//! - [`batched_matmul`]: attention's batched products (`q · kᵀ`, `p · v`) with the batch
//!   split over threads (candle's runs it product by product), candle's values and gradients;
//! - [`channel`]: per-channel bias add and division with a per-channel backward;
//! - [`heads`]: attention's head split (optionally with the rotary embedding) and merge as
//!   one op each, with the composite's values and gradients;
//! - [`linear`]: a Linear's `x · wᵀ` as one op (candle's values and gradients, without the
//!   reshape, transpose and reshape nodes and their gradient buffers);
//! - [`norm`]: RmsNorm and LayerNorm over the last dim, one pass per row forward and
//!   backward;
//! - [`relu`]: ReLU whose backward is one pass over the output;
//! - [`rope`], [`softmax`]: attention's interleaved rotary embedding and last-dim softmax,
//!   equal bit for bit to candle's forward-only fused kernels, with a backward;
//! - `sums`: the vectorised f64 sums the per-channel reductions share.
//!
//! They take contiguous CPU f32 tensors; the layers keep candle's ops for other devices and
//! dtypes. Threads follow rayon's pool (`RAYON_NUM_THREADS`), as candle's own kernels do.

pub(crate) mod batch_norm;
pub(crate) mod batched_matmul;
pub(crate) mod channel;
pub(crate) mod conv;
pub(crate) mod heads;
mod im2col;
pub(crate) mod linear;
mod matmul;
pub(crate) mod norm;
pub(crate) mod relu;
pub(crate) mod rope;
pub(crate) mod silu;
pub(crate) mod softmax;
mod sums;
mod transpose;

/// Threads the kernels may use.
pub(crate) fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Test helper of the kernels: `got` equals `want` in shape, and element by element within
/// `tol * (1 + max |want|)` (f32 sums in different orders).
#[cfg(test)]
pub(crate) fn assert_close(
    what: &str,
    got: &candle_core::Tensor,
    want: &candle_core::Tensor,
    tol: f32,
) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let w: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = 1.0 + w.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() <= tol * scale,
            "{what}[{i}]: {a} vs {b} (scale {scale})"
        );
    }
}

/// Test helper of the kernels: the gradients of `sum(ours * r)` and `sum(theirs * r)`, for one
/// random upstream gradient `r`, agree within `tol` (as [`assert_close`]) for each named
/// variable. Returns `r` and the reference gradients for further checks.
#[cfg(test)]
pub(crate) fn assert_same_grads(
    what: &str,
    ours: &candle_core::Tensor,
    theirs: &candle_core::Tensor,
    vars: &[(&str, &candle_core::Var)],
    tol: f32,
) -> (candle_core::Tensor, candle_core::backprop::GradStore) {
    let r = candle_core::Tensor::randn(0f32, 1., ours.dims(), ours.device()).unwrap();
    let loss = |y: &candle_core::Tensor| (y * &r).unwrap().sum_all().unwrap();
    let g1 = loss(ours).backward().unwrap();
    let g2 = loss(theirs).backward().unwrap();
    for (name, v) in vars {
        assert_close(
            &format!("{name} {what}"),
            g1.get(v).unwrap(),
            g2.get(v).unwrap(),
            tol,
        );
    }
    (r, g2)
}

/// Test helper of the kernels: the f32 bits of a tensor, flattened (other float dtypes
/// converted to f32 first, exactly).
#[cfg(test)]
pub(crate) fn bits(t: &candle_core::Tensor) -> Vec<u32> {
    let v: Vec<f32> = t
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().map(|f| f.to_bits()).collect()
}

/// Test helper of the fused ops: `ours` equals `theirs` (the candle composite it replaces) in
/// shape and bit for bit, and so do the gradients of `sum(y * r)`, for one random upstream
/// gradient `r`, of each named variable. Returns the gradients of `ours`.
#[cfg(test)]
pub(crate) fn assert_same_bits(
    what: &str,
    ours: &candle_core::Tensor,
    theirs: &candle_core::Tensor,
    vars: &[(&str, &candle_core::Var)],
) -> candle_core::backprop::GradStore {
    assert_eq!(ours.dims(), theirs.dims(), "{what}: shape");
    assert_eq!(bits(ours), bits(theirs), "{what}: values");
    let r = candle_core::Tensor::randn(0f32, 1., ours.dims(), ours.device())
        .unwrap()
        .to_dtype(ours.dtype())
        .unwrap();
    let loss = |y: &candle_core::Tensor| (y * &r).unwrap().sum_all().unwrap();
    let g1 = loss(ours).backward().unwrap();
    let g2 = loss(theirs).backward().unwrap();
    for (name, v) in vars {
        let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        assert_eq!(a.dims(), b.dims(), "{what}: d{name} shape");
        assert_eq!(bits(a), bits(b), "{what}: d{name}");
    }
    g1
}
