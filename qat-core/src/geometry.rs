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
