//! PyTorch's HistogramObserver: a running histogram of everything seen, and an L2 search
//! over it for the range to quantize.
//!
//! This is a port of `torch.ao.quantization.observer.HistogramObserver` (PyTorch 2.15) that
//! reproduces its arithmetic, including the parts PyTorch does inside ATen kernels:
//!
//! * `torch.histc` (CPU): outer edges from `min`/`max` (widened by at least 1 when they are
//!   equal), bin edges from `torch.linspace` (whose CPU kernel is compiled with FMA
//!   contraction: `start + step * i` is one fused multiply-add), and the bin of a value
//!   `(v - lo) * bins / (hi - lo)` in f32, truncated, with the maximum in the last bin.
//! * `torch.sum` over an f32 vector: the cascade sum of ATen's `SumKernel.cpp` (8 f32 lanes,
//!   4 accumulators, 4 levels), so that the float sums compared by the search round the
//!   same way.
//! * `torch.cumsum` (CPU): accumulated in f64, each prefix rounded to f32.
//! * Comparisons of an f32 tensor with a Python float convert the float to f32 first.
//!
//! The quantization-error computation of the search (`_compute_quantization_error`) runs in
//! f32 like PyTorch's tensor code, with the few Python doubles it starts from.

use candle_core::{DType, Tensor};

use super::{tensor_min_max, Observer, ObserverConfig, ObserverState};
use crate::error::{Error, Result};
use crate::host::{par_reduce, with_cpu_f32};
use crate::qparams::{qparams_from_min_max, QParams, QScheme, QuantRange};

/// PyTorch's `upsample_rate`: each old bin is split into this many pieces when the histogram
/// is moved onto a wider range.
const UPSAMPLE_RATE: usize = 16;
/// PyTorch's `dst_nbins = 2 ** torch.iinfo(dtype).bits`: 256 for quint8 and qint8 whatever
/// the quant_min/quant_max or reduce_range.
const DST_NBINS: usize = 256;
/// Step of the quantile bounds in the L2 search.
const SEARCH_STEP: f64 = 1e-5;
/// Largest accepted bin count.
const MAX_BINS: usize = 1 << 20;

/// Records a running histogram of what it sees and, for qparams, searches the histogram for
/// the range `[new_min, new_max]` that minimises the L2 quantization error (an approximation
/// of caffe2's `NormMinimization::NonlinearQuantizationParamsSearch`), then computes scale
/// and zero point from that range like [`MinMaxObserver`](super::MinMaxObserver).
///
/// Per-tensor schemes only, as in PyTorch. When a new input widens the range, the old
/// histogram is upsampled 16 times and its pieces are moved into the new bins by their
/// midpoints; then the new input's histogram is added.
///
/// Results match PyTorch 2.15 on the CPU bit for bit for f32 inputs (min/max, histogram,
/// scale and zero point); other float dtypes are observed after conversion to f32. Counts
/// are exact integers, where PyTorch's f32 counting stops at 2^24 per bin and batch.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qat_core::observer::{HistogramObserver, Observer, ObserverConfig};
/// use qat_core::{QDType, QParams, QScheme};
/// let cfg = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine);
/// let mut obs = HistogramObserver::new(cfg, 2048)?;
/// // 1001 evenly spaced values from -1 to 1.
/// let x: Vec<f32> = (0..=1000).map(|i| i as f32 / 500.0 - 1.0).collect();
/// obs.observe(&Tensor::new(x.as_slice(), &Device::Cpu)?)?;
/// assert_eq!(obs.min_max(), Some((vec![-1.0], vec![1.0])));
/// // PyTorch 2.15 gives the same: scale 0.007839307, zero point 128.
/// let qp = obs.calculate_qparams()?;
/// assert_eq!(qp, QParams::PerTensor { scale: 0.007_839_307, zero_point: 128 });
/// # Ok::<(), qat_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HistogramObserver {
    config: ObserverConfig,
    range: QuantRange,
    bins: usize,
    histogram: Vec<f32>,
    /// `+inf` until the first observation, like PyTorch's buffer.
    min_val: f32,
    /// `-inf` until the first observation.
    max_val: f32,
}

impl HistogramObserver {
    /// PyTorch's default bin count.
    pub const DEFAULT_BINS: usize = 2048;

    /// An observer with `bins` histogram bins (PyTorch's default is
    /// [`DEFAULT_BINS`](Self::DEFAULT_BINS)). The scheme must be per tensor.
    pub fn new(config: ObserverConfig, bins: usize) -> Result<Self> {
        if config.qscheme.is_per_channel() {
            return Err(Error::config(
                format!(
                    "HistogramObserver supports per-tensor schemes only, got {}",
                    config.qscheme
                ),
                "use per_tensor_affine or per_tensor_symmetric, or a per-channel MinMaxObserver",
            ));
        }
        if bins == 0 || bins > MAX_BINS {
            return Err(Error::config(
                format!("HistogramObserver needs 1..={MAX_BINS} bins, got {bins}"),
                "use PyTorch's default of 2048 bins",
            ));
        }
        Ok(HistogramObserver {
            range: config.quant_range()?,
            config,
            bins,
            histogram: vec![0.0; bins],
            min_val: f32::INFINITY,
            max_val: f32::NEG_INFINITY,
        })
    }

    /// The number of bins.
    pub fn bins(&self) -> usize {
        self.bins
    }

    /// The running histogram over `[min_val, max_val]` (all zeros before the first
    /// observation).
    pub fn histogram(&self) -> &[f32] {
        &self.histogram
    }

    fn initialized(&self) -> bool {
        !(self.min_val == f32::INFINITY || self.max_val == f32::NEG_INFINITY)
    }

    /// `torch.histc(x, bins, min, max)` of a tensor, `extrema` being its min and max.
    fn histc_tensor(
        &self,
        x: &Tensor,
        min: f32,
        max: f32,
        extrema: (f32, f32),
    ) -> Result<Vec<f32>> {
        let bins = self.bins;
        let h = |s: &[f32]| histc(s, bins, min, max, extrema);
        if let Some(hist) = with_cpu_f32(x, h) {
            return Ok(hist);
        }
        let v = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(h(&v))
    }

    /// PyTorch's `_combine_histograms`: the current histogram moved onto
    /// `[update_min, update_max]`, plus `update_hist` (already on that range).
    fn combine_histograms(
        &self,
        update_hist: &[f32],
        update_min: f32,
        update_max: f32,
    ) -> Vec<f32> {
        let (orig_min, orig_max) = (self.min_val, self.max_val);
        if update_min == orig_min && update_max == orig_max {
            return add(&self.histogram, update_hist);
        }
        if orig_min == orig_max {
            // A degenerate histogram is one value: bin it in the new range, with all its mass.
            let bin_value = torch_sum(&self.histogram);
            let t = histc(
                &[orig_min],
                self.bins,
                update_min,
                update_max,
                (orig_min, orig_min),
            );
            return t
                .iter()
                .zip(update_hist)
                .map(|(&t, &u)| t * bin_value + u)
                .collect();
        }
        let transformed = self.upscale_histogram(update_min, update_max);
        add(update_hist, &transformed)
    }

    /// PyTorch's `_upscale_histogram`: splits each bin in 16, then sums the pieces into the
    /// bins of `[update_min, update_max]` their midpoints fall in.
    fn upscale_histogram(&self, update_min: f32, update_max: f32) -> Vec<f32> {
        let (orig_min, orig_max) = (self.min_val, self.max_val);
        let bins = self.bins;
        let n = bins * UPSAMPLE_RATE;
        let bin_size = (orig_max - orig_min) / n as f32;
        let half_bin = 0.5f32 * bin_size;
        let mids = Linspace::new(orig_min, orig_max, n + 1);
        let edges = Linspace::new(update_min, update_max, bins + 1);
        let boundaries: Vec<f32> = (0..=bins).map(|i| edges.at(i)).collect();
        let mut out = vec![0.0f32; bins];
        for i in 0..n {
            let mid = mids.at(i) + half_bin;
            let b = upper_bound(&boundaries, mid)
                .saturating_sub(1)
                .min(bins - 1);
            out[b] += self.histogram[i / UPSAMPLE_RATE] / UPSAMPLE_RATE as f32;
        }
        out
    }

    /// PyTorch's `_compute_quantization_error` for quantizing bins `start..=end` to 256 bins.
    fn quantization_error(&self, start: usize, end: usize) -> f64 {
        let bin_width = (self.max_val as f64 - self.min_val as f64) / self.bins as f64;
        let dst_bin_width = bin_width * (end - start + 1) as f64 / DST_NBINS as f64;
        if dst_bin_width == 0.0 {
            return 0.0;
        }
        // Python floats meeting f32 tensors become f32.
        let bw = bin_width as f32;
        let dbw = dst_bin_width as f32;
        let half = (dst_bin_width / 2.0) as f32;
        let neg_half = (-dst_bin_width / 2.0) as f32;
        let last = (DST_NBINS - 1) as f32;
        let cube = |v: f32| v * v * v;
        // _get_norm(tensor(-dbw/2), tensor(dbw/2), .) of a whole destination bin.
        let full_norm = (cube(half) - cube(neg_half)) / 3.0;
        let norms: Vec<f32> = self
            .histogram
            .iter()
            .enumerate()
            .map(|(i, &h)| {
                let density = h / bw;
                let src_begin = (i as i64 - start as i64) as f32 * bw;
                let src_end = src_begin + bw;
                let dst_of_begin = div_floor(src_begin, dbw).max(0.0).min(last);
                let dst_of_begin_center = (dst_of_begin + 0.5) * dbw;
                let dst_of_end = div_floor(src_end, dbw).max(0.0).min(last);
                let mut norm = 0.0f32;
                let delta_begin = src_begin - dst_of_begin_center;
                norm += density * ((cube(half) - cube(delta_begin)) / 3.0);
                norm += (dst_of_end - dst_of_begin - 1.0) * (density * full_norm);
                let dst_of_end_center = dst_of_end * dbw + half;
                let delta_end = src_end - dst_of_end_center;
                norm += density * ((cube(delta_end) - cube(neg_half)) / 3.0);
                norm
            })
            .collect();
        torch_sum(&norms) as f64
    }

    /// PyTorch's `_non_linear_param_search`: the `(new_min, new_max)` of the L2 search.
    fn non_linear_param_search(&self) -> (f32, f32) {
        let bins = self.bins;
        let bin_width = (self.max_val - self.min_val) / bins as f32;
        let total = torch_sum(&self.histogram) as f64;
        let csum = cumsum(&self.histogram);

        let mut alpha = 0.0f64;
        let mut beta = 1.0f64;
        let mut start_bin = 0usize;
        let mut end_bin = bins - 1;
        let mut norm_min = f64::INFINITY;

        while alpha < beta {
            let next_alpha = alpha + SEARCH_STEP;
            let next_beta = beta - SEARCH_STEP;
            // `cSum[l] < next_alpha * total` compares in f32.
            let lo_bound = (next_alpha * total) as f32;
            let hi_bound = (next_beta * total) as f32;
            let mut l = start_bin;
            let mut r = end_bin;
            while l < end_bin && csum[l] < lo_bound {
                l += 1;
            }
            while r > start_bin && csum[r] > hi_bound {
                r -= 1;
            }
            let mut next_start_bin = start_bin;
            let mut next_end_bin = end_bin;
            if l - start_bin > end_bin - r {
                next_start_bin = l;
                alpha = next_alpha;
            } else {
                next_end_bin = r;
                beta = next_beta;
            }
            if next_start_bin == start_bin && next_end_bin == end_bin {
                continue;
            }
            let norm = self.quantization_error(next_start_bin, next_end_bin);
            if norm > norm_min {
                break;
            }
            norm_min = norm;
            start_bin = next_start_bin;
            end_bin = next_end_bin;
        }

        let new_min = self.min_val + bin_width * start_bin as f32;
        let new_max = self.min_val + bin_width * (end_bin + 1) as f32;
        (new_min, new_max)
    }

    fn state_error(&self, what: String) -> Error {
        Error::state(
            what,
            "load a state saved from a HistogramObserver with the same number of bins",
        )
    }
}

impl Observer for HistogramObserver {
    fn name(&self) -> &'static str {
        "HistogramObserver"
    }

    fn observe(&mut self, x: &Tensor) -> Result<()> {
        if x.elem_count() == 0 {
            return Ok(());
        }
        let (x_min, x_max) = tensor_min_max(x, self.name())?;
        if !self.initialized() {
            let hist = self.histc_tensor(x, x_min, x_max, (x_min, x_max))?;
            self.histogram = hist;
            self.min_val = x_min;
            self.max_val = x_max;
            return Ok(());
        }
        let new_min = self.min_val.min(x_min);
        let new_max = self.max_val.max(x_max);
        let update = self.histc_tensor(x, new_min, new_max, (x_min, x_max))?;
        if new_min == self.min_val && new_max == self.max_val {
            for (h, u) in self.histogram.iter_mut().zip(&update) {
                *h += u;
            }
        } else {
            self.histogram = self.combine_histograms(&update, new_min, new_max);
            self.min_val = new_min;
            self.max_val = new_max;
        }
        Ok(())
    }

    fn calculate_qparams(&self) -> Result<QParams> {
        if self.min_val == f32::INFINITY && self.max_val == f32::NEG_INFINITY {
            return Ok(QParams::PerTensor {
                scale: 1.0,
                zero_point: 0,
            });
        }
        if self.histogram.len() != self.bins {
            return Err(self.state_error(format!(
                "the histogram has {} bins, the observer {}",
                self.histogram.len(),
                self.bins
            )));
        }
        let (new_min, new_max) = self.non_linear_param_search();
        if new_min.is_nan() || new_max.is_nan() || new_min > new_max {
            return Err(Error::qparams(
                format!("the searched range [{new_min}, {new_max}] is empty"),
                "reset the observer or load a valid state",
            ));
        }
        let symmetric = self.config.qscheme.is_symmetric();
        let (scale, zero_point) =
            qparams_from_min_max(new_min, new_max, symmetric, &self.range, self.config.eps);
        Ok(QParams::PerTensor { scale, zero_point })
    }

    fn quant_range(&self) -> QuantRange {
        self.range
    }

    fn qscheme(&self) -> QScheme {
        self.config.qscheme
    }

    fn ch_axis(&self) -> Option<usize> {
        None
    }

    fn min_max(&self) -> Option<(Vec<f32>, Vec<f32>)> {
        self.initialized()
            .then(|| (vec![self.min_val], vec![self.max_val]))
    }

    fn state(&self) -> ObserverState {
        let (min_val, max_val) = self.min_max().unwrap_or_default();
        ObserverState {
            min_val,
            max_val,
            histogram: self.histogram.clone(),
        }
    }

    fn load_state(&mut self, state: &ObserverState) -> Result<()> {
        let n = state.min_val.len();
        if n != state.max_val.len() || n > 1 {
            return Err(self.state_error(format!(
                "{} min values and {} max values for a HistogramObserver (0 or 1 each)",
                n,
                state.max_val.len()
            )));
        }
        let hist_ok = state.histogram.len() == self.bins || (n == 0 && state.histogram.is_empty());
        if !hist_ok {
            return Err(self.state_error(format!(
                "the saved histogram has {} bins, this observer has {}",
                state.histogram.len(),
                self.bins
            )));
        }
        if let Some(bad) = state
            .histogram
            .iter()
            .find(|v| !(v.is_finite() && **v >= 0.0))
        {
            return Err(self.state_error(format!(
                "the saved histogram holds {bad}; bins must be finite and non-negative"
            )));
        }
        if n == 1 {
            let (mn, mx) = (state.min_val[0], state.max_val[0]);
            if !(mn.is_finite() && mx.is_finite() && mn <= mx) {
                return Err(self.state_error(format!(
                    "the saved range [{mn}, {mx}] is not a finite range with min <= max"
                )));
            }
            self.min_val = mn;
            self.max_val = mx;
            self.histogram = state.histogram.clone();
        } else {
            self.min_val = f32::INFINITY;
            self.max_val = f32::NEG_INFINITY;
            self.histogram = if state.histogram.is_empty() {
                vec![0.0; self.bins]
            } else {
                state.histogram.clone()
            };
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.min_val = f32::INFINITY;
        self.max_val = f32::NEG_INFINITY;
        self.histogram = vec![0.0; self.bins];
    }

    fn box_clone(&self) -> Box<dyn Observer> {
        Box::new(self.clone())
    }
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(&a, &b)| a + b).collect()
}

/// `torch.linspace(start, end, steps)` in f32 on the CPU: the first half counts up from
/// `start`, the second half down from `end`, each as one fused multiply-add.
struct Linspace {
    start: f32,
    end: f32,
    step: f32,
    steps: usize,
    halfway: usize,
}

impl Linspace {
    fn new(start: f32, end: f32, steps: usize) -> Self {
        let step = if steps > 1 {
            (end - start) / (steps - 1) as f32
        } else {
            0.0
        };
        Linspace {
            start,
            end,
            step,
            steps,
            halfway: steps / 2,
        }
    }

    fn at(&self, i: usize) -> f32 {
        if self.steps == 1 {
            self.start
        } else if i < self.halfway {
            self.step.mul_add(i as f32, self.start)
        } else {
            (-self.step).mul_add((self.steps - i - 1) as f32, self.end)
        }
    }
}

/// The next f32 towards `-f32::MAX` (C's `nexttoward(x, lowest)`).
fn next_toward_lowest(x: f32) -> f32 {
    if x == f32::MIN {
        x
    } else {
        x.next_down()
    }
}

/// The next f32 towards `f32::MAX`.
fn next_toward_max(x: f32) -> f32 {
    if x == f32::MAX {
        x
    } else {
        x.next_up()
    }
}

/// `torch.histc(x, bins, min, max)` of f32 data on the CPU; `extrema` is the data's min and
/// max (histc uses them when `min == max`).
fn histc(x: &[f32], bins: usize, min: f32, max: f32, extrema: (f32, f32)) -> Vec<f32> {
    // histc_select_outer_bin_edges, in f64.
    let (mut lo, mut hi) = (min as f64, max as f64);
    if lo == hi && !x.is_empty() {
        (lo, hi) = (extrema.0 as f64, extrema.1 as f64);
    }
    if lo == hi {
        lo = (next_toward_lowest(lo as f32) as f64).min(lo - 1.0);
        hi = (next_toward_max(hi as f32) as f64).max(hi + 1.0);
    }
    // The first and last of linspace(lo, hi, bins + 1) in f32.
    let edges = Linspace::new(lo as f32, hi as f32, bins + 1);
    let left = edges.at(0);
    let right = edges.at(bins);
    let width = right - left;
    let nb = bins as f32;
    let count = |chunk: &[f32]| {
        let mut counts = vec![0u64; bins];
        for &v in chunk {
            if !(v >= left && v <= right) {
                continue;
            }
            // Truncation as C++'s static_cast<int64_t>; the maximum goes to the last bin.
            let pos = ((v - left) * nb / width) as usize;
            counts[pos.min(bins - 1)] += 1;
        }
        counts
    };
    let merge = |mut a: Vec<u64>, b: Vec<u64>| {
        for (a, b) in a.iter_mut().zip(b) {
            *a += b;
        }
        a
    };
    par_reduce(x, count, merge)
        .into_iter()
        .map(|c| c as f32)
        .collect()
}

/// `std::upper_bound` as ATen's bucketize does it: the first index whose value is greater
/// than `v`.
fn upper_bound(sorted: &[f32], v: f32) -> usize {
    let (mut start, mut end) = (0usize, sorted.len());
    while start < end {
        let mid = start + (end - start) / 2;
        // `!(mid > v)` in C++: NaN compares like "not greater".
        if sorted[mid] > v {
            end = mid;
        } else {
            start = mid + 1;
        }
    }
    start
}

/// `torch.div(a, b, rounding_mode="floor")` for f32 (`c10::div_floor_floating`).
fn div_floor(a: f32, b: f32) -> f32 {
    if b == 0.0 {
        return a / b;
    }
    let m = a % b;
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let mut floordiv = div.floor();
        if div - floordiv > 0.5 {
            floordiv += 1.0;
        }
        floordiv
    } else {
        0.0f32.copysign(a / b)
    }
}

/// `torch.cumsum` of an f32 vector on the CPU: accumulated in f64, each prefix rounded.
fn cumsum(x: &[f32]) -> Vec<f32> {
    let mut acc = 0.0f64;
    x.iter()
        .map(|&v| {
            acc += v as f64;
            acc as f32
        })
        .collect()
}

/// Lanes of ATen's vectorised f32 sum.
const SUM_LANES: usize = 8;
/// Independent accumulators (ATen's `ilp_factor`).
const SUM_ILP: usize = 4;
/// Levels of the cascade.
const SUM_LEVELS: usize = 4;

fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// ATen's `multi_row_sum` with `nrows = 4`: `size` rows whose `k`-th column is the group of
/// `L` lanes at `data[(row * 4 + k) * L..]`.
fn multi_row_sum<const L: usize>(data: &[f32], size: usize) -> [[f32; L]; SUM_ILP] {
    let level_power = 4.max(ceil_log2(size) / SUM_LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; L]; SUM_ILP]; SUM_LEVELS];
    let add_row = |acc0: &mut [[f32; L]; SUM_ILP], i: usize| {
        for (k, a) in acc0.iter_mut().enumerate() {
            let base = (i * SUM_ILP + k) * L;
            for (lane, a) in a.iter_mut().enumerate() {
                *a += data[base + lane];
            }
        }
    };
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            add_row(&mut acc[0], i);
            i += 1;
        }
        for j in 1..SUM_LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            let from = lower[j - 1].iter_mut().flatten();
            for (to, from) in upper[0].iter_mut().flatten().zip(from) {
                *to += *from;
                *from = 0.0;
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size {
        add_row(&mut acc[0], i);
        i += 1;
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (to, from) in first[0].iter_mut().flatten().zip(level.iter().flatten()) {
            *to += *from;
        }
    }
    first[0]
}

/// ATen's `row_sum` over `n` groups of `L` lanes.
fn row_sum<const L: usize>(data: &[f32], n: usize) -> [f32; L] {
    let size_ilp = n / SUM_ILP;
    let mut partial = multi_row_sum::<L>(data, size_ilp);
    let (first, rest) = partial.split_at_mut(1);
    for group in data[size_ilp * SUM_ILP * L..n * L].chunks_exact(L) {
        for (to, from) in first[0].iter_mut().zip(group) {
            *to += *from;
        }
    }
    for other in rest.iter() {
        for (to, from) in first[0].iter_mut().zip(other) {
            *to += *from;
        }
    }
    first[0]
}

/// `torch.sum` of a contiguous f32 vector on the CPU (ATen's `cascade_sum`), bit for bit.
fn torch_sum(x: &[f32]) -> f32 {
    if x.len() < SUM_LANES {
        return row_sum::<1>(x, x.len())[0];
    }
    let vecs = x.len() / SUM_LANES;
    let lanes = row_sum::<SUM_LANES>(x, vecs);
    let mut total = 0.0f32;
    for &v in &x[vecs * SUM_LANES..] {
        total += v;
    }
    for v in lanes {
        total += v;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qparams::QDType;
    use candle_core::Device;

    fn cfg() -> ObserverConfig {
        ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorAffine)
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn per_channel_and_bad_bins_are_config_errors() {
        let pc = ObserverConfig::new(QDType::QINT8, QScheme::PerChannelSymmetric);
        assert!(matches!(
            HistogramObserver::new(pc, 2048),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            HistogramObserver::new(cfg(), 0),
            Err(Error::Config { .. })
        ));
        assert!(matches!(
            HistogramObserver::new(cfg(), MAX_BINS + 1),
            Err(Error::Config { .. })
        ));
        let bad = ObserverConfig::new(QDType::QUINT8, QScheme::PerTensorSymmetric)
            .with_reduce_range(true);
        assert!(matches!(
            HistogramObserver::new(bad, 64),
            Err(Error::Config { .. })
        ));
        assert!(HistogramObserver::new(cfg(), 1).is_ok());
    }

    #[test]
    fn non_finite_input_is_rejected_and_state_kept() {
        let mut o = HistogramObserver::new(cfg(), 16).unwrap();
        o.observe(&t(&[0.0, 1.0, 2.0])).unwrap();
        let before = o.state();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = o.observe(&t(&[5.0, bad])).unwrap_err();
            assert!(matches!(err, Error::ObserverInput { .. }));
            assert!(err.to_string().contains("HistogramObserver"), "{err}");
            assert_eq!(o.state(), before);
        }
    }

    #[test]
    fn integer_input_is_rejected() {
        let mut o = HistogramObserver::new(cfg(), 16).unwrap();
        let x = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        assert!(matches!(o.observe(&x), Err(Error::ObserverInput { .. })));
        assert_eq!(o.min_max(), None);
    }

    #[test]
    fn empty_input_changes_nothing() {
        let mut o = HistogramObserver::new(cfg(), 16).unwrap();
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        o.observe(&empty).unwrap();
        assert_eq!(o.min_max(), None);
        assert_eq!(
            o.calculate_qparams().unwrap(),
            QParams::PerTensor {
                scale: 1.0,
                zero_point: 0
            }
        );
        o.observe(&t(&[1.0, 3.0])).unwrap();
        let before = o.state();
        o.observe(&empty).unwrap();
        assert_eq!(o.state(), before);
    }

    #[test]
    fn state_round_trip_and_bad_states() {
        let mut o = HistogramObserver::new(cfg(), 8).unwrap();
        o.observe(&t(&[-1.0, 0.5, 3.0, 2.0])).unwrap();
        let s = o.state();
        assert_eq!(
            (s.min_val.clone(), s.max_val.clone()),
            (vec![-1.0], vec![3.0])
        );
        assert_eq!(s.histogram.iter().sum::<f32>(), 4.0);
        let mut p = HistogramObserver::new(cfg(), 8).unwrap();
        p.load_state(&s).unwrap();
        assert_eq!(p.state(), s);
        assert_eq!(
            p.calculate_qparams().unwrap(),
            o.calculate_qparams().unwrap()
        );

        let mut short = s.clone();
        short.histogram.pop();
        assert!(matches!(p.load_state(&short), Err(Error::State { .. })));
        let mut two = s.clone();
        two.min_val.push(0.0);
        two.max_val.push(1.0);
        assert!(matches!(p.load_state(&two), Err(Error::State { .. })));
        let mut lopsided = s.clone();
        lopsided.max_val.clear();
        assert!(matches!(p.load_state(&lopsided), Err(Error::State { .. })));
        let mut inverted = s.clone();
        inverted.min_val = vec![4.0];
        assert!(matches!(p.load_state(&inverted), Err(Error::State { .. })));
        let mut nan = s.clone();
        nan.histogram[0] = f32::NAN;
        assert!(matches!(p.load_state(&nan), Err(Error::State { .. })));
        // Failed loads leave the state alone.
        assert_eq!(p.state(), s);

        p.load_state(&ObserverState::default()).unwrap();
        assert_eq!(p.min_max(), None);
        assert_eq!(p.histogram(), &[0.0; 8]);
        p.observe(&t(&[2.0])).unwrap();
        p.reset();
        assert_eq!(p.min_max(), None);
        assert_eq!(p.histogram(), &[0.0; 8]);
    }

    #[test]
    fn histc_matches_torch_edges() {
        // torch.histc(tensor([0., 1., 2., 3., 4.]), bins=4, min=0, max=4) == [1, 1, 1, 2]
        let x = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(histc(&x, 4, 0.0, 4.0, (0.0, 4.0)), vec![1.0, 1.0, 1.0, 2.0]);
        // min == max: widened to [v - 1, v + 1], the value lands in the middle bin.
        assert_eq!(histc(&[3.5; 7], 10, 3.5, 3.5, (3.5, 3.5))[5], 7.0);
        // Values outside [min, max] are not counted.
        assert_eq!(
            histc(&[-1.0, 0.5, 9.0], 2, 0.0, 1.0, (-1.0, 9.0)),
            vec![0.0, 1.0]
        );
    }

    #[test]
    fn torch_sum_orders_like_aten() {
        // torch.tensor(x).sum() with x[i] = v * v * v, v = f32(i) * f32(0.1), in f32.
        let cubes = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let v = i as f32 * 0.1f32;
                    v * v * v
                })
                .collect()
        };
        let x = cubes(100);
        assert_eq!(torch_sum(&x), 24_502.502);
        assert_ne!(x.iter().fold(0.0f32, |a, &b| a + b), 24_502.502);
        assert_eq!(torch_sum(&cubes(2048)), 4393752576.0);
        assert_eq!(torch_sum(&cubes(37)), 443.556_03);
        assert_eq!(torch_sum(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(torch_sum(&[]), 0.0);
    }

    #[test]
    fn div_floor_is_python_floor_division() {
        assert_eq!(div_floor(7.0, 2.0), 3.0);
        assert_eq!(div_floor(-7.0, 2.0), -4.0);
        assert_eq!(div_floor(-0.0, 2.0), -0.0);
        assert_eq!(div_floor(6.0, 2.0), 3.0);
    }

    #[test]
    fn constant_input_gives_min_max_qparams() {
        let mut o = HistogramObserver::new(cfg(), 2048).unwrap();
        o.observe(&t(&[0.0; 10])).unwrap();
        assert_eq!(o.histogram()[1024], 10.0);
        assert_eq!(
            o.calculate_qparams().unwrap(),
            QParams::PerTensor {
                scale: f32::EPSILON,
                zero_point: 0
            }
        );
    }
}
