use candle_qat::nn::{Conv2d, ReLU};
use candle_qat::Quantizable;

#[derive(Quantizable)]
#[qat(fuse(conv1, dropout, relu1))]
struct Net {
    conv1: Conv2d,
    #[qat(skip)]
    dropout: f64,
    relu1: ReLU,
}

fn main() {}
