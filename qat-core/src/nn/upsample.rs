//! Nearest-neighbour upsampling: quantization-transparent (every output is a copy of an
//! input), so it owns no observer and, converted, copies integer codes.

use candle_core::Tensor;

use super::common::Common;
use super::simple::simple_module;
use crate::error::{Error, Result};
use crate::qconfig::QConfig;
use crate::record::{FloatOp, Op};

/// Nearest-neighbour upsampling of `(N, C, H, W)` by integer factors (PyTorch's
/// `nn.Upsample(scale_factor=(sh, sw), mode='nearest')`: output pixel `(i, j)` copies input
/// `(i / sh, j / sw)`). No observer: its int8 output keeps its input's qparams, in PyTorch's
/// eager mode as here; converted, it copies codes.
///
/// ```
/// use candle_core::{Device, Module, Tensor};
/// use qat_core::nn::Upsample;
/// let x = Tensor::new(&[[[[1f32, 2.0]]]], &Device::Cpu)?;
/// let y = Upsample::nearest([2, 2])?.forward(&x)?;
/// assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Upsample {
    scale: [usize; 2],
    pub(crate) common: Common,
}

impl Upsample {
    /// Nearest upsampling by `scale_factor` (height, width), each >= 1.
    pub fn nearest(scale_factor: [usize; 2]) -> Result<Self> {
        if scale_factor.contains(&0) {
            return Err(Error::config(
                format!("Upsample with scale factor {scale_factor:?}"),
                "use integer scale factors >= 1",
            ));
        }
        Ok(Upsample {
            scale: scale_factor,
            common: Common::default(),
        })
    }
    /// The (height, width) factors.
    pub fn scale_factor(&self) -> [usize; 2] {
        self.scale
    }
    fn up(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = match x.dims() {
            &[n, c, h, w] => (n, c, h, w),
            d => {
                return Err(Error::tensor(
                    format!("Upsample got an input of shape {d:?}"),
                    "feed Upsample a (N, C, H, W) tensor",
                ))
            }
        };
        // Each pixel broadcast over its sh x sw block (any factors; the backward sums each
        // block, which candle's own upsampling does for uniform factors only).
        let [sh, sw] = self.scale;
        Ok(x.reshape((n, c, h, 1, w, 1))?
            .broadcast_as((n, c, h, sh, w, sw))?
            .reshape((n, c, h * sh, w * sw))?)
    }
    fn op(&self) -> FloatOp {
        FloatOp::UpsampleNearest(self.scale)
    }
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        if self.common.converted_io().is_some() {
            self.common.check_input(x, "Upsample")?;
            let y = self.up(x)?;
            self.common.trace(&[x], &y, || Op::OnCodes(self.op()));
            return Ok(y);
        }
        self.common.check_input(x, "Upsample")?;
        let y = self.up(x)?;
        self.common.pass_through(x, &y)?;
        self.common.trace_float(&[x], &y, || self.op());
        Ok(y)
    }
    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        self.common.prepare(qconfig, observed)
    }
    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        self.common.stage_convert("Upsample", true)
    }
}

simple_module!(Upsample, observed: false, scheme: Float);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Var};

    #[test]
    fn codes_and_gradients() {
        let dev = Device::Cpu;
        let up = Upsample::nearest([2, 3]).unwrap();
        let q = Tensor::from_vec(vec![1u8, 2, 3, 4], (1, 1, 2, 2), &dev).unwrap();
        let y = up.up(&q).unwrap();
        assert_eq!(y.dims(), &[1, 1, 4, 6]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<u8>().unwrap()[..6],
            [1, 1, 1, 2, 2, 2]
        );
        // Each input gets the sum of the gradients of its copies.
        let x = Var::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &dev).unwrap();
        let g = up
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert_eq!(gx.to_vec1::<f32>().unwrap(), [6.0; 4]);
        assert!(Upsample::nearest([0, 1]).is_err());
        assert!(up
            .forward(&Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap())
            .is_err());
    }
}
