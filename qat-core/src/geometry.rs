//! Convolution geometry: stride, padding, dilation and groups, shared by the layers, the
//! float and integer kernels and the ONNX exporter.

/// Convolution settings, the same along every spatial dim (as candle's convolutions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvConfig {
    /// Zero padding on each side.
    pub padding: usize,
    /// Step between windows.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups (in and out channels must divide by it).
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        ConvConfig {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Transposed-convolution settings (PyTorch's `ConvTranspose1d/2d` arguments), the same along
/// every spatial dim: an input of length `l` gives `(l - 1) * stride - 2 * padding +
/// dilation * (k - 1) + output_padding + 1` outputs.
///
/// ```
/// use qat_core::nn::ConvTransposeConfig;
/// let c = ConvTransposeConfig { stride: 2, padding: 1, output_padding: 1, ..Default::default() };
/// assert_eq!(c.out_len(5, 3), Some(10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTransposeConfig {
    /// Removed from each side of the full output (PyTorch's `padding`).
    pub padding: usize,
    /// Added to one side (the end) of the output, `< max(stride, dilation)`.
    pub output_padding: usize,
    /// Step between the input positions' windows in the output.
    pub stride: usize,
    /// Spacing between kernel taps.
    pub dilation: usize,
    /// Channel groups (in and out channels must divide by it).
    pub groups: usize,
}

impl Default for ConvTransposeConfig {
    fn default() -> Self {
        ConvTransposeConfig {
            padding: 0,
            output_padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

impl ConvTransposeConfig {
    /// The output length for an input of length `l` and a kernel of `k` taps (`None` when it
    /// would not be positive).
    pub fn out_len(&self, l: usize, k: usize) -> Option<usize> {
        let full = (l.checked_sub(1)? * self.stride + self.dilation * k.checked_sub(1)?)
            + self.output_padding
            + 1;
        full.checked_sub(2 * self.padding).filter(|&n| n > 0)
    }

    /// The same transposed convolution as a direct one over the input dilated by `stride`
    /// (`stride - 1` zeros between neighbours) and padded by `(before, after)` (negative:
    /// cropped), with the flipped, transposed kernel, stride 1 and this dilation.
    pub(crate) fn dilated_padding(&self, k: usize) -> (isize, isize) {
        let lo = (self.dilation * (k.saturating_sub(1))) as isize - self.padding as isize;
        (lo, lo + self.output_padding as isize)
    }
}
