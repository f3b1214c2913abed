//! The safetensors side of checkpoints: entries to write, a format tag and a content
//! checksum in the metadata, and a reader that refuses files of another format or version
//! and files whose bytes no longer match their checksum.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

pub(super) const FORMAT_KEY: &str = "format";
pub(super) const STRUCTURE_KEY: &str = "structure";
const CHECKSUM_KEY: &str = "checksum";

/// A checkpoint format: its current tag and the older tags it replaced.
pub(super) struct Format {
    pub tag: &'static str,
    pub old: &'static [&'static str],
    /// What files of this format hold, for messages.
    pub what: &'static str,
    /// The function that writes it.
    pub saver: &'static str,
    /// Why older files cannot be read.
    pub why_old: &'static str,
}

/// An owned tensor to write.
pub(super) struct Entry {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Entry {
    pub fn f32(v: &[f32], shape: &[usize]) -> Self {
        Entry {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn i32(v: &[i32], shape: &[usize]) -> Self {
        Entry {
            dtype: Dtype::I32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn i8(v: &[i8], shape: &[usize]) -> Self {
        Entry {
            dtype: Dtype::I8,
            shape: shape.to_vec(),
            bytes: v.iter().map(|&x| x as u8).collect(),
        }
    }
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::state(
        format!("{}: {e}", path.display()),
        "check the file is a complete safetensors file written by candle-qat",
    )
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::write(
        format!("{}: {e}", path.display()),
        "check that the directory exists and is writable and that the disk has room",
    )
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn tensor(&mut self, name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) {
        self.write(name.as_bytes());
        self.write(&[0xff]);
        self.write(format!("{dtype:?}").as_bytes());
        self.write(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            self.write(&(d as u64).to_le_bytes());
        }
        self.write(&(data.len() as u64).to_le_bytes());
        self.write(data);
    }
    fn metadata(&mut self, meta: &HashMap<String, String>) {
        let mut keys: Vec<_> = meta.keys().filter(|k| *k != CHECKSUM_KEY).collect();
        keys.sort();
        for k in keys {
            self.write(k.as_bytes());
            self.write(&[0xff]);
            self.write(meta[k].as_bytes());
            self.write(&[0xff]);
        }
    }
    fn hex(&self) -> String {
        format!("fnv1a64:{:016x}", self.0)
    }
}

/// Writes `entries` with `meta`, the format tag and a checksum over every tensor (name,
/// dtype, shape, bytes, in name order) and every metadata entry.
pub(super) fn write(
    path: &Path,
    format: &Format,
    mut entries: Vec<(String, Entry)>,
    mut meta: HashMap<String, String>,
) -> Result<()> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(w) = entries.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::write(
            format!(
                "{}: two tensors would be saved as `{}`",
                path.display(),
                w[0].0
            ),
            "give the model's layers distinct paths (report this if they are distinct)",
        ));
    }
    meta.insert(FORMAT_KEY.into(), format.tag.into());
    let mut h = Fnv::new();
    for (k, e) in &entries {
        h.tensor(k, e.dtype, &e.shape, &e.bytes);
    }
    h.metadata(&meta);
    meta.insert(CHECKSUM_KEY.into(), h.hex());
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(k, e)| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (k.clone(), v))
                .map_err(|err| write_err(path, err))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| write_err(path, e))
}

/// The bytes of a checkpoint file.
pub(super) fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| read_err(path, e))
}

/// A checkpoint read into memory, its format and checksum verified.
pub(super) struct Reader<'a> {
    path: &'a Path,
    st: SafeTensors<'a>,
    meta: HashMap<String, String>,
}

impl<'a> Reader<'a> {
    pub fn open(path: &'a Path, bytes: &'a [u8], format: &Format) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| read_err(path, e))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let found = meta.get(FORMAT_KEY).cloned();
        if found.as_deref() != Some(format.tag) {
            if let Some(old) = found.as_deref().filter(|f| format.old.contains(f)) {
                return Err(Error::state(
                    format!(
                        "{} is a {old} file, written by an earlier candle-qat; {}",
                        path.display(),
                        format.why_old
                    ),
                    format!(
                        "save the model again with this version ({}) to get a {} file",
                        format.saver, format.tag
                    ),
                ));
            }
            return Err(Error::state(
                format!(
                    "{} holds {:?}, not a {} checkpoint ({})",
                    path.display(),
                    found.unwrap_or_else(|| "no candle-qat format tag".into()),
                    format.tag,
                    format.what
                ),
                "load QAT checkpoints with load_qat_checkpoint and int8 models with load_int8",
            ));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| read_err(path, e))?;
        let mut names = st.names();
        names.sort();
        let mut h = Fnv::new();
        for name in names {
            let t = st.tensor(name).map_err(|e| read_err(path, e))?;
            h.tensor(name, t.dtype(), t.shape(), t.data());
        }
        h.metadata(&meta);
        let stored = meta.get(CHECKSUM_KEY).map(String::as_str);
        if stored != Some(h.hex().as_str()) {
            return Err(Error::state(
                format!(
                    "{}: the content does not match its checksum ({} stored, {} computed): \
                     the file was changed or damaged after it was written",
                    path.display(),
                    stored.unwrap_or("none"),
                    h.hex()
                ),
                "restore the file from a good copy, or save the model again",
            ));
        }
        Ok(Reader { path, st, meta })
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.meta.get(key).map(String::as_str).ok_or_else(|| {
            Error::state(
                format!("{} has no `{key}` metadata", self.path.display()),
                "load a checkpoint written by candle-qat",
            )
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.st.tensor(key).is_ok()
    }

    fn get(&self, key: &str, dtype: Dtype) -> Result<(Vec<usize>, &'a [u8])> {
        let t = self.st.tensor(key).map_err(|_| {
            Error::state(
                format!("{} has no entry `{key}`", self.path.display()),
                "load a checkpoint written by candle-qat",
            )
        })?;
        if t.dtype() != dtype {
            return Err(Error::state(
                format!("`{key}` is {:?}, expected {dtype:?}", t.dtype()),
                "load a checkpoint written by candle-qat",
            ));
        }
        Ok((t.shape().to_vec(), t.data()))
    }

    /// An `F32` entry: its shape and values.
    pub fn f32s(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, b) = self.get(key, Dtype::F32)?;
        let v = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((shape, v))
    }

    /// An `I32` entry: its shape and values.
    pub fn i32s(&self, key: &str) -> Result<(Vec<usize>, Vec<i32>)> {
        let (shape, b) = self.get(key, Dtype::I32)?;
        let v = b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((shape, v))
    }

    /// An `I8` entry: its shape and values.
    pub fn i8s(&self, key: &str) -> Result<(Vec<usize>, Vec<i8>)> {
        let (shape, b) = self.get(key, Dtype::I8)?;
        Ok((shape, b.iter().map(|&x| x as i8).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::Fnv;

    /// The published FNV-1a 64 test vectors.
    #[test]
    fn fnv1a64_matches_reference_vectors() {
        for (input, want) in [
            ("", 0xcbf2_9ce4_8422_2325u64),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ] {
            let mut h = Fnv::new();
            h.write(input.as_bytes());
            assert_eq!(h.0, want, "{input:?}");
        }
    }
}
