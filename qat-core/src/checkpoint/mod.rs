//! Saving and loading with safetensors: the QAT state of a prepared model (resume training
//! exactly) and the converted int8 model, whole (int8 layers and the layers left in float).
//!
//! Both files record the model's structure (each layer's path, kind and stage) and a content
//! checksum (64-bit FNV-1a over every tensor and the metadata) in their metadata. A load
//! reads and checks everything first — format and version, checksum, structure against the
//! model, every value — and only then changes the model, so a file that does not fit is an
//! error naming the first difference and leaves the model as it was.
//!
//! Formats: `candle-qat/qat-state/2` and `candle-qat/int8/2`. Files of the first versions
//! (`/1`, without structure record or checksum, and int8 files without the float layers) are
//! refused with a message to save them again.

mod file;
mod int8;
mod qat;
mod structure;

use std::path::Path;

use candle_nn::VarMap;

use crate::error::Result;
use crate::model::Quantizable;

pub use crate::record::Int8State;

/// Writes the model's float parameters and BN statistics (from `varmap`), the state of every
/// fake-quant (qparams, observer statistics, toggles, LSQ parameters) and the model's
/// structure to `path`.
///
/// ```no_run
/// # fn demo<M: qat_core::model::Quantizable>(model: &mut M, varmap: &candle_nn::VarMap) -> qat_core::Result<()> {
/// qat_core::checkpoint::save_qat_checkpoint(model, varmap, "qat.safetensors")?;
/// // later, into a model fused and prepared the same way:
/// qat_core::checkpoint::load_qat_checkpoint(model, varmap, "qat.safetensors")?;
/// # Ok(()) }
/// ```
pub fn save_qat_checkpoint<M: Quantizable>(
    model: &mut M,
    varmap: &VarMap,
    path: impl AsRef<Path>,
) -> Result<()> {
    qat::save(model, varmap, path.as_ref())
}

/// Restores what [`save_qat_checkpoint`] wrote into a model built, fused and prepared the
/// same way, and its `varmap`. A model of another structure (another struct, missing or
/// extra layers, not fused or not prepared as the saved one), a missing entry, a shape that
/// does not match, a non-finite parameter, an invalid fake-quant state or a file whose
/// checksum does not match is an error, and leaves the model and the `varmap` unchanged.
pub fn load_qat_checkpoint<M: Quantizable>(
    model: &mut M,
    varmap: &VarMap,
    path: impl AsRef<Path>,
) -> Result<()> {
    qat::load(model, varmap, path.as_ref())
}

/// Writes a converted model whole: per converted layer its int8 weight codes (safetensors
/// `I8`), weight scales, biases, input and output qparams (and which layer produced each
/// input); per layer that computes in float (a `None` qconfig, a converted BatchNorm) its
/// float tensors (weights, biases, BatchNorm statistics); the structure and a checksum in
/// the metadata, with each weight's scheme. A model with prepared, unconverted layers is an
/// error.
pub fn save_int8<M: Quantizable>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    int8::save(model, path.as_ref())
}

/// Loads a model written by [`save_int8`] into a model of the same struct, fused the same
/// way and not prepared; its parameters are not needed (build it from `VarBuilder::zeros`):
/// the file holds every tensor the converted model computes with, so the loaded model's
/// outputs equal the saved model's. Layers saved converted become converted; the model is
/// left in eval mode.
///
/// Everything is checked before the model changes: a model of another structure (another
/// struct, missing, extra or renamed layers, not fused as the saved one, prepared or
/// converted), other layer sizes, a value no converted model holds (a NaN or infinite bias or
/// scale, a zero point outside its code range, an input whose qparams differ from the
/// output qparams of the layer that produced it) and a file whose checksum does not match
/// are errors that leave the model as it was.
pub fn load_int8<M: Quantizable>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    int8::load(model, path.as_ref())
}
