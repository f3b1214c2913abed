//! GGML block quantization (the GGUF formats candle and llama.cpp deploy): fake
//! quantization bit-exact with candle's `quantized` module, for weights (Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q4_K, Q6_K) and for matmul inputs as candle's CPU quantized matmul quantizes
//! them (Q8_0, Q8_1, Q8_K), with straight-through gradients; the raw blocks; candle
//! `QTensor`s for conversion to `QMatMul`.
//!
//! The fake-quant matmul `fake_quantize_vec_dot(x, w_ty.vec_dot_type()) @
//! fake_quantize_ggml(w, w_ty)ᵀ` computes what candle's `QMatMul::forward` computes on the
//! CPU up to f32 summation order, with these exceptions (candle 0.11.1):
//! - Q4_1/Q5_1: the Q8_1 block sum is rounded to f16 (see [`fake_quantize_vec_dot`]),
//!   about 1e-4 relative per matmul output;
//! - on CPUs with AVX-512 VNNI or AVX-VNNI, Q8_0 weights with `in_features % 256 == 0` and
//!   `out_features % 16 == 0` take the repacked path (`quantized/repack_x86.rs`), whose
//!   inputs are Q8_K, not Q8_0; `MISTRALRS_FORCE_AVX2=1` (read once per process) forces the
//!   AVX2 path, which uses Q8_0 inputs. Q4_K (always) and Q6_K (more than one input row)
//!   are repacked on every AVX2 CPU under the same shape condition, with Q8_K inputs as
//!   their unpacked path;
//! - `CANDLE_DEQUANTIZE_ALL` / `CANDLE_DEQUANTIZE_ALL_F16` make `QMatMul` a float matmul
//!   of the dequantized weights, with unquantized inputs;
//! - other devices (CUDA, Metal) run their own kernels and are not matched numerically.

mod block32;
#[cfg(target_arch = "x86_64")]
mod block32_avx2;
mod block_type;
mod kquant;
mod op;
mod q8k;

pub use block_type::{BlockType, VecDotType};
pub use op::{
    fake_quantize_ggml, fake_quantize_ggml_backward, fake_quantize_vec_dot, quantize_blocks,
    to_qtensor,
};
