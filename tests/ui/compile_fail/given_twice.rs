use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(auto_fuse, auto_fuse)]
struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    #[qat(skip, skip)]
    relu1: ReLU,
}

fn main() {}
