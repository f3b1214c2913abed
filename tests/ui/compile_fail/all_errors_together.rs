use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(conv1, bn9), fuse(bn1, relu1), fuse(relu1, conv2), fuse(conv2))]
#[qat(frobnicate, skip)]
struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
    conv2: Conv2d,
    #[qat(fuse(conv1, bn1))]
    relu2: ReLU,
    dropout: f64,
}

fn main() {}
