//! Zero-copy access to the f32 data of CPU tensors, and the chunked multi-threading every
//! CPU kernel shares.

use std::mem::MaybeUninit;

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// Elements handed to one rayon task. Below twice this, kernels run on the calling thread.
pub(crate) const CHUNK: usize = 1 << 15;

/// Runs `f` on the tensor's data when it is a contiguous f32 tensor on the CPU; `None`
/// otherwise (other devices, dtypes or layouts take a slower path).
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|s| f(&s[start..end])),
        _ => None,
    }
}

/// The f32 data of a contiguous CPU storage, for `CustomOp`s (`what` names the operand in
/// the error for other dtypes and layouts, e.g. "conv2d: weight").
pub(crate) fn cpu_f32_slice<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (candle_core::CpuStorage::F32(_), None) => candle_core::bail!("{what} is not contiguous"),
        _ => candle_core::bail!(
            "{what} is {:?}, not f32",
            candle_core::backend::BackendStorage::dtype(s)
        ),
    }
}

/// Maps chunks of `inp` to partial results and combines them in chunk order (deterministic),
/// in parallel when large.
pub(crate) fn par_reduce<T, M, R>(inp: &[f32], map: M, reduce: R) -> T
where
    T: Send,
    M: Fn(&[f32]) -> T + Sync,
    R: Fn(T, T) -> T + Sync,
{
    if inp.len() < 2 * CHUNK {
        map(inp)
    } else {
        // Partials collected in chunk order and combined left to right: the result does not
        // depend on how rayon split the work (float sums would otherwise change from run to
        // run with the machine's load).
        let parts: Vec<T> = inp.par_chunks(CHUNK).map(&map).collect();
        parts
            .into_iter()
            .reduce(&reduce)
            .unwrap_or_else(|| map(&[]))
    }
}

/// A new vector of `len` f32s that `fill` writes, without zero-filling it first (a zeroed
/// buffer that is then overwritten costs a memset per op, 6% of a training step).
///
/// # Safety
/// `fill` must initialise every element of the slice it is given (`len` of them): the vector
/// is returned as initialised, and reading an element `fill` skipped would read
/// uninitialised memory. Callers state in their `SAFETY` comment why their `fill` writes
/// the whole slice, and check in release what that rests on where it is O(1) (e.g. that
/// the chunks they hand to a kernel hold whole rows).
pub(crate) unsafe fn alloc_with(
    len: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>]),
) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len` (`with_capacity`), and the caller guarantees
    // that `fill` initialised all `len` elements (this function's contract).
    unsafe { v.set_len(len) };
    v
}

/// [`alloc_with`] filled chunk by chunk with `fill(offset, chunk)`, chunks of [`CHUNK`] in
/// parallel when large.
///
/// # Safety
/// `fill(offset, chunk)` must initialise every element of each `chunk` it is given.
pub(crate) unsafe fn alloc_fill<F>(n: usize, fill: F) -> Vec<f32>
where
    F: Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
{
    let fill_all = |spare: &mut [MaybeUninit<f32>]| {
        if n < 2 * CHUNK {
            fill(0, spare);
        } else {
            spare
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(i, c)| fill(i * CHUNK, c));
        }
    };
    // SAFETY: the chunks cover `spare` (one chunk when small, else `par_chunks_mut`), and
    // the caller guarantees that `fill` initialises each chunk whole.
    unsafe { alloc_with(n, fill_all) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `alloc_fill` hands out chunks that cover the vector in order (one chunk when small,
    /// chunks of `CHUNK` in parallel when large), each with its offset.
    #[test]
    fn alloc_fill_covers_every_element_with_its_offset() {
        for n in [0, 1, 2 * CHUNK - 1, 2 * CHUNK, 3 * CHUNK + 5] {
            let fill = |off: usize, c: &mut [MaybeUninit<f32>]| {
                for (i, v) in c.iter_mut().enumerate() {
                    v.write((off + i) as f32);
                }
            };
            // SAFETY: `fill` writes every element of each chunk.
            let v = unsafe { alloc_fill(n, fill) };
            assert_eq!(v.len(), n);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32), "n = {n}");
        }
    }
}
