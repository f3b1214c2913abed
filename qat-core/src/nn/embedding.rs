//! Embedding: a lookup of rows of `weight` by integer ids, float or with its table
//! fake-quantized by a weight-only torchao intx or GGML scheme (torchao's
//! `FakeQuantizedEmbedding`). An eager qconfig on it is refused at prepare time (PyTorch's
//! eager mode has no QAT embedding).

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use std::sync::Mutex;

use super::common::{lock, Common};
use super::simple::simple_module;
use super::weighted::IntxFq;
use crate::error::{Error, Result};
use crate::fake_quant::{IntxFakeQuantizer, IntxGranularity};
use crate::ggml::BlockType;
use crate::model::params::check_float_params;
use crate::model::Stage;
use crate::qconfig::{QConfig, Scheme};

/// How a prepared Embedding fake-quantizes its table.
#[derive(Clone, Debug)]
enum TableQuant {
    Intx(IntxFq),
    Ggml(BlockType),
}

/// PyTorch's `nn.Embedding(num_embeddings, dim)` with candle-nn's semantics: ids (u8, u32 or
/// i64, any shape) select rows of `weight` (`(num_embeddings, dim)`, initialised N(0, 1)),
/// giving `(..., dim)`; the backward adds into the selected rows. An id outside
/// `0..num_embeddings` is an error.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::VarBuilder;
/// use qat_core::nn::Embedding;
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let emb = Embedding::new(10, 4, vb.pp("embed_tokens"))?;
/// let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu)?;
/// assert_eq!(emb.forward(&ids)?.dims(), &[1, 3, 4]);
/// assert!(emb.forward(&Tensor::new(&[10u32], &Device::Cpu)?).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
    pub(crate) common: Common,
    quant: Option<TableQuant>,
}

impl Embedding {
    /// Loads or initialises an embedding table of `num_embeddings` rows of `dim` values.
    pub fn new(num_embeddings: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        if num_embeddings == 0 || dim == 0 {
            return Err(Error::config(
                format!("Embedding({num_embeddings}, {dim})"),
                "use num_embeddings >= 1 and dim >= 1",
            ));
        }
        let init = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let weight = vb.get_with_hints((num_embeddings, dim), "weight", init)?;
        Ok(Embedding {
            weight,
            common: Common::default(),
            quant: None,
        })
    }

    /// The table `weight`, `(num_embeddings, dim)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Rows of the table.
    pub fn num_embeddings(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Values per row.
    pub fn dim(&self) -> usize {
        self.weight.dims()[1]
    }

    fn check_ids(&self, ids: &Tensor) -> Result<()> {
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            return Err(Error::tensor(
                format!(
                    "Embedding takes integer ids but got a {:?} tensor",
                    ids.dtype()
                ),
                "feed token ids as a u32 or i64 tensor",
            ));
        }
        if ids.elem_count() == 0 {
            return Ok(());
        }
        let flat = ids.flatten_all()?.to_dtype(DType::I64)?;
        let lo = flat.min(0)?.to_scalar::<i64>()?;
        let hi = flat.max(0)?.to_scalar::<i64>()?;
        let n = self.num_embeddings() as i64;
        if lo < 0 || hi >= n {
            let bad = if lo < 0 { lo } else { hi };
            return Err(Error::tensor(
                format!("Embedding with {n} rows got the id {bad}"),
                format!("feed ids in 0..{n} (check the tokenizer's vocabulary size)"),
            ));
        }
        Ok(())
    }

    /// The table as the forward uses it: fake-quantized when prepared with a weight-only
    /// scheme (the deployed table, which candle dequantizes on load), else the weight.
    pub fn effective_weight(&self) -> Result<Tensor> {
        match &self.quant {
            None => Ok(self.weight.clone()),
            Some(TableQuant::Intx(fq)) => lock(&fq.0)?.forward(&self.weight),
            Some(TableQuant::Ggml(ty)) => crate::ggml::fake_quantize_ggml(&self.weight, *ty),
        }
    }

    /// The GGML block type the table was prepared with (`None`: float or intx).
    pub fn ggml_type(&self) -> Option<BlockType> {
        match &self.quant {
            Some(TableQuant::Ggml(ty)) => Some(*ty),
            _ => None,
        }
    }

    fn forward_t(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_ids(ids)?;
        let mut dims = ids.dims().to_vec();
        dims.push(self.dim());
        let table = self.effective_weight()?;
        let rows = table.index_select(&ids.flatten_all()?, 0)?;
        Ok(rows.reshape(dims)?)
    }

    /// What prepare would refuse for `qc`: a scheme whose weight spec does not fit the
    /// table (a group that does not divide `dim`, per token, GGML blocks that do not tile a
    /// row).
    fn check_table_scheme(&self, qc: &QConfig) -> Result<()> {
        match qc.scheme {
            Scheme::Eager => Ok(()),
            Scheme::Intx { weight, .. } => {
                if weight.granularity() == IntxGranularity::PerToken {
                    return Err(Error::config(
                        "a per-token intx scheme on an Embedding's table (per token is for                          activations)",
                        "use per_axis (torchao's default for embeddings) or per_group(g)",
                    ));
                }
                weight.group_len(self.weight.dims()).map(|_| ())
            }
            Scheme::Ggml { weight, .. } => {
                if !self.dim().is_multiple_of(weight.block_size()) {
                    return Err(Error::config(
                        format!(
                            "GGML {} needs the embedding dim divisible by its block of {},                              but the table is {:?}",
                            weight.name(),
                            weight.block_size(),
                            self.weight.dims()
                        ),
                        "use a type with 32-element blocks (Q8_0, Q4_0) or keep the                          Embedding float (None)",
                    ));
                }
                Ok(())
            }
        }
    }

    fn prepare_with(&mut self, qconfig: Option<&QConfig>, observed: bool) -> Result<()> {
        let Some(qc) = qconfig else {
            return self.common.prepare(None, observed);
        };
        let quant = match qc.scheme {
            Scheme::Eager => return self.common.prepare(qconfig, observed),
            // A scheme that quantizes inputs is a Linear scheme: the table stays float.
            s if s.quantizes_inputs() => return self.common.prepare(None, observed),
            Scheme::Intx { weight, .. } => {
                TableQuant::Intx(IntxFq(Mutex::new(IntxFakeQuantizer::new(weight))))
            }
            Scheme::Ggml { weight, .. } => TableQuant::Ggml(weight),
        };
        self.check_table_scheme(qc)?;
        self.common.prepare_with(qconfig, |_| None, |_| Ok(()))?;
        self.quant = Some(quant);
        Ok(())
    }

    fn table_quantizer(&mut self, f: &mut crate::model::IntxVisitor<'_>) -> Result<()> {
        if let Some(TableQuant::Intx(fq)) = &mut self.quant {
            let q = fq.0.get_mut().unwrap_or_else(|p| p.into_inner());
            f("weight_fake_quantizer", q, Some(&self.weight))?;
        }
        Ok(())
    }

    fn stage_convert_with(&self) -> Result<crate::model::Staged> {
        if self.quant.is_some() && self.common.stage() == Stage::Prepared {
            // The deployed table is the dequantized one the forward already uses (candle
            // dequantizes a GGUF token_embd on load): the layer keeps its form.
            return Ok(crate::model::Staged::unchanged());
        }
        self.common.stage_convert("Embedding", false)
    }

    fn params(&self) -> Vec<(&'static str, Tensor)> {
        vec![("weight", self.weight.clone())]
    }

    fn load_params(&mut self, params: Vec<(String, Tensor)>) -> Result<()> {
        check_float_params(&self.params(), &params)?;
        for (_, t) in params {
            self.weight = t
                .to_dtype(self.weight.dtype())?
                .to_device(self.weight.device())?;
        }
        Ok(())
    }
}

simple_module!(
    Embedding,
    observed: false,
    params: params,
    load_params,
    int8: false,
    scheme: WeightOnly,
    check: check_table_scheme,
    intx: table_quantizer
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::QuantModule;
    use candle_core::{Device, Module};
    use candle_nn::VarMap;

    #[test]
    fn rows_are_selected_and_the_table_has_no_int8_form() {
        let vm = VarMap::new();
        let mut e =
            Embedding::new(3, 2, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let table = Tensor::new(&[[0f32, 1.0], [2.0, 3.0], [4.0, 5.0]], &Device::Cpu).unwrap();
        e.load_float_params(vec![("weight".into(), table)]).unwrap();
        let ids = Tensor::new(&[[2u32, 0], [1, 1]], &Device::Cpu).unwrap();
        let y = e.forward(&ids).unwrap();
        assert_eq!(y.dims(), &[2, 2, 2]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]
        );
        // An empty batch of ids gives an empty batch of rows.
        let none = Tensor::zeros((0, 4), DType::U32, &Device::Cpu).unwrap();
        assert_eq!(e.forward(&none).unwrap().dims(), &[0, 4, 2]);
        assert!(!e.has_int8_form());
        assert_eq!(e.type_name(), "Embedding");
        let bad = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(e.load_float_params(vec![("weight".into(), bad)]).is_err());
    }
}
