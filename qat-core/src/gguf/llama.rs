//! The Llama GGUF writer: metadata keys, tensor names and the checks that make a file
//! `quantized_llama` loads and runs as the model ran.

use std::io::{Seek, Write};
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;

use crate::error::{Error, Result};
use crate::nn::{Embedding, Linear, RmsNorm};

/// The hyper-parameters a Llama GGUF's metadata holds (`llama.*` keys). The rotary
/// dimension written is the head dim, `embedding_length / head_count`; the feed-forward
/// length is read from the blocks' `ffn_gate` shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHparams {
    /// Attention heads (`llama.attention.head_count`).
    pub head_count: usize,
    /// Key/value heads (`llama.attention.head_count_kv`): `head_count` without grouped-query
    /// attention; must divide it.
    pub head_count_kv: usize,
    /// Transformer blocks (`llama.block_count`).
    pub block_count: usize,
    /// Model width (`llama.embedding_length`).
    pub embedding_length: usize,
    /// Context the model was trained on (`llama.context_length`).
    pub context_length: usize,
    /// The RmsNorms' epsilon (`llama.attention.layer_norm_rms_epsilon`, stored as F32): one
    /// value for every norm, as the loader applies it.
    pub rms_norm_eps: f64,
    /// Rotary base (`llama.rope.freq_base`, F32), 10000 in Llama 2.
    pub rope_freq_base: f32,
}

/// One transformer block's layers by GGUF role (`blk.N.<role>.weight`): attention
/// `x + attn_output(attention(attn_q, attn_k, attn_v)(attn_norm(x)))`, then
/// `x + ffn_down(silu(ffn_gate(h)) * ffn_up(h))` with `h = ffn_norm(x)`.
#[derive(Clone, Copy, Debug)]
pub struct LlamaBlock<'a> {
    /// The RmsNorm before attention (Meta: `attention_norm`).
    pub attn_norm: &'a RmsNorm,
    /// Query projection (`attention.wq`).
    pub attn_q: &'a Linear,
    /// Key projection (`attention.wk`).
    pub attn_k: &'a Linear,
    /// Value projection (`attention.wv`).
    pub attn_v: &'a Linear,
    /// Attention output projection (`attention.wo`).
    pub attn_output: &'a Linear,
    /// The RmsNorm before the feed-forward (`ffn_norm`).
    pub ffn_norm: &'a RmsNorm,
    /// SwiGLU gate, the input of the SiLU (`feed_forward.w1`).
    pub ffn_gate: &'a Linear,
    /// SwiGLU down projection (`feed_forward.w2`).
    pub ffn_down: &'a Linear,
    /// SwiGLU up projection (`feed_forward.w3`).
    pub ffn_up: &'a Linear,
}

/// A Llama-architecture model as a GGUF file for candle-transformers' `quantized_llama`
/// (and llama.cpp's `llama` architecture: rotary pairs interleaved, as Meta's Llama and
/// `candle_nn::rotary_emb::rope_i` rotate them, so no q/k permutation is needed).
///
/// Give every role; [`LlamaGguf::write`] checks the whole model first and writes nothing if
/// a role is missing (a missing `output` would be silently tied to `token_embd` by the
/// loader), a shape disagrees with the hyper-parameters, a Linear has a bias (the format
/// has none), a norm's epsilon differs from `rms_norm_eps`, or a layer is in a stage with
/// no GGUF form. Float layers are written as F32.
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::VarBuilder;
/// use qat_core::gguf::{LlamaBlock, LlamaGguf, LlamaHparams};
/// use qat_core::nn::{Embedding, Linear, RmsNorm};
/// let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
/// let (e, f) = (8, 16);
/// let lin = |i, o| Linear::new(i, o, false, vb.clone());
/// let norm = RmsNorm::new(e, 1e-5, vb.clone())?;
/// let (q, k, v, o) = (lin(e, e)?, lin(e, e)?, lin(e, e)?, lin(e, e)?);
/// let (gate, up, down) = (lin(e, f)?, lin(e, f)?, lin(f, e)?);
/// let embd = Embedding::new(11, e, vb.clone())?;
/// let head = lin(e, 11)?;
/// let hparams = LlamaHparams {
///     head_count: 2,
///     head_count_kv: 2,
///     block_count: 1,
///     embedding_length: e,
///     context_length: 16,
///     rms_norm_eps: 1e-5,
///     rope_freq_base: 10000.0,
/// };
/// let block = LlamaBlock {
///     attn_norm: &norm, attn_q: &q, attn_k: &k, attn_v: &v, attn_output: &o,
///     ffn_norm: &norm, ffn_gate: &gate, ffn_down: &down, ffn_up: &up,
/// };
/// let gguf = LlamaGguf::new(hparams).name("doc").token_embd(&embd).block(0, block);
/// // No output_norm and output yet: refused, naming the role.
/// assert!(gguf.tensors().unwrap_err().to_string().contains("output_norm"));
/// let gguf = gguf.output_norm(&norm).output(&head);
/// let mut file = std::io::Cursor::new(Vec::new());
/// gguf.write_to(&mut file)?;
/// file.set_position(0);
/// let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
/// assert_eq!(content.tensor_infos.len(), 1 + 9 + 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct LlamaGguf<'a> {
    hparams: LlamaHparams,
    name: Option<String>,
    token_embd: Option<&'a Embedding>,
    blocks: Vec<(usize, LlamaBlock<'a>)>,
    output_norm: Option<&'a RmsNorm>,
    output: Option<&'a Linear>,
}

/// Metadata entries in file order.
type Metadata = Vec<(String, Value)>;
/// Tensors with their GGUF names, in file order.
type Tensors = Vec<(String, QTensor)>;

/// Where a tensor comes from, for messages: its GGUF name and the layer's module path.
struct Role<'s> {
    name: &'s str,
    path: &'s str,
}

impl Role<'_> {
    fn err(&self, what: impl std::fmt::Display, fix: impl Into<String>) -> Error {
        let at = if self.path.is_empty() {
            match meta_name(self.name) {
                Some(m) => format!(" (Meta Llama's `{m}`)"),
                None => String::new(),
            }
        } else {
            format!(" (module `{}`)", self.path)
        };
        Error::write(format!("Llama GGUF: `{}`{at} {what}", self.name), fix)
    }
}

/// The Meta Llama module of a GGUF tensor name (`blk.1.attn_k.weight` ->
/// `layers.1.attention.wk`), for messages about layers whose own path is not known.
fn meta_name(gguf: &str) -> Option<String> {
    let role = gguf.strip_suffix(".weight")?;
    let top = match role {
        "token_embd" => Some("tok_embeddings"),
        "output_norm" => Some("norm"),
        "output" => Some("output"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = role.strip_prefix("blk.")?;
    let (i, r) = rest.split_once('.')?;
    let m = match r {
        "attn_norm" => "attention_norm",
        "attn_q" => "attention.wq",
        "attn_k" => "attention.wk",
        "attn_v" => "attention.wv",
        "attn_output" => "attention.wo",
        "ffn_norm" => "ffn_norm",
        "ffn_gate" => "feed_forward.w1",
        "ffn_up" => "feed_forward.w3",
        "ffn_down" => "feed_forward.w2",
        _ => return None,
    };
    Some(format!("layers.{i}.{m}"))
}

/// Writes checked metadata and tensors with candle's GGUF writer.
fn write_checked<W: Write + Seek>(
    w: &mut W,
    meta: &[(String, Value)],
    tensors: &[(String, QTensor)],
) -> Result<()> {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    gguf_file::write(w, &meta, &tensors)?;
    Ok(())
}

fn u32_of(what: &str, v: usize) -> Result<Value> {
    u32::try_from(v).map(Value::U32).map_err(|_| {
        Error::config(
            format!("Llama GGUF: {what} {v} does not fit the format's u32"),
            format!("use a {what} below 2^32"),
        )
    })
}

impl<'a> LlamaGguf<'a> {
    /// A writer with these hyper-parameters and no layers yet.
    pub fn new(hparams: LlamaHparams) -> Self {
        LlamaGguf {
            hparams,
            name: None,
            token_embd: None,
            blocks: Vec::new(),
            output_norm: None,
            output: None,
        }
    }

    /// The model's name (`general.name`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The token embedding (`token_embd`; Meta: `tok_embeddings`).
    pub fn token_embd(mut self, embedding: &'a Embedding) -> Self {
        self.token_embd = Some(embedding);
        self
    }

    /// Block `index` (`blk.<index>.*`), counting from 0.
    pub fn block(mut self, index: usize, block: LlamaBlock<'a>) -> Self {
        self.blocks.push((index, block));
        self
    }

    /// The final RmsNorm (`output_norm`; Meta: `norm`).
    pub fn output_norm(mut self, norm: &'a RmsNorm) -> Self {
        self.output_norm = Some(norm);
        self
    }

    /// The vocabulary projection (`output`), untied from the embedding.
    pub fn output(mut self, output: &'a Linear) -> Self {
        self.output = Some(output);
        self
    }

    /// Head dim, checked against the other hyper-parameters.
    fn check_hparams(&self) -> Result<usize> {
        let h = &self.hparams;
        let bad = |what: String, fix: &str| Err(Error::config(format!("Llama GGUF: {what}"), fix));
        if h.head_count == 0 || h.head_count_kv == 0 || h.block_count == 0 {
            return bad(
                format!(
                    "head_count {}, head_count_kv {} and block_count {} must all be >= 1",
                    h.head_count, h.head_count_kv, h.block_count
                ),
                "give the model's head and block counts",
            );
        }
        if !h.head_count.is_multiple_of(h.head_count_kv) {
            return bad(
                format!(
                    "head_count_kv {} does not divide head_count {}",
                    h.head_count_kv, h.head_count
                ),
                "use head_count_kv = head_count without grouped-query attention, else a divisor",
            );
        }
        if h.embedding_length == 0 || !h.embedding_length.is_multiple_of(h.head_count) {
            return bad(
                format!(
                    "embedding_length {} is not a positive multiple of head_count {}",
                    h.embedding_length, h.head_count
                ),
                "use embedding_length = head_count x head dim",
            );
        }
        let head_dim = h.embedding_length / h.head_count;
        if !head_dim.is_multiple_of(2) {
            return bad(
                format!("the head dim {head_dim} is odd; rotary embeddings rotate pairs"),
                "use an even head dim",
            );
        }
        if h.context_length == 0 {
            return bad(
                "context_length 0".into(),
                "give the context the model was trained on",
            );
        }
        let eps = h.rms_norm_eps as f32;
        if !eps.is_finite() || eps < 0.0 {
            return bad(
                format!("rms_norm_eps {} is not a finite f32 >= 0", h.rms_norm_eps),
                "give the RmsNorms' epsilon (1e-5 or 1e-6 in Llamas)",
            );
        }
        if !h.rope_freq_base.is_finite() || h.rope_freq_base <= 0.0 {
            return bad(
                format!(
                    "rope_freq_base {} is not a finite value > 0",
                    h.rope_freq_base
                ),
                "give the rotary base the model was trained with (10000 in Llama 2)",
            );
        }
        Ok(head_dim)
    }

    /// The blocks in order, each given once.
    fn ordered_blocks(&self) -> Result<Vec<LlamaBlock<'a>>> {
        let n = self.hparams.block_count;
        let mut given: Vec<(usize, LlamaBlock<'a>)> = self.blocks.clone();
        given.sort_by_key(|(i, _)| *i);
        if let Some(w) = given.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(Error::write(
                format!("Llama GGUF: block {} given twice", w[0].0),
                "give each block once",
            ));
        }
        if let Some((i, _)) = given.iter().find(|(i, _)| *i >= n) {
            return Err(Error::write(
                format!("Llama GGUF: block {i} given but block_count is {n}"),
                "give blocks 0..block_count, or raise block_count",
            ));
        }
        // Sorted, distinct and below n: the first index out of place is the first missing.
        if given.len() < n {
            let i = given
                .iter()
                .enumerate()
                .find(|(k, (i, _))| k != i)
                .map_or(given.len(), |(k, _)| k);
            return Err(Error::write(
                format!("Llama GGUF: block {i} (`blk.{i}.*`) is missing"),
                format!("give it with .block({i}, LlamaBlock {{ .. }})"),
            ));
        }
        Ok(given.into_iter().map(|(_, b)| b).collect())
    }

    /// The metadata, in the order it is written (also checked: a failing check is an
    /// error here).
    pub fn metadata(&self) -> Result<Vec<(String, Value)>> {
        Ok(self.checked()?.0)
    }

    /// Every tensor with its GGUF name, in the order it is written, after every check.
    pub fn tensors(&self) -> Result<Vec<(String, QTensor)>> {
        Ok(self.checked()?.1)
    }

    /// Checks everything, then builds the metadata and the tensors.
    fn checked(&self) -> Result<(Metadata, Tensors)> {
        let head_dim = self.check_hparams()?;
        let h = &self.hparams;
        let e = h.embedding_length;
        let missing = |role: &str, setter: &str| {
            Error::write(
                format!("Llama GGUF: no `{role}` layer was given"),
                format!(
                    "give it with .{setter}(..){}",
                    if role == "output" {
                        " (without it the loader silently ties the output to token_embd)"
                    } else {
                        ""
                    }
                ),
            )
        };
        let embd = self
            .token_embd
            .ok_or_else(|| missing("token_embd", "token_embd"))?;
        let blocks = self.ordered_blocks()?;
        let out_norm = self
            .output_norm
            .ok_or_else(|| missing("output_norm", "output_norm"))?;
        let output = self.output.ok_or_else(|| missing("output", "output"))?;

        let vocab = embd.num_embeddings();
        let embd_role = Role {
            name: "token_embd.weight",
            path: embd.module_path(),
        };
        if embd.dim() != e {
            return Err(embd_role.err(
                format!("has {} values per row, embedding_length is {e}", embd.dim()),
                "build the Embedding with dim = embedding_length",
            ));
        }
        let mut tensors = vec![("token_embd.weight".to_string(), embd.gguf_tensor()?)];
        let norm = |name: String, n: &RmsNorm| -> Result<(String, QTensor)> {
            let role = Role {
                name: &name,
                path: n.module_path(),
            };
            if n.weight().dims() != [e] {
                return Err(role.err(
                    format!("has shape {:?}, ({e},) is needed", n.weight().dims()),
                    "build every RmsNorm over embedding_length features",
                ));
            }
            if n.eps() as f32 != h.rms_norm_eps as f32 {
                return Err(role.err(
                    format!(
                        "has eps {}, the file's rms_norm_eps is {} (one value for every norm)",
                        n.eps(),
                        h.rms_norm_eps
                    ),
                    "build every RmsNorm with the eps given as rms_norm_eps",
                ));
            }
            let t = n.gguf_tensor()?;
            Ok((name, t))
        };
        let linear = |name: String, l: &Linear, rows: usize, cols: usize, why: &str| {
            let role = Role {
                name: &name,
                path: l.module_path(),
            };
            if l.weight().dims() != [rows, cols] {
                return Err(role.err(
                    format!(
                        "has weight shape {:?}, ({rows}, {cols}) is needed ({why})",
                        l.weight().dims()
                    ),
                    "build the layer with the shape its role needs, or fix the hyper-parameters",
                ));
            }
            if l.bias().is_some() {
                return Err(role.err(
                    "has a bias; Llama GGUF files have none (the loader would drop it)",
                    "build Llama Linears with bias = false",
                ));
            }
            let t = l.gguf_tensor()?;
            Ok((name, t))
        };
        let kv = h.head_count_kv * head_dim;
        let ffn = blocks[0].ffn_gate.weight().dims()[0];
        for (i, b) in blocks.iter().enumerate() {
            let p = |r: &str| format!("blk.{i}.{r}.weight");
            tensors.push(norm(p("attn_norm"), b.attn_norm)?);
            tensors.push(linear(
                p("attn_q"),
                b.attn_q,
                e,
                e,
                "embedding_length square",
            )?);
            let kv_why = format!(
                "head_count_kv {} x head dim {head_dim} rows",
                h.head_count_kv
            );
            tensors.push(linear(p("attn_k"), b.attn_k, kv, e, &kv_why)?);
            tensors.push(linear(p("attn_v"), b.attn_v, kv, e, &kv_why)?);
            tensors.push(linear(
                p("attn_output"),
                b.attn_output,
                e,
                e,
                "embedding_length square",
            )?);
            tensors.push(norm(p("ffn_norm"), b.ffn_norm)?);
            let ffn_why = format!("feed-forward length {ffn}, from blk.0.ffn_gate");
            tensors.push(linear(p("ffn_gate"), b.ffn_gate, ffn, e, &ffn_why)?);
            tensors.push(linear(p("ffn_up"), b.ffn_up, ffn, e, &ffn_why)?);
            tensors.push(linear(p("ffn_down"), b.ffn_down, e, ffn, &ffn_why)?);
        }
        tensors.push(norm("output_norm.weight".into(), out_norm)?);
        tensors.push(linear(
            "output.weight".into(),
            output,
            vocab,
            e,
            "token_embd's vocabulary x embedding_length",
        )?);

        let mut meta = vec![(
            "general.architecture".to_string(),
            Value::String("llama".into()),
        )];
        if let Some(name) = &self.name {
            meta.push(("general.name".into(), Value::String(name.clone())));
        }
        for (key, v) in [
            ("llama.context_length", h.context_length),
            ("llama.embedding_length", e),
            ("llama.block_count", h.block_count),
            ("llama.feed_forward_length", ffn),
            ("llama.attention.head_count", h.head_count),
            ("llama.attention.head_count_kv", h.head_count_kv),
            ("llama.rope.dimension_count", head_dim),
            ("llama.vocab_size", vocab),
        ] {
            meta.push((key.into(), u32_of(key, v)?));
        }
        meta.push((
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(h.rms_norm_eps as f32),
        ));
        meta.push(("llama.rope.freq_base".into(), Value::F32(h.rope_freq_base)));
        Ok((meta, tensors))
    }

    /// Writes the GGUF file (version 2, 32-byte alignment, as candle writes it) to `w`,
    /// after checking everything.
    pub fn write_to<W: Write + Seek>(&self, w: &mut W) -> Result<()> {
        let (meta, tensors) = self.checked()?;
        write_checked(w, &meta, &tensors)
    }

    /// Writes the GGUF file to `path` (through a temporary file beside it, renamed when
    /// complete, so a failed write leaves no partial file under `path`).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io_err = |e: std::io::Error| {
            Error::write(
                format!("{}: {e}", path.display()),
                "check that the directory exists and is writable and that the disk has room",
            )
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = std::path::PathBuf::from(tmp);
        let (meta, tensors) = self.checked()?;
        let result = (|| {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io_err)?);
            write_checked(&mut f, &meta, &tensors)?;
            f.into_inner()
                .map_err(|e| io_err(e.into_error()))?
                .sync_all()
                .map_err(io_err)?;
            std::fs::rename(&tmp, path).map_err(io_err)
        })();
        if result.is_err() {
            // Best effort: the error being returned says what went wrong.
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::meta_name;

    #[test]
    fn gguf_names_map_to_meta_llama_modules() {
        for (g, m) in [
            ("token_embd.weight", "tok_embeddings"),
            ("blk.3.attn_norm.weight", "layers.3.attention_norm"),
            ("blk.0.attn_q.weight", "layers.0.attention.wq"),
            ("blk.0.attn_k.weight", "layers.0.attention.wk"),
            ("blk.0.attn_v.weight", "layers.0.attention.wv"),
            ("blk.12.attn_output.weight", "layers.12.attention.wo"),
            ("blk.1.ffn_norm.weight", "layers.1.ffn_norm"),
            ("blk.1.ffn_gate.weight", "layers.1.feed_forward.w1"),
            ("blk.1.ffn_down.weight", "layers.1.feed_forward.w2"),
            ("blk.1.ffn_up.weight", "layers.1.feed_forward.w3"),
            ("output_norm.weight", "norm"),
            ("output.weight", "output"),
        ] {
            assert_eq!(meta_name(g).as_deref(), Some(m), "{g}");
        }
        assert_eq!(meta_name("blk.0.ffn_gate_inp.weight"), None);
        assert_eq!(meta_name("output"), None);
    }
}
