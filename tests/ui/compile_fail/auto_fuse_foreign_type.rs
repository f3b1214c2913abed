use candle_qat::nn::{BatchNorm2d, ReLU};
use candle_qat::Quantizable;

/// Not candle-qat's Conv2d: auto_fuse matches by name, the type check catches it.
#[derive(Quantizable)]
struct Conv2d {}

#[derive(Quantizable)]
#[qat(auto_fuse)]
struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    relu1: ReLU,
}

fn main() {}
