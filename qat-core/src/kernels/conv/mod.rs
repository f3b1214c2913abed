//! Conv2d (and Conv1d as a conv2d of height 1) on CPU f32 tensors as one candle `CustomOp2` on
//! (input, weight) with its own backward:
//!
//! - forward: per image and group, im2col then `y = W (O/g, C/g*KH*KW) @ col`;
//! - input gradient: `dcol = W^T @ dy`, then col2im (skipped when the input needs no
//!   gradient, e.g. the network's input);
//! - weight gradient: `dW += dy @ col^T`, accumulated per task and summed.
//!
//! Images are processed in chunks whose output maps, side by side, give the GEMMs at least
//! `TARGET_COLS` columns (small maps such as 7x7 would otherwise make thin, slow GEMMs).
//! Chunks are spread over rayon tasks (single-threaded GEMMs) when there are enough of them
//! for the threads, else each chunk's GEMMs run multi-threaded. Weight-gradient partial sums
//! are kept per task and added in task order, so results do not depend on scheduling.
//! 1x1 convolutions of stride 1 and no padding skip im2col for single-image chunks.

mod backward;
mod columns;
mod forward;
mod op;
mod plan;
mod scratch;
#[cfg(test)]
mod tests;

pub(crate) use op::{conv1d, conv2d, conv2d_bias, supported};
pub(crate) use plan::Conv2dParams;
