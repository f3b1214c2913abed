//! Zero-copy access to the f32 data of CPU tensors, and the chunked multi-threading every
//! CPU kernel shares.

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

/// Applies `f(offset, input_chunk, output_chunk)` over aligned chunks, in parallel when the
/// slices are large.
pub(crate) fn par_zip<F>(inp: &[f32], out: &mut [f32], f: F)
where
    F: Fn(usize, &[f32], &mut [f32]) + Sync,
{
    if inp.len() < 2 * CHUNK {
        f(0, inp, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(inp.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(i, (o, x))| f(i * CHUNK, x, o));
    }
}

/// Like [`par_zip`] with a second input read in step.
pub(crate) fn par_zip2<F>(a: &[f32], b: &[f32], out: &mut [f32], f: F)
where
    F: Fn(usize, &[f32], &[f32], &mut [f32]) + Sync,
{
    if a.len() < 2 * CHUNK {
        f(0, a, b, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .enumerate()
            .for_each(|(i, (o, (x, y)))| f(i * CHUNK, x, y, o));
    }
}

/// Maps chunks of `inp` to partial results and combines them, in parallel when large.
pub(crate) fn par_reduce<T, M, R>(inp: &[f32], map: M, reduce: R) -> T
where
    T: Send,
    M: Fn(&[f32]) -> T + Sync,
    R: Fn(T, T) -> T + Sync,
{
    if inp.len() < 2 * CHUNK {
        map(inp)
    } else {
        inp.par_chunks(CHUNK)
            .map(&map)
            .reduce_with(&reduce)
            .unwrap_or_else(|| map(&[]))
    }
}
