use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
enum Net {
    Conv(Conv2d),
    Bn(BatchNorm2d),
    Relu(ReLU),
}

fn main() {}
