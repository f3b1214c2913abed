//! The GGML block types candle-qat fake-quantizes, and the types candle's CPU matmul
//! quantizes a matmul's input into (`VecDotType`).

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// A GGML weight block type with bit-exact fake quantization (candle's
/// `QTensor::quantize` then `dequantize`). Blocks run along a tensor's last dim.
///
/// ```
/// use qat_core::ggml::{BlockType, VecDotType};
/// let t = BlockType::Q4_0;
/// assert_eq!((t.block_size(), t.bytes_per_block()), (32, 18));
/// assert_eq!(t.bits_per_weight(), 4.5);
/// assert_eq!(t.vec_dot_type(), VecDotType::Q8_0);
/// assert_eq!(BlockType::try_from(t.dtype())?, t);
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockType {
    /// 32 weights: an f16 scale and 8-bit codes (round half away from zero).
    Q8_0,
    /// 32 weights: an f16 scale and 4-bit codes `-8..=7` (the largest-|x| weight is `-8`).
    Q4_0,
    /// 32 weights: f16 scale and minimum, 4-bit codes `0..=15`.
    Q4_1,
    /// 32 weights: an f16 scale and 5-bit codes `-16..=15`.
    Q5_0,
    /// 32 weights: f16 scale and minimum, 5-bit codes `0..=31`.
    Q5_1,
    /// 256 weights: 8 sub-blocks of 32 with 6-bit scales and mins, 4-bit codes.
    Q4K,
    /// 256 weights: 16 sub-blocks of 16 with 8-bit scales, 6-bit codes.
    Q6K,
}

/// The block type candle's CPU quantized matmul quantizes the input (left operand) into
/// before its integer dot products: `GgmlType::VecDotType` of the weight's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VecDotType {
    /// 32 values: f16 scale `max|x| / 127`, codes rounded half away from zero.
    Q8_0,
    /// Q8_0's scale and codes plus the block sum `f16(sum of codes) * scale` rounded to f16
    /// (used with the minimum of Q4_1 / Q5_1 weights).
    Q8_1,
    /// 256 values: f32 scale `max / -127` (signed largest-|x| value), codes clamped to
    /// `-128..=127`.
    Q8K,
}

impl BlockType {
    /// Every supported type.
    pub const ALL: [BlockType; 7] = [
        BlockType::Q8_0,
        BlockType::Q4_0,
        BlockType::Q4_1,
        BlockType::Q5_0,
        BlockType::Q5_1,
        BlockType::Q4K,
        BlockType::Q6K,
    ];

    /// candle's name for the type.
    pub fn dtype(self) -> GgmlDType {
        match self {
            BlockType::Q8_0 => GgmlDType::Q8_0,
            BlockType::Q4_0 => GgmlDType::Q4_0,
            BlockType::Q4_1 => GgmlDType::Q4_1,
            BlockType::Q5_0 => GgmlDType::Q5_0,
            BlockType::Q5_1 => GgmlDType::Q5_1,
            BlockType::Q4K => GgmlDType::Q4K,
            BlockType::Q6K => GgmlDType::Q6K,
        }
    }

    /// Weights per block (32, or 256 for the K-quants).
    pub fn block_size(self) -> usize {
        match self {
            BlockType::Q4K | BlockType::Q6K => 256,
            _ => 32,
        }
    }

    /// Bytes of one block as GGUF stores it (candle's `GgmlDType::type_size`).
    pub fn bytes_per_block(self) -> usize {
        match self {
            BlockType::Q8_0 => 34,
            BlockType::Q4_0 => 18,
            BlockType::Q4_1 => 20,
            BlockType::Q5_0 => 22,
            BlockType::Q5_1 => 24,
            BlockType::Q4K => 144,
            BlockType::Q6K => 210,
        }
    }

    /// Storage bits per weight, scales included (4.5 for Q4_0).
    pub fn bits_per_weight(self) -> f64 {
        (8 * self.bytes_per_block()) as f64 / self.block_size() as f64
    }

    /// The type candle's CPU matmul quantizes the input into for weights of this type.
    pub fn vec_dot_type(self) -> VecDotType {
        match self {
            BlockType::Q8_0 | BlockType::Q4_0 | BlockType::Q5_0 => VecDotType::Q8_0,
            BlockType::Q4_1 | BlockType::Q5_1 => VecDotType::Q8_1,
            BlockType::Q4K | BlockType::Q6K => VecDotType::Q8K,
        }
    }

    /// The name GGML gives the type (`"Q4_0"`, `"Q4_K"`).
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Q8_0 => "Q8_0",
            BlockType::Q4_0 => "Q4_0",
            BlockType::Q4_1 => "Q4_1",
            BlockType::Q5_0 => "Q5_0",
            BlockType::Q5_1 => "Q5_1",
            BlockType::Q4K => "Q4_K",
            BlockType::Q6K => "Q6_K",
        }
    }

    /// Checks that a tensor of shape `dims` splits into blocks along its last dim, the
    /// condition candle's `QTensor::quantize` sets; `what` names the caller in the error.
    pub(crate) fn check_dims(self, dims: &[usize], what: &str) -> Result<()> {
        check_last_dim(dims, self.block_size(), self.name(), what)
    }
}

impl VecDotType {
    /// candle's name for the type.
    pub fn dtype(self) -> GgmlDType {
        match self {
            VecDotType::Q8_0 => GgmlDType::Q8_0,
            VecDotType::Q8_1 => GgmlDType::Q8_1,
            VecDotType::Q8K => GgmlDType::Q8K,
        }
    }

    /// Values per block (32, or 256 for Q8_K).
    pub fn block_size(self) -> usize {
        match self {
            VecDotType::Q8K => 256,
            _ => 32,
        }
    }

    /// The name GGML gives the type.
    pub fn name(self) -> &'static str {
        match self {
            VecDotType::Q8_0 => "Q8_0",
            VecDotType::Q8_1 => "Q8_1",
            VecDotType::Q8K => "Q8_K",
        }
    }

    pub(crate) fn check_dims(self, dims: &[usize], what: &str) -> Result<()> {
        check_last_dim(dims, self.block_size(), self.name(), what)
    }
}

fn check_last_dim(dims: &[usize], block: usize, name: &str, what: &str) -> Result<()> {
    match dims.last() {
        Some(&last) if last % block == 0 => Ok(()),
        Some(&last) => Err(Error::config(
            format!(
                "{what}: {name} quantizes blocks of {block} along the last dim, and shape \
                 {dims:?} has {last} there"
            ),
            if block == 256 {
                "give this layer a 32-block type (Q8_0, Q4_0, ...) in the qconfig mapping, \
                 or make its input features a multiple of 256"
                    .to_string()
            } else {
                format!("make the last dim (input features) a multiple of {block}")
            },
        )),
        None => Err(Error::config(
            format!("{what}: {name} needs a tensor with at least one dim, got a scalar"),
            "reshape the tensor so that its last dim holds the blocks",
        )),
    }
}

impl TryFrom<GgmlDType> for BlockType {
    type Error = Error;

    fn try_from(dtype: GgmlDType) -> Result<Self> {
        BlockType::ALL
            .into_iter()
            .find(|t| t.dtype() == dtype)
            .ok_or_else(|| {
                Error::config(
                    format!("GGML type {dtype:?} has no fake quantization in candle-qat"),
                    "use one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4K, Q6K",
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_candle() {
        for t in BlockType::ALL {
            assert_eq!(t.block_size(), t.dtype().block_size(), "{t:?}");
            assert_eq!(t.bytes_per_block(), t.dtype().type_size(), "{t:?}");
            assert_eq!(
                t.vec_dot_type().block_size(),
                t.vec_dot_type().dtype().block_size()
            );
        }
        assert_eq!(BlockType::Q6K.bits_per_weight(), 6.5625);
        assert_eq!(BlockType::Q8_0.bits_per_weight(), 8.5);
    }

    #[test]
    fn shape_errors_name_the_fix() {
        let e = BlockType::Q4K
            .check_dims(&[4, 96], "blocks.0.fc")
            .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("blocks.0.fc") && s.contains("multiple of 256"),
            "{s}"
        );
        assert!(BlockType::Q4_0.check_dims(&[4, 40], "x").is_err());
        assert!(BlockType::Q4_0.check_dims(&[], "x").is_err());
        assert!(BlockType::Q4_0.check_dims(&[3, 64], "x").is_ok());
        assert!(GgmlDType::Q2K.try_into().map(|_: BlockType| ()).is_err());
    }
}
