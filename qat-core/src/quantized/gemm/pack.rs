//! The operands in the kernels' layouts: activations as a [`Panel`] of k-groups, weights as
//! a [`PackedWeight`] of zero-padded rows with their sums.

use std::sync::OnceLock;

use super::{KG, P_TILE};

/// A byte buffer aligned to 64 (cache lines), so that tiles of 16 positions load whole
/// lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

#[derive(Clone, Default)]
struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// Resizes to `len` bytes; bytes kept from before stay, new ones are zero.
    fn resize(&mut self, len: usize) {
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
    }

    fn bytes(&self) -> &[u8] {
        assert!(
            self.len <= self.lines.len() * 64,
            "AlignedBytes: length past its lines"
        );
        // SAFETY: `Line` is 64 initialised bytes (repr(C), no padding), so the lines are
        // `lines.len() * 64` contiguous bytes, and `len` is at most that (asserted above;
        // `resize`, the only writer of both, keeps it so).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }

    fn words_mut(&mut self) -> &mut [u32] {
        assert!(
            self.len <= self.lines.len() * 64,
            "AlignedBytes: length past its lines"
        );
        // SAFETY: as `bytes` (`len / 4` words lie inside the `len` bytes, asserted above);
        // the lines are aligned to 64 >= align_of::<u32>(), every bit pattern is a valid
        // u32, and `&mut self` makes the borrow exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u32>(), self.len / 4)
        }
    }
}

/// Activations laid out for the kernels: per k-group, `stride` positions of 4 codes each
/// (one u32 word per position). Positions from `positions` to `stride` are padding: the
/// kernels compute them and the results are dropped.
#[derive(Clone, Default)]
pub(crate) struct Panel {
    buf: AlignedBytes,
    pub(super) positions: usize,
    pub(super) stride: usize,
    pub(super) kgroups: usize,
}

impl Panel {
    /// Resizes for `positions` rows of `row_len` codes. Bytes of an earlier use may remain:
    /// writers fill every k-group of every position below `positions`, the codes past
    /// `row_len` in the last k-group included (with zeros, or codes whose weights are zero).
    pub(crate) fn reset(&mut self, positions: usize, row_len: usize) {
        self.positions = positions;
        self.stride = positions.next_multiple_of(P_TILE) + P_TILE;
        self.kgroups = row_len.div_ceil(KG);
        self.buf.resize(self.kgroups * self.stride * KG);
    }

    /// The words, `kgroups` rows of `stride`: word `g * stride + p` holds
    /// `x[p][4g..4g + 4]` in memory order (`u32::from_ne_bytes`).
    pub(crate) fn words_mut(&mut self) -> &mut [u32] {
        self.buf.words_mut()
    }

    /// Words per k-group row.
    pub(crate) fn stride(&self) -> usize {
        self.stride
    }

    /// Packs `m` rows of `k` codes (row-major `x`), k-group by k-group: the writes run
    /// along a k-group row and the reads revisit the same few cache lines of each input row.
    pub(crate) fn from_rows(x: &[u8], m: usize, k: usize) -> Panel {
        let mut panel = Panel::default();
        panel.reset(m, k);
        let s = panel.stride;
        let words = panel.words_mut();
        for (g, dst) in words.chunks_exact_mut(s).enumerate() {
            let (at, n) = (g * KG, (k - g * KG).min(KG));
            let rows = dst[..m].iter_mut().zip(x.chunks_exact(k));
            if n == KG {
                for (d, row) in rows {
                    let c = &row[at..at + KG];
                    *d = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
            } else {
                for (d, row) in rows {
                    let mut b = [0u8; KG];
                    b[..n].copy_from_slice(&row[at..]);
                    *d = u32::from_ne_bytes(b);
                }
            }
        }
        panel
    }

    pub(super) fn bytes(&self) -> &[u8] {
        self.buf.bytes()
    }
}

/// Weight codes laid out for the kernels, with each row's code sum.
pub(crate) struct PackedWeight {
    pub(crate) rows: usize,
    pub(crate) row_len: usize,
    /// Row stride: `row_len` rounded up to a multiple of 4.
    pub(super) kp: usize,
    /// `(rows, kp)`, zero-padded.
    pub(super) codes: Vec<i8>,
    pub(super) row_sums: Vec<i32>,
    /// The codes widened to i16, for the widening AVX2 kernel (built on first use).
    pub(super) wide: OnceLock<Vec<i16>>,
}

impl PackedWeight {
    pub(crate) fn new(codes: &[i8], rows: usize, row_len: usize) -> Self {
        let kp = row_len.next_multiple_of(KG);
        let mut padded = vec![0i8; rows * kp];
        let mut row_sums = Vec::with_capacity(rows);
        for (dst, src) in padded.chunks_exact_mut(kp).zip(codes.chunks_exact(row_len)) {
            dst[..row_len].copy_from_slice(src);
            row_sums.push(src.iter().map(|&c| c as i32).sum());
        }
        PackedWeight {
            rows,
            row_len,
            kp,
            codes: padded,
            row_sums,
            wide: OnceLock::new(),
        }
    }

    pub(super) fn wide(&self) -> &[i16] {
        self.wide
            .get_or_init(|| self.codes.iter().map(|&c| c as i16).collect())
    }
}
