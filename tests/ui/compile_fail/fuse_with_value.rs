use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse = 1)]
struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
}

fn main() {}
