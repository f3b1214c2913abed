use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
union Net {
    a: std::mem::ManuallyDrop<Conv2d>,
    b: std::mem::ManuallyDrop<ReLU>,
    c: std::mem::ManuallyDrop<BatchNorm2d>,
}

fn main() {}
