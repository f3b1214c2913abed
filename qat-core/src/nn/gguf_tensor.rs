//! Each exportable layer's GGUF tensor: the weight a GGUF file stores for it, as candle's
//! `QTensor`. A float layer gives its weight as an F32 tensor; a layer in another stage is
//! refused with the fix, since a float copy of a fake-quantized or int8 layer would not
//! compute what the trained model computed.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::{Embedding, Linear, RmsNorm};
use crate::error::{Error, Result};
use crate::model::{QuantModule, Stage};

/// `weight` as an F32 GGUF tensor (on the CPU, detached; exact for f16/bf16 weights).
fn float_qtensor(weight: &Tensor) -> Result<QTensor> {
    let w = weight
        .detach()
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?;
    Ok(QTensor::quantize(&w, GgmlDType::F32)?)
}

/// The error for a layer whose stage has no GGUF form, with the module path when known.
fn unexportable(layer: &dyn QuantModule, path: &str) -> Error {
    let kind = layer.kind();
    let (what, fix) = match layer.stage() {
        Stage::Fused => (
            format!("a fused {kind} has no GGUF form (its fused ops are not in the file)"),
            "export the unfused float model",
        ),
        Stage::Prepared => (
            format!(
                "a {kind} prepared for QAT has no GGUF form under its qconfig (a float copy \
                 would drop its fake quantization)"
            ),
            "convert the model first, or export the float model",
        ),
        Stage::Converted => (
            format!("a {kind} converted to int8 has no GGUF form"),
            "export the float model, or prepare it with a GGML qconfig and convert",
        ),
        Stage::Float => (
            format!("a float {kind} has no GGUF form"),
            "export a Linear, Embedding or RmsNorm",
        ),
    };
    let e = Error::write(format!("GGUF tensor: {what}"), fix);
    if path.is_empty() {
        e
    } else {
        e.in_module(path)
    }
}

impl Linear {
    /// The module path passes gave the layer (empty before any pass walked the model).
    pub(crate) fn module_path(&self) -> &str {
        &self.w.common.path
    }

    /// The weight `(out_features, in_features)` as GGUF stores it. The bias is not part of it:
    /// the caller decides whether its format has one.
    pub(crate) fn gguf_tensor(&self) -> Result<QTensor> {
        match self.stage() {
            Stage::Float => float_qtensor(self.weight()),
            // A GGML-converted Linear: a copy of the blocks its QMatMul runs.
            Stage::Converted if self.ggml_weight().is_some() => {
                let held = self
                    .ggml_weight()
                    .ok_or_else(|| Error::state("no GGML weight", "report this as a bug"))?;
                let storage = candle_core::quantized::QStorage::from_data(
                    held.data()?,
                    &Device::Cpu,
                    held.dtype(),
                )?;
                Ok(QTensor::new(storage, held.shape().clone())?)
            }
            Stage::Fused | Stage::Prepared | Stage::Converted => {
                Err(unexportable(self, &self.w.common.path))
            }
        }
    }
}

impl Embedding {
    /// The module path passes gave the layer (empty before any pass walked the model).
    pub(crate) fn module_path(&self) -> &str {
        &self.common.path
    }

    /// The table `(num_embeddings, dim)` as GGUF stores it.
    pub(crate) fn gguf_tensor(&self) -> Result<QTensor> {
        match self.stage() {
            Stage::Float => float_qtensor(self.weight()),
            // A table prepared with a GGML scheme: its blocks, which candle dequantizes on
            // load to exactly the table the fake-quant forward used.
            Stage::Prepared if self.ggml_type().is_some() => {
                let ty = self
                    .ggml_type()
                    .ok_or_else(|| Error::state("no GGML type", "report this as a bug"))?;
                Ok(crate::ggml::to_qtensor(
                    &self.weight().detach().to_device(&Device::Cpu)?,
                    ty,
                )?)
            }
            Stage::Fused | Stage::Prepared | Stage::Converted => {
                Err(unexportable(self, &self.common.path))
            }
        }
    }
}

impl RmsNorm {
    /// The module path passes gave the layer (empty before any pass walked the model).
    pub(crate) fn module_path(&self) -> &str {
        &self.common.path
    }

    /// The scale `(dim,)`, always F32 (GGUF runtimes read norms as float).
    pub(crate) fn gguf_tensor(&self) -> Result<QTensor> {
        match self.stage() {
            Stage::Float => float_qtensor(self.weight()),
            Stage::Fused | Stage::Prepared | Stage::Converted => {
                Err(unexportable(self, &self.common.path))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qconfig::{Backend, QConfig};
    use candle_nn::{VarBuilder, VarMap};

    #[test]
    fn float_layers_give_their_weights_as_f32_and_prepared_ones_are_refused() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut lin = Linear::new(8, 3, false, vb.pp("fc")).unwrap();
        let emb = Embedding::new(5, 8, vb.pp("emb")).unwrap();
        let norm = RmsNorm::new(8, 1e-5, vb.pp("norm")).unwrap();
        for (q, w) in [
            (lin.gguf_tensor().unwrap(), lin.weight().clone()),
            (emb.gguf_tensor().unwrap(), emb.weight().clone()),
            (norm.gguf_tensor().unwrap(), norm.weight().clone()),
        ] {
            assert_eq!(q.dtype(), GgmlDType::F32);
            assert_eq!(q.shape().dims(), w.dims());
            let back = q.dequantize(&Device::Cpu).unwrap();
            let d = (back - &w).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        }
        lin.prepare_qat(Some(&QConfig::default_qat(Backend::X86)))
            .unwrap();
        let e = lin.gguf_tensor().unwrap_err().to_string();
        assert!(
            e.contains("prepared for QAT") && e.contains("convert"),
            "{e}"
        );
    }
}
