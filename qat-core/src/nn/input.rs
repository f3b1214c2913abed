//! Checks of what a layer is fed, with messages that name the layer and the fix (instead of
//! the text of the candle op that would fail further in).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// A float input must have the dtype of the layer's parameters (an f16/bf16 input into an f32
/// model, or the reverse, is refused here rather than by candle's matmul or conv).
pub(crate) fn check_dtype(layer: &str, x: &Tensor, params: DType) -> Result<()> {
    let dt = x.dtype();
    if dt.is_float() && dt != params {
        return Err(Error::tensor(
            format!("{layer} has {params:?} parameters but got a {dt:?} input"),
            format!(
                "cast the input to the model's dtype before the forward \
                 (x.to_dtype(DType::{params:?})), or build the model's VarBuilder with {dt:?}"
            ),
        ));
    }
    Ok(())
}

/// The channel dim (`dim`) of `x` must hold `expected` channels.
pub(crate) fn check_channels(
    layer: &str,
    x: &Tensor,
    dim: usize,
    expected: usize,
    setting: &str,
) -> Result<()> {
    let got = x.dims().get(dim).copied();
    if got != Some(expected) {
        return Err(Error::tensor(
            format!(
                "{layer} takes {expected} channels along dim {dim} but got an input of shape {:?}",
                x.dims()
            ),
            format!(
                "feed it tensors with {expected} channels along dim {dim} (its {setting}), or \
                 build the layer with the {setting} of its input"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn messages_name_the_layer_and_the_fix() {
        let x = Tensor::zeros((2, 3), DType::F16, &Device::Cpu).unwrap();
        let e = check_dtype("Linear", &x, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Linear has F32 parameters but got a F16 input"),
            "{e}"
        );
        assert!(e.contains("x.to_dtype(DType::F32)"), "{e}");
        // Codes (u8) are another check's business.
        let q = Tensor::zeros((2, 3), DType::U8, &Device::Cpu).unwrap();
        assert!(check_dtype("Linear", &q, DType::F32).is_ok());
        let e = check_channels("Conv2d", &x, 1, 4, "in_channels")
            .unwrap_err()
            .to_string();
        assert!(e.contains("takes 4 channels along dim 1"), "{e}");
        assert!(e.contains("[2, 3]") && e.contains("in_channels"), "{e}");
        assert!(check_channels("Conv2d", &x, 1, 3, "in_channels").is_ok());
    }
}
