use candle_qat::nn::{Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(conv1, bn1), fuse(relu1, conv2))]
struct Net {
    conv1: Conv2d,
    bn1: candle_qat::nn::BatchNorm1d,
    relu1: ReLU,
    conv2: Conv2d,
}

fn main() {}
