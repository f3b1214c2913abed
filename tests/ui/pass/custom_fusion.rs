//! A user's own layer type joins a fused group by implementing `FuseWith` for itself (a
//! tuple of layers is a foreign type, so `Fusable` cannot be implemented for one).
#![deny(warnings)]

use candle_qat::fuse::{FuseGroup, FuseWith};
use candle_qat::model::Quantizable;
use candle_qat::nn::{BatchNorm2d, Conv2d, ReLU};
use candle_qat::Quantizable;

/// A user's layer holding a candle-qat convolution.
#[derive(Quantizable)]
struct MyConv {
    conv: Conv2d,
    #[qat(skip)]
    #[allow(dead_code)]
    calls: usize,
}

/// As a pair: (MyConv, ReLU).
impl<'a> FuseWith<&'a mut ReLU> for MyConv {
    fn fuse_with(&mut self, relu: &'a mut ReLU, group: &FuseGroup) -> candle_qat::Result<()> {
        self.conv.fuse_with(relu, group)
    }
}

/// As a triple: (MyConv, BatchNorm2d, ReLU).
impl<'a> FuseWith<(&'a mut BatchNorm2d, &'a mut ReLU)> for MyConv {
    fn fuse_with(
        &mut self,
        rest: (&'a mut BatchNorm2d, &'a mut ReLU),
        group: &FuseGroup,
    ) -> candle_qat::Result<()> {
        self.conv.fuse_with(rest, group)
    }
}

#[derive(Quantizable)]
#[qat(fuse(a, relu_a), fuse(b, bn_b, relu_b))]
struct Net {
    a: MyConv,
    relu_a: ReLU,
    b: MyConv,
    bn_b: BatchNorm2d,
    relu_b: ReLU,
}

/// A generic group whose head is the user's type.
#[derive(Quantizable)]
#[qat(fuse(head, relu))]
struct Activated<H> {
    head: H,
    relu: ReLU,
}

fn assert_quantizable<T: Quantizable>() {}

fn main() {
    assert_quantizable::<Net>();
    assert_quantizable::<Activated<MyConv>>();
}
