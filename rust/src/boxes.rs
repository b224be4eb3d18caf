//! Box formats, IoU, generalised IoU and class-aware NMS, for `f32` and `f64`.
//!
//! Formats: `xyxy` (x1, y1, x2, y2), `cxcywh` (centre, width, height), `xywh` (top-left,
//! width, height). IoU code works on `xyxy`. Zero-area boxes give IoU 0 (never NaN); a pair
//! whose enclosing box has zero area has GIoU equal to its IoU (0).
//!
//! Range: any finite coordinates. Areas of boxes with coordinates beyond
//! [`Float::FAST_EXTENT`] (2^60 for f32, 2^500 for f64) would overflow the input precision,
//! and those of boxes with non-zero coordinates below [`Float::FAST_TINY`] could underflow
//! (identical tiny boxes would get IoU 0); calls with such boxes (one range check per call,
//! during validation) use [`iou_giou_wide`], which scales each axis to the pair's enclosing
//! box in f64, instead of the fast kernels. Results are never NaN for finite input.
//!
//! Every buffer sized by the input is allocated fallibly ([`crate::alloc`]): a result too
//! large for memory is [`KaError::OutOfMemory`], one whose size overflows is
//! [`KaError::InvalidArgument`].

use crate::alloc::{self, collapse_broadcast, collapse_broadcast_rows, Zeroable};
use crate::error::{KaError, KaResult};
use crate::pool;
use ndarray::{Array2, ArrayView1, ArrayView2};
use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};
use std::str::FromStr;

/// The float types the box code works on (`f32`, `f64`).
pub trait Float:
    Copy
    + Send
    + Sync
    + Debug
    + Default
    + PartialOrd
    + Zeroable
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const HALF: Self;
    const INFINITY: Self;
    /// numpy's name of the type, for messages.
    const NAME: &'static str;
    /// Largest coordinate magnitude for which the fast kernels cannot overflow: with
    /// |x| <= E every width is <= 2E, every area and the enclosing area <= 4E², a union
    /// <= 8E², and 12E² stays below the type's maximum.
    const FAST_EXTENT: f64;
    /// Smallest non-zero coordinate magnitude for which the fast kernels cannot underflow:
    /// distinct values of magnitude >= t differ by at least ulp(t) ~ t·2^-(mantissa bits), so
    /// every non-zero width and area stays a normal number.
    const FAST_TINY: f64;
    /// An area below this (or a non-finite one) sends a single pair through the wide kernel
    /// in [`iou_xyxy`] / [`giou_xyxy`]: below it precision is lost to underflow.
    const TINY_AREA: Self;
    fn is_finite(self) -> bool;
    fn abs(self) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $name:expr, $extent:expr, $tiny:expr, $tiny_area:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const HALF: Self = 0.5;
            const INFINITY: Self = <$t>::INFINITY;
            const NAME: &'static str = $name;
            const FAST_EXTENT: f64 = $extent;
            const FAST_TINY: f64 = $tiny;
            const TINY_AREA: Self = $tiny_area;
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
        }
    };
}
// Overflow: f32 12 * 2^120 < 2^128, f64 12 * 2^1000 < 2^1024. Underflow: f32 widths
// >= 2^-40 * 2^-23, areas >= 2^-126 (normal); f64 widths >= 2^-450 * 2^-52, areas >= 2^-1004.
impl_float!(
    f32,
    "float32",
    f64::from_bits((1023 + 60) << 52), // 2^60
    f64::from_bits((1023 - 40) << 52), // 2^-40
    f32::from_bits((127 - 100) << 23)  // 2^-100
);
impl_float!(
    f64,
    "float64",
    f64::from_bits((1023 + 500) << 52),  // 2^500
    f64::from_bits((1023 - 450) << 52),  // 2^-450
    f64::from_bits((1023 - 1000) << 52)  // 2^-1000
);

/// Branch-free max/min (no NaN handling; inputs are validated finite). Vectorises.
#[inline(always)]
fn fmax<T: Float>(a: T, b: T) -> T {
    if a > b {
        a
    } else {
        b
    }
}
#[inline(always)]
fn fmin<T: Float>(a: T, b: T) -> T {
    if a < b {
        a
    } else {
        b
    }
}

/// A box coordinate format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BoxFormat {
    /// (x1, y1, x2, y2)
    Xyxy,
    /// (cx, cy, w, h)
    Cxcywh,
    /// (x1, y1, w, h)
    Xywh,
}

impl BoxFormat {
    /// Name as used by the Python API.
    pub fn name(self) -> &'static str {
        match self {
            BoxFormat::Xyxy => "xyxy",
            BoxFormat::Cxcywh => "cxcywh",
            BoxFormat::Xywh => "xywh",
        }
    }

    /// Parse a format name; errors name `arg`.
    pub fn parse(s: &str, arg: &str) -> KaResult<Self> {
        match s {
            "xyxy" => Ok(BoxFormat::Xyxy),
            "cxcywh" => Ok(BoxFormat::Cxcywh),
            "xywh" => Ok(BoxFormat::Xywh),
            _ => Err(KaError::invalid(
                arg,
                format!("unknown box format {s:?}; expected 'xyxy', 'cxcywh' or 'xywh'"),
            )),
        }
    }
}

impl FromStr for BoxFormat {
    type Err = KaError;
    fn from_str(s: &str) -> KaResult<Self> {
        BoxFormat::parse(s, "format")
    }
}

/// Convert one box between formats.
#[inline]
pub fn convert_box<T: Float>(b: [T; 4], from: BoxFormat, to: BoxFormat) -> [T; 4] {
    if from == to {
        return b;
    }
    // to xyxy
    let [x1, y1, x2, y2] = match from {
        BoxFormat::Xyxy => b,
        BoxFormat::Cxcywh => {
            let (hw, hh) = (T::HALF * b[2], T::HALF * b[3]);
            [b[0] - hw, b[1] - hh, b[0] + hw, b[1] + hh]
        }
        BoxFormat::Xywh => [b[0], b[1], b[0] + b[2], b[1] + b[3]],
    };
    match to {
        BoxFormat::Xyxy => [x1, y1, x2, y2],
        // halves added, not the sum halved: the same value (halving is exact), and no overflow
        BoxFormat::Cxcywh => [
            T::HALF * x1 + T::HALF * x2,
            T::HALF * y1 + T::HALF * y2,
            x2 - x1,
            y2 - y1,
        ],
        BoxFormat::Xywh => [x1, y1, x2 - x1, y2 - y1],
    }
}

fn row4<T: Float>(a: &ArrayView2<T>, i: usize) -> [T; 4] {
    [a[[i, 0]], a[[i, 1]], a[[i, 2]], a[[i, 3]]]
}

/// Check an (N, 4) array: 4 columns and finite values. Errors name `arg`. A broadcast
/// (zero-stride) input is checked once per distinct element.
pub fn check_n4<T: Float>(a: &ArrayView2<T>, arg: &str) -> KaResult<()> {
    scan(a, arg, false).map(|_| ())
}

/// Check (N, 4) `xyxy` boxes: shape, finiteness and x2 ≥ x1, y2 ≥ y1. Errors name `arg`.
pub fn check_xyxy<T: Float>(a: &ArrayView2<T>, arg: &str) -> KaResult<()> {
    scan(a, arg, true).map(|_| ())
}

/// The magnitudes of a set of coordinates: the largest, and the smallest non-zero one.
#[derive(Clone, Copy, Debug)]
struct Range {
    max: f64,
    min_nonzero: f64,
}

impl Range {
    /// True when the fast (input-precision) kernels can neither overflow nor underflow.
    fn fast<T: Float>(self) -> bool {
        self.max <= T::FAST_EXTENT && self.min_nonzero >= T::FAST_TINY
    }

    fn union(self, o: Range) -> Range {
        Range {
            max: self.max.max(o.max),
            min_nonzero: self.min_nonzero.min(o.min_nonzero),
        }
    }
}

/// One pass over the distinct rows of an (N, 4) array (a broadcast input is read once per
/// distinct row): the shape, finite values, with `xyxy` x2 ≥ x1 and y2 ≥ y1 too, and the
/// range of the coordinates (see [`Range::fast`]). A non-finite value anywhere is reported
/// before an inverted box. Errors name `arg`.
fn scan<T: Float>(a: &ArrayView2<T>, arg: &str, xyxy: bool) -> KaResult<Range> {
    if a.ncols() != 4 {
        return Err(KaError::invalid(
            arg,
            format!("expected shape (N, 4), got ({}, {})", a.nrows(), a.ncols()),
        ));
    }
    let distinct = collapse_broadcast_rows(a.view());
    let (mut max, mut min_nonzero) = (T::ZERO, T::INFINITY);
    let mut inverted: Option<(usize, [T; 4])> = None;
    let mut visit = |i: usize, r: [T; 4]| -> bool {
        if !(r[0].is_finite() && r[1].is_finite() && r[2].is_finite() && r[3].is_finite()) {
            return false;
        }
        if xyxy && (r[2] < r[0] || r[3] < r[1]) && inverted.is_none() {
            inverted = Some((i, r));
        }
        for v in r {
            let m = v.abs();
            max = fmax(max, m);
            min_nonzero = if m > T::ZERO {
                fmin(min_nonzero, m)
            } else {
                min_nonzero
            };
        }
        true
    };
    let nonfinite = match distinct.as_slice() {
        Some(s) => s
            .chunks_exact(4)
            .enumerate()
            .position(|(i, r)| !visit(i, [r[0], r[1], r[2], r[3]])),
        None => (0..distinct.nrows()).position(|i| !visit(i, row4(&distinct, i))),
    };
    if let Some(i) = nonfinite {
        return Err(KaError::invalid(
            arg,
            format!("box {i} has a non-finite coordinate"),
        ));
    }
    if let Some((i, [x1, y1, x2, y2])) = inverted {
        return Err(KaError::invalid(
            arg,
            format!(
                "box {i} is inverted (x2 < x1 or y2 < y1): [{:?}, {:?}, {:?}, {:?}]",
                x1, y1, x2, y2
            ),
        ));
    }
    Ok(Range {
        max: max.to_f64(),
        min_nonzero: min_nonzero.to_f64(),
    })
}

/// Convert (N, 4) boxes between formats (validated: shape, finite). Errors name `boxes`,
/// including for a finite box whose converted coordinates overflow the dtype (e.g. a width
/// `x2 - x1` beyond float32's range): never an infinite result for finite input.
pub fn convert<T: Float>(
    boxes: ArrayView2<T>,
    from: BoxFormat,
    to: BoxFormat,
) -> KaResult<Array2<T>> {
    check_n4(&boxes, "boxes")?;
    let n = boxes.nrows();
    let len = alloc::checked_len::<T>(&[n, 4], "boxes", "the converted boxes")?;
    let mut out = alloc::try_with_capacity(len, "boxes", "the converted boxes")?;
    for i in 0..n {
        out.extend_from_slice(&convert_box(row4(&boxes, i), from, to));
    }
    // a finite box converts to a finite box unless a coordinate overflows (rare): one
    // branch-free pass, the position only on failure
    if !out.iter().fold(true, |ok, v| ok & v.is_finite()) {
        let k = out.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(KaError::invalid(
            "boxes",
            format!(
                "box {} cannot be converted from {} to {}: a coordinate overflows {}",
                k / 4,
                from.name(),
                to.name(),
                T::NAME
            ),
        ));
    }
    Array2::from_shape_vec((n, 4), out).map_err(|e| KaError::invalid("boxes", e.to_string()))
}

#[inline(always)]
fn area<T: Float>(b: &[T; 4]) -> T {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// IoU and GIoU of two `xyxy` boxes with any finite coordinates, in f64 and without overflow.
///
/// IoU and GIoU are ratios of areas, so they do not change when the x axis and the y axis are
/// scaled (separately) by positive factors. Every length is divided by the pair's enclosing
/// width or height, so all lengths are in [0, 1], the enclosing area is 1 and no product can
/// overflow; coordinates are halved first when a difference could overflow. Tiny boxes keep
/// their precision too (the ratios are of lengths, not of underflowing areas). A zero-area
/// enclosing box means zero-area boxes: (0, 0), as in the fast kernels.
pub fn iou_giou_wide(a: [f64; 4], b: [f64; 4]) -> (f64, f64) {
    // halve only when a difference could overflow (halving loses the last bit of subnormals)
    let huge = a.iter().chain(&b).any(|v| v.abs() > f64::MAX / 4.0);
    let s = if huge { 0.5 } else { 1.0 };
    let h = |x: f64| s * x;
    let cw = h(a[2].max(b[2])) - h(a[0].min(b[0]));
    let ch = h(a[3].max(b[3])) - h(a[1].min(b[1]));
    if !(cw > 0.0 && ch > 0.0) {
        return (0.0, 0.0);
    }
    let aw = (h(a[2]) - h(a[0])) / cw;
    let ah = (h(a[3]) - h(a[1])) / ch;
    let bw = (h(b[2]) - h(b[0])) / cw;
    let bh = (h(b[3]) - h(b[1])) / ch;
    let iw = ((h(a[2].min(b[2])) - h(a[0].max(b[0]))) / cw).max(0.0);
    let ih = ((h(a[3].min(b[3])) - h(a[1].max(b[1]))) / ch).max(0.0);
    let inter = iw * ih;
    let union = aw * ah + bw * bh - inter;
    let iou = if union > 0.0 { inter / union } else { 0.0 };
    (iou, iou - (1.0 - union))
}

fn wide<T: Float>(b: &[T; 4]) -> [f64; 4] {
    [b[0].to_f64(), b[1].to_f64(), b[2].to_f64(), b[3].to_f64()]
}

/// IoU of two `xyxy` boxes; 0 when the union has zero area. Never NaN for finite input:
/// a pair whose areas overflow `T`, or are so small that they lose precision (below
/// [`Float::TINY_AREA`]), is computed by [`iou_giou_wide`].
#[inline]
pub fn iou_xyxy<T: Float>(a: &[T; 4], b: &[T; 4]) -> T {
    let iw = fmax(fmin(a[2], b[2]) - fmax(a[0], b[0]), T::ZERO);
    let ih = fmax(fmin(a[3], b[3]) - fmax(a[1], b[1]), T::ZERO);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if !(union.is_finite() && union >= T::TINY_AREA) {
        return T::from_f64(iou_giou_wide(wide(a), wide(b)).0);
    }
    if union > T::ZERO {
        inter / union
    } else {
        T::ZERO
    }
}

/// Generalised IoU of two `xyxy` boxes: IoU − (C − U)/C with C the enclosing box's area;
/// equals the IoU when C has zero area. Never NaN for finite input (see [`iou_xyxy`]).
#[inline]
pub fn giou_xyxy<T: Float>(a: &[T; 4], b: &[T; 4]) -> T {
    let iw = fmax(fmin(a[2], b[2]) - fmax(a[0], b[0]), T::ZERO);
    let ih = fmax(fmin(a[3], b[3]) - fmax(a[1], b[1]), T::ZERO);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let cw = fmax(a[2], b[2]) - fmin(a[0], b[0]);
    let ch = fmax(a[3], b[3]) - fmin(a[1], b[1]);
    let c = cw * ch;
    if !(union.is_finite() && c.is_finite() && union >= T::TINY_AREA) {
        return T::from_f64(iou_giou_wide(wide(a), wide(b)).1);
    }
    let iou = if union > T::ZERO {
        inter / union
    } else {
        T::ZERO
    };
    if c > T::ZERO {
        iou - (c - union) / c
    } else {
        iou
    }
}

/// Structure-of-arrays copy of `xyxy` boxes plus their areas, for vectorised inner loops.
pub(crate) struct Soa<T> {
    pub x1: Vec<T>,
    pub y1: Vec<T>,
    pub x2: Vec<T>,
    pub y2: Vec<T>,
    pub area: Vec<T>,
}

impl<T: Float> Soa<T> {
    fn from_view(b: &ArrayView2<T>, arg: &str) -> KaResult<Self> {
        let n = b.nrows();
        let what = "a structure-of-arrays copy of the boxes";
        let mut s = Soa {
            x1: alloc::try_with_capacity(n, arg, what)?,
            y1: alloc::try_with_capacity(n, arg, what)?,
            x2: alloc::try_with_capacity(n, arg, what)?,
            y2: alloc::try_with_capacity(n, arg, what)?,
            area: alloc::try_with_capacity(n, arg, what)?,
        };
        for i in 0..n {
            let r = row4(b, i);
            s.x1.push(r[0]);
            s.y1.push(r[1]);
            s.x2.push(r[2]);
            s.y2.push(r[3]);
            s.area.push(area(&r));
        }
        Ok(s)
    }
}

/// IoU (or GIoU when `generalized`) of box `a` against every box of `b`, written to `out`.
/// Written as a flat loop over slices so that it vectorises. All coordinates must be within
/// the fast range (see `Range::fast`).
#[inline]
pub(crate) fn iou_row<T: Float>(a: &[T; 4], b: &Soa<T>, out: &mut [T], generalized: bool) {
    let m = out.len();
    let (bx1, by1, bx2, by2, bar) = (&b.x1[..m], &b.y1[..m], &b.x2[..m], &b.y2[..m], &b.area[..m]);
    let [ax1, ay1, ax2, ay2] = *a;
    let aa = area(a);
    if generalized {
        for j in 0..m {
            let iw = fmax(fmin(ax2, bx2[j]) - fmax(ax1, bx1[j]), T::ZERO);
            let ih = fmax(fmin(ay2, by2[j]) - fmax(ay1, by1[j]), T::ZERO);
            let inter = iw * ih;
            let union = aa + bar[j] - inter;
            let iou = if union > T::ZERO {
                inter / union
            } else {
                T::ZERO
            };
            let cw = fmax(ax2, bx2[j]) - fmin(ax1, bx1[j]);
            let ch = fmax(ay2, by2[j]) - fmin(ay1, by1[j]);
            let c = cw * ch;
            out[j] = if c > T::ZERO {
                iou - (c - union) / c
            } else {
                iou
            };
        }
    } else {
        for j in 0..m {
            let iw = fmax(fmin(ax2, bx2[j]) - fmax(ax1, bx1[j]), T::ZERO);
            let ih = fmax(fmin(ay2, by2[j]) - fmax(ay1, by1[j]), T::ZERO);
            let inter = iw * ih;
            let union = aa + bar[j] - inter;
            out[j] = if union > T::ZERO {
                inter / union
            } else {
                T::ZERO
            };
        }
    }
}

fn pairwise<T: Float>(
    boxes1: ArrayView2<T>,
    boxes2: ArrayView2<T>,
    generalized: bool,
) -> KaResult<Array2<T>> {
    let range = scan(&boxes1, "boxes1", true)?.union(scan(&boxes2, "boxes2", true)?);
    let (n, m) = (boxes1.nrows(), boxes2.nrows());
    let what = if generalized {
        "the GIoU matrix"
    } else {
        "the IoU matrix"
    };
    let len = alloc::checked_len::<T>(&[n, m], "boxes1/boxes2", what)?;
    let mut out = alloc::try_zeroed::<T>(len, "boxes1/boxes2", what)?;
    if n > 0 && m > 0 {
        let par = pool::worth_parallel(len);
        if range.fast::<T>() {
            let soa = Soa::from_view(&boxes2, "boxes2")?;
            pool::for_each_chunk_mut(&mut out, m, par, |i, row| {
                iou_row(&row4(&boxes1, i), &soa, row, generalized)
            });
        } else {
            // coordinates whose areas could overflow or underflow T: the scaled f64 kernel
            // (rare: boxes beyond 2^60 or with non-zero coordinates below 2^-40 in float32)
            pool::for_each_chunk_mut(&mut out, m, par, |i, row| {
                let a = wide(&row4(&boxes1, i));
                for (j, o) in row.iter_mut().enumerate() {
                    let (iou, giou) = iou_giou_wide(a, wide(&row4(&boxes2, j)));
                    *o = T::from_f64(if generalized { giou } else { iou });
                }
            });
        }
    }
    Array2::from_shape_vec((n, m), out).map_err(|e| KaError::invalid("boxes1", e.to_string()))
}

/// Pairwise IoU (N, M) of `xyxy` boxes. Validates both inputs (errors name `boxes1`/`boxes2`).
pub fn box_iou<T: Float>(boxes1: ArrayView2<T>, boxes2: ArrayView2<T>) -> KaResult<Array2<T>> {
    pairwise(boxes1, boxes2, false)
}

/// Pairwise generalised IoU (N, M) of `xyxy` boxes. Validates both inputs.
pub fn generalized_box_iou<T: Float>(
    boxes1: ArrayView2<T>,
    boxes2: ArrayView2<T>,
) -> KaResult<Array2<T>> {
    pairwise(boxes1, boxes2, true)
}

/// Class-aware non-maximum suppression on `xyxy` boxes.
///
/// Boxes are visited by decreasing score (ties: lower index first); a box is dropped when its
/// IoU with an already kept box **of the same label** exceeds `iou_threshold`. Returns the kept
/// indices sorted by decreasing score. Errors name `boxes`, `scores`, `labels`, `iou_threshold`.
///
/// Each box is compared with the kept boxes of its label only (one contiguous segment per
/// label, found through a small hash table), and every buffer (a few words per box) is
/// allocated fallibly.
pub fn batched_nms<T: Float>(
    boxes: ArrayView2<T>,
    scores: ArrayView1<T>,
    labels: ArrayView1<i64>,
    iou_threshold: f64,
) -> KaResult<Vec<usize>> {
    check_xyxy(&boxes, "boxes")?;
    let n = boxes.nrows();
    if scores.len() != n {
        return Err(KaError::invalid(
            "scores",
            format!(
                "expected shape ({n},) to match boxes, got ({},)",
                scores.len()
            ),
        ));
    }
    if labels.len() != n {
        return Err(KaError::invalid(
            "labels",
            format!(
                "expected shape ({n},) to match boxes, got ({},)",
                labels.len()
            ),
        ));
    }
    if let Some(i) = collapse_broadcast(scores.view())
        .iter()
        .position(|s| !s.is_finite())
    {
        return Err(KaError::invalid(
            "scores",
            format!("score {i} is not finite"),
        ));
    }
    if iou_threshold.is_nan() {
        return Err(KaError::invalid("iou_threshold", "must not be NaN"));
    }
    let what = "the NMS buffers";
    // Visiting order: decreasing score, ties by index. The index makes every key distinct,
    // so the unstable (allocation-free) sort is deterministic, and input already in this
    // order (the pseudo-targets' candidates) is recognised in one pass.
    let mut order: Vec<(u64, usize)> = alloc::try_collect(
        (0..n).map(|i| (descending(scores[i].to_f64()), i)),
        n,
        "boxes",
        what,
    )?;
    order.sort_unstable();
    // Each label gets a contiguous segment of `kept` as long as its number of boxes (found
    // through a small hash table): the kept boxes of a label sit next to each other, so
    // checking a box against them is one pass over a slice.
    let mut table = LabelTable::new(n, what)?;
    for i in 0..n {
        let slot = table.slot(labels[i]);
        table.count(slot, labels[i]);
    }
    table.assign_segments();
    let mut kept: Vec<[T; 4]> = alloc::try_filled(n, [T::ZERO; 4], "boxes", what)?;
    let mut keep: Vec<usize> = alloc::try_with_capacity(n, "boxes", what)?;
    let thr = T::from_f64(iou_threshold);
    for &(_, i) in &order {
        let b = row4(&boxes, i);
        let slot = table.slot(labels[i]);
        let (start, len) = table.segment(slot);
        // Compare in the input precision; IoU is never NaN for finite boxes (a pair whose
        // areas overflow T goes through the wide kernel inside iou_xyxy).
        if kept[start..start + len]
            .iter()
            .all(|k| iou_xyxy(k, &b) <= thr)
        {
            kept[start + len] = b;
            table.grow(slot);
            keep.push(i); // visiting order is the output order
        }
    }
    Ok(keep)
}

/// Label → (start, length) of its segment in [`batched_nms`]'s kept boxes: open addressing
/// with linear probing, at least twice as many slots as boxes (short probes), allocated
/// fallibly.
struct LabelTable {
    /// (label, start, len); `len == EMPTY` marks a free slot
    slots: Vec<(i64, usize, usize)>,
    shift: u32,
}

impl LabelTable {
    const EMPTY: usize = usize::MAX;

    fn new(n: usize, what: &str) -> KaResult<Self> {
        let size = n
            .checked_mul(2)
            .and_then(usize::checked_next_power_of_two)
            .ok_or_else(|| KaError::invalid("boxes", format!("{n} boxes are too many")))?
            .max(2);
        Ok(LabelTable {
            slots: alloc::try_filled(size, (0, 0, Self::EMPTY), "boxes", what)?,
            shift: 64 - size.trailing_zeros(),
        })
    }

    /// The slot holding `label`, or the free slot where it would go (there is always one:
    /// at most n labels in at least 2n slots).
    #[inline]
    fn slot(&self, label: i64) -> usize {
        let mask = self.slots.len() - 1;
        // Fibonacci hashing: the top bits of the product
        let mut s = ((label as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize;
        loop {
            let (key, _, len) = self.slots[s & mask];
            if len == Self::EMPTY || key == label {
                return s & mask;
            }
            s += 1;
        }
    }

    /// Count one more box of `label` (first pass; `start` holds the count).
    fn count(&mut self, slot: usize, label: i64) {
        let e = &mut self.slots[slot];
        if e.2 == Self::EMPTY {
            *e = (label, 0, 0);
        }
        e.1 += 1;
    }

    /// Turn the counts into consecutive segments, all empty.
    fn assign_segments(&mut self) {
        let mut next = 0;
        for e in self.slots.iter_mut().filter(|e| e.2 != Self::EMPTY) {
            let count = e.1;
            e.1 = next;
            e.2 = 0;
            next += count;
        }
    }

    #[inline]
    fn segment(&self, slot: usize) -> (usize, usize) {
        let (_, start, len) = self.slots[slot];
        (start, len)
    }

    #[inline]
    fn grow(&mut self, slot: usize) {
        self.slots[slot].2 += 1;
    }
}

/// An integer key that sorts finite floats in decreasing order (-0.0 ties with +0.0).
fn descending(x: f64) -> u64 {
    let bits = (x + 0.0).to_bits(); // -0.0 + 0.0 = +0.0
    let ascending = if bits >> 63 == 1 {
        !bits
    } else {
        bits | (1 << 63)
    };
    !ascending
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn convert_roundtrip_all_formats() {
        let b = [0.1f64, 0.2, 0.5, 0.9];
        for from in [BoxFormat::Xyxy, BoxFormat::Cxcywh, BoxFormat::Xywh] {
            for to in [BoxFormat::Xyxy, BoxFormat::Cxcywh, BoxFormat::Xywh] {
                let back = convert_box(convert_box(b, from, to), to, from);
                for k in 0..4 {
                    assert!(close(back[k], b[k], 1e-12), "{from:?}->{to:?}");
                }
            }
        }
        let c = convert_box([0.5f32, 0.5, 0.2, 0.4], BoxFormat::Cxcywh, BoxFormat::Xyxy);
        assert_eq!(c, [0.4, 0.3, 0.6, 0.7]);
        let w = convert_box([1.0f64, 2.0, 4.0, 7.0], BoxFormat::Xyxy, BoxFormat::Xywh);
        assert_eq!(w, [1.0, 2.0, 3.0, 5.0]);
    }

    #[test]
    fn convert_array_and_errors() {
        let a = array![[0.0f32, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 5.0]];
        let c = convert(a.view(), BoxFormat::Xyxy, BoxFormat::Cxcywh).unwrap();
        assert_eq!(c, array![[1.0f32, 1.0, 2.0, 2.0], [2.0, 3.0, 2.0, 4.0]]);
        let bad = array![[0.0f64, 1.0, 2.0]];
        let e = convert(bad.view(), BoxFormat::Xyxy, BoxFormat::Xywh).unwrap_err();
        assert!(e.to_string().starts_with("boxes:"), "{e}");
        let nan = array![[0.0f64, f64::NAN, 2.0, 3.0]];
        assert!(convert(nan.view(), BoxFormat::Xyxy, BoxFormat::Xywh).is_err());
        assert!(BoxFormat::parse("xyhw", "in_fmt")
            .unwrap_err()
            .to_string()
            .starts_with("in_fmt:"));
        assert_eq!("cxcywh".parse::<BoxFormat>().unwrap(), BoxFormat::Cxcywh);
    }

    #[test]
    fn iou_giou_known_values() {
        let a = [0.0f64, 0.0, 2.0, 2.0];
        let b = [1.0f64, 1.0, 3.0, 3.0];
        assert!(close(iou_xyxy(&a, &b), 1.0 / 7.0, 1e-15));
        // enclosing 3x3=9, union 7 -> giou = 1/7 - 2/9
        assert!(close(giou_xyxy(&a, &b), 1.0 / 7.0 - 2.0 / 9.0, 1e-15));
        assert_eq!(iou_xyxy(&a, &a), 1.0);
        assert_eq!(giou_xyxy(&a, &a), 1.0);
        // disjoint: iou 0, giou negative
        let c = [4.0f64, 0.0, 6.0, 2.0];
        assert_eq!(iou_xyxy(&a, &c), 0.0);
        assert!(close(giou_xyxy(&a, &c), -(12.0 - 8.0) / 12.0, 1e-15));
        // zero-area boxes: 0, never NaN
        let p = [1.0f32, 1.0, 1.0, 1.0];
        assert_eq!(iou_xyxy(&p, &p), 0.0);
        assert_eq!(giou_xyxy(&p, &p), 0.0);
        let line = [0.0f32, 1.0, 2.0, 1.0];
        assert_eq!(giou_xyxy(&line, &line), 0.0);
        assert!(giou_xyxy(&p, &[0.0, 0.0, 2.0, 2.0]).is_finite());
    }

    /// Tiny deterministic generator for tests (no rand crate).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
        fn boxes(&mut self, n: usize) -> Array2<f64> {
            let mut v = Vec::new();
            for _ in 0..n {
                let (x, y) = (self.next(), self.next());
                let (w, h) = (self.next() * 0.5, self.next() * 0.5);
                // some zero-area boxes too
                let w = if self.next() < 0.1 { 0.0 } else { w };
                v.extend_from_slice(&[x, y, x + w, y + h]);
            }
            Array2::from_shape_vec((n, 4), v).unwrap()
        }
    }

    #[test]
    fn pairwise_matches_scalar_f32_and_f64() {
        let mut r = Rng(0x9e3779b97f4a7c15);
        let a = r.boxes(37);
        let b = r.boxes(300); // big enough for the parallel path with giou
        let iou = box_iou(a.view(), b.view()).unwrap();
        let giou = generalized_box_iou(a.view(), b.view()).unwrap();
        let a32 = a.mapv(|x| x as f32);
        let b32 = b.mapv(|x| x as f32);
        let iou32 = box_iou(a32.view(), b32.view()).unwrap();
        let giou32 = generalized_box_iou(a32.view(), b32.view()).unwrap();
        assert_eq!(iou.dim(), (37, 300));
        for i in 0..37 {
            for j in 0..300 {
                let (ra, rb) = (row4(&a.view(), i), row4(&b.view(), j));
                assert_eq!(iou[[i, j]], iou_xyxy(&ra, &rb));
                assert_eq!(giou[[i, j]], giou_xyxy(&ra, &rb));
                assert!(close(iou32[[i, j]] as f64, iou[[i, j]], 1e-6));
                assert!(close(giou32[[i, j]] as f64, giou[[i, j]], 1e-6));
                assert!(giou[[i, j]] <= iou[[i, j]] + 1e-15 && giou[[i, j]] >= -1.0);
            }
        }
        // large: exercises the parallel path
        let big_a = r.boxes(400);
        let big = box_iou(big_a.view(), b.view()).unwrap();
        for i in (0..400).step_by(37) {
            for j in (0..300).step_by(11) {
                let (ra, rb) = (row4(&big_a.view(), i), row4(&b.view(), j));
                assert_eq!(big[[i, j]], iou_xyxy(&ra, &rb));
            }
        }
    }

    #[test]
    fn pairwise_empty_and_errors() {
        let a = Array2::<f32>::zeros((0, 4));
        let b = array![[0.0f32, 0.0, 1.0, 1.0]];
        assert_eq!(box_iou(a.view(), b.view()).unwrap().dim(), (0, 1));
        assert_eq!(box_iou(b.view(), a.view()).unwrap().dim(), (1, 0));
        let inv = array![[0.0f32, 0.0, -1.0, 1.0]];
        let e = generalized_box_iou(b.view(), inv.view()).unwrap_err();
        assert!(e.to_string().starts_with("boxes2:"), "{e}");
        let e = box_iou(inv.view(), b.view()).unwrap_err();
        assert!(e.to_string().starts_with("boxes1:"), "{e}");
        let bad = Array2::<f32>::zeros((2, 5));
        assert!(box_iou(bad.view(), b.view()).is_err());
        let inf = array![[0.0f32, 0.0, f32::INFINITY, 1.0]];
        assert!(box_iou(inf.view(), b.view()).is_err());
    }

    #[test]
    fn nms_class_aware_keeps_highest() {
        let boxes = array![
            [0.0f32, 0.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 0.95], // overlaps 0 strongly, same class, lower score -> dropped
            [0.0, 0.0, 1.0, 1.0],  // same box, other class -> kept
            [5.0, 5.0, 6.0, 6.0],  // far away -> kept
            [0.05, 0.0, 1.0, 1.0], // overlaps 0, same class, higher score -> suppresses 0
        ];
        let scores = Array1::from(vec![0.8f32, 0.7, 0.6, 0.5, 0.9]);
        let labels = Array1::from(vec![1i64, 1, 2, 1, 1]);
        let keep = batched_nms(boxes.view(), scores.view(), labels.view(), 0.5).unwrap();
        assert_eq!(keep, vec![4, 2, 3]);
        // threshold 1.0 keeps everything, ordered by score
        let keep = batched_nms(boxes.view(), scores.view(), labels.view(), 1.0).unwrap();
        assert_eq!(keep, vec![4, 0, 1, 2, 3]);
        // ties keep index order
        let s = Array1::from(vec![0.5f32; 5]);
        let keep = batched_nms(boxes.view(), s.view(), labels.view(), 0.5).unwrap();
        assert_eq!(keep, vec![0, 2, 3]);
        let empty = batched_nms(
            Array2::<f32>::zeros((0, 4)).view(),
            Array1::<f32>::zeros(0).view(),
            Array1::<i64>::zeros(0).view(),
            0.5,
        )
        .unwrap();
        assert!(empty.is_empty());
    }

    /// The visit in global score order with one kept list per label: the definition.
    fn reference_nms(b: &Array2<f64>, s: &[f64], l: &[i64], thr: f64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&x, &y| s[y].partial_cmp(&s[x]).unwrap());
        let mut keep: Vec<usize> = Vec::new();
        for &i in &order {
            let bi = row4(&b.view(), i);
            if keep
                .iter()
                .all(|&k| l[k] != l[i] || iou_xyxy(&row4(&b.view(), k), &bi) <= thr)
            {
                keep.push(i);
            }
        }
        keep
    }

    #[test]
    fn nms_per_label_runs_equal_the_global_visit() {
        let mut r = Rng(0x2545f4914f6cdd1d);
        for trial in 0..200 {
            let n = (r.next() * 40.0) as usize;
            let b = r.boxes(n);
            // few distinct scores and labels: many ties
            let s: Vec<f64> = (0..n).map(|_| (r.next() * 5.0).floor()).collect();
            let l: Vec<i64> = (0..n).map(|_| (r.next() * 3.0) as i64 - 1).collect();
            let thr = [0.0, 0.1, 0.5, 0.9, 1.0][trial % 5];
            let got = batched_nms(
                b.view(),
                Array1::from(s.clone()).view(),
                Array1::from(l.clone()).view(),
                thr,
            )
            .unwrap();
            assert_eq!(got, reference_nms(&b, &s, &l, thr), "trial {trial}");
        }
    }

    #[test]
    fn huge_coordinates_give_exact_ratios_never_nan() {
        // the 2x2 / 3x3 example scaled far beyond where areas overflow
        for scale in [3e19f64, 1e30, 1e150, 1e200, 1e300] {
            let a = [0.0, 0.0, 2.0 * scale, 2.0 * scale];
            let b = [scale, scale, 3.0 * scale, 3.0 * scale];
            let (iou, giou) = (iou_xyxy(&a, &b), giou_xyxy(&a, &b));
            assert!(close(iou, 1.0 / 7.0, 1e-12), "{scale}: {iou}");
            assert!(close(giou, 1.0 / 7.0 - 2.0 / 9.0, 1e-12), "{scale}: {giou}");
            let m = box_iou(array![a].view(), array![a, b].view()).unwrap();
            assert!(close(m[[0, 0]], 1.0, 1e-12) && close(m[[0, 1]], 1.0 / 7.0, 1e-12));
            let g = generalized_box_iou(array![a].view(), array![b].view()).unwrap();
            assert!(close(g[[0, 0]], 1.0 / 7.0 - 2.0 / 9.0, 1e-12), "{scale}");
            if scale < 1e38 {
                let a32 = a.map(|x| x as f32);
                let b32 = b.map(|x| x as f32);
                let m = box_iou(array![a32].view(), array![a32, b32].view()).unwrap();
                assert!(close(m[[0, 0]] as f64, 1.0, 1e-6), "{scale}");
                assert!(close(m[[0, 1]] as f64, 1.0 / 7.0, 1e-6), "{scale}");
                let g = generalized_box_iou(array![a32].view(), array![b32].view()).unwrap();
                assert!(close(g[[0, 0]] as f64, 1.0 / 7.0 - 2.0 / 9.0, 1e-6));
            }
        }
        // the whole f64 range: widths beyond f64::MAX, thin boxes, degenerate ones
        let big = f64::MAX;
        let whole = [-big, -big, big, big];
        assert_eq!(iou_xyxy(&whole, &whole), 1.0);
        assert_eq!(giou_xyxy(&whole, &whole), 1.0);
        let thin = [-1e300, 0.0, 1e300, 1e-300];
        assert!(close(iou_xyxy(&thin, &thin), 1.0, 1e-12));
        let point = [big, big, big, big];
        assert_eq!(
            (iou_xyxy(&point, &point), giou_xyxy(&point, &point)),
            (0.0, 0.0)
        );
        let m =
            generalized_box_iou(array![whole, thin, point].view(), array![whole].view()).unwrap();
        assert!(
            m.iter().all(|v| v.is_finite() && (-1.0..=1.0).contains(v)),
            "{m:?}"
        );
        // f32 near its maximum
        let f = f32::MAX;
        let w32 = [-f, -f, f, f];
        let m =
            generalized_box_iou(array![w32].view(), array![w32, [0.0, 0.0, f, f]].view()).unwrap();
        assert_eq!(m[[0, 0]], 1.0);
        assert!(close(m[[0, 1]] as f64, 0.25, 1e-6), "{m:?}");
    }

    #[test]
    fn tiny_boxes_keep_their_ratios() {
        // areas underflow float32 (1e-60) or are subnormal: the ratios are still exact
        for s in [1e-20f32, 1e-30, 1e-40] {
            let a = [0.0f32, 0.0, 2.0 * s, 2.0 * s];
            let b = [s, s, 3.0 * s, 3.0 * s];
            assert!(close(iou_xyxy(&a, &a) as f64, 1.0, 1e-6), "{s}");
            assert!(close(iou_xyxy(&a, &b) as f64, 1.0 / 7.0, 1e-6), "{s}");
            let g = generalized_box_iou(array![a].view(), array![a, b].view()).unwrap();
            assert!(close(g[[0, 0]] as f64, 1.0, 1e-6), "{s}: {g:?}");
            assert!(
                close(g[[0, 1]] as f64, 1.0 / 7.0 - 2.0 / 9.0, 1e-6),
                "{s}: {g:?}"
            );
        }
        let t = f64::from_bits(1); // the smallest subnormal
        let a = [0.0, 0.0, t, t];
        assert_eq!(iou_xyxy(&a, &a), 1.0);
        assert_eq!(
            box_iou(array![a].view(), array![a].view()).unwrap()[[0, 0]],
            1.0
        );
        // a tiny box next to a normal one: no NaN, the tiny one's area is negligible
        let m = generalized_box_iou(array![a].view(), array![[0.0, 0.0, 1.0, 1.0]].view()).unwrap();
        assert!(m.iter().all(|v| v.is_finite()), "{m:?}");
    }

    #[test]
    fn nms_with_huge_coordinates_still_suppresses() {
        let boxes = array![[0.0f32, 0.0, 3e19, 3e19], [0.0, 0.0, 3e19, 2.9e19]];
        let s = Array1::from(vec![0.9f32, 0.8]);
        let l = Array1::from(vec![0i64, 0]);
        assert_eq!(
            batched_nms(boxes.view(), s.view(), l.view(), 0.5).unwrap(),
            [0]
        );
    }

    #[test]
    fn conversions_that_overflow_name_the_box() {
        let b = array![[0.0f32, 0.0, 1.0, 1.0], [-3e38, 0.0, 3e38, 1.0]];
        let e = convert(b.view(), BoxFormat::Xyxy, BoxFormat::Cxcywh).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("boxes: box 1 cannot be converted"),
            "{e}"
        );
        assert!(e.to_string().contains("float32"), "{e}");
        // a midpoint whose sum would overflow is still exact
        let b = array![[3e38f32, 0.0, 3.2e38, 1.0]];
        let c = convert(b.view(), BoxFormat::Xyxy, BoxFormat::Cxcywh).unwrap();
        assert_eq!(c[[0, 0]], 3.1e38);
    }

    #[test]
    fn oversized_results_are_errors_not_aborts() {
        // Sizes are beyond any address space (2^57 bytes with 5-level paging), so the
        // allocator refuses them even where the kernel overcommits memory.
        let row = array![0.0f32, 0.0, 1.0, 1.0];
        // 2^28 x 2^28 float32: 2^58 bytes, representable, never available
        let big = row.broadcast((1 << 28, 4)).unwrap();
        let e = box_iou(big, big).unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        assert!(
            e.to_string().starts_with("boxes1/boxes2: the IoU matrix"),
            "{e}"
        );
        let e = generalized_box_iou(big, big).unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        // 2^40 x 2^40 cannot exist
        let huge = row.broadcast((1 << 40, 4)).unwrap();
        let e = box_iou(huge, huge).unwrap_err();
        assert!(matches!(e, KaError::InvalidArgument { .. }), "{e}");
        // an empty result from a huge broadcast input is quick (validation reads one row)
        let none = Array2::<f32>::zeros((0, 4));
        assert_eq!(box_iou(huge, none.view()).unwrap().dim(), (1 << 40, 0));
        let giant = row.broadcast((1 << 55, 4)).unwrap(); // converted: 2^59 bytes
        let e = convert(giant, BoxFormat::Xyxy, BoxFormat::Cxcywh).unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        let s = Array1::from(vec![0.5f32]);
        let l = Array1::from(vec![0i64]);
        let n = 1 << 54; // 24 bytes of sort keys each: 2^58.6 bytes
        let e = batched_nms(
            row.broadcast((n, 4)).unwrap(),
            s.broadcast(n).unwrap(),
            l.broadcast(n).unwrap(),
            0.5,
        )
        .unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        // a broadcast inverted box is found at once, at its first index
        let inv = array![1.0f32, 0.0, 0.0, 1.0];
        let e = box_iou(inv.broadcast((1 << 40, 4)).unwrap(), none.view()).unwrap_err();
        assert!(
            e.to_string().starts_with("boxes1: box 0 is inverted"),
            "{e}"
        );
    }

    #[test]
    fn descending_keys_order_floats() {
        let xs = [
            3.5,
            1.0,
            0.0,
            -0.0,
            -1e-300,
            -2.0,
            f64::MAX,
            -f64::MAX,
            1e-310,
        ];
        for &a in &xs {
            for &b in &xs {
                let want = b.partial_cmp(&a).unwrap();
                assert_eq!(descending(a).cmp(&descending(b)), want, "{a} {b}");
            }
        }
    }

    #[test]
    fn nms_errors_name_args() {
        let boxes = array![[0.0f32, 0.0, 1.0, 1.0]];
        let s = Array1::from(vec![f32::NAN]);
        let l = Array1::from(vec![0i64]);
        let e = batched_nms(boxes.view(), s.view(), l.view(), 0.5).unwrap_err();
        assert!(e.to_string().starts_with("scores:"));
        let s = Array1::from(vec![0.5f32, 0.1]);
        let e = batched_nms(boxes.view(), s.view(), l.view(), 0.5).unwrap_err();
        assert!(e.to_string().starts_with("scores:"));
        let s = Array1::from(vec![0.5f32]);
        let l2 = Array1::from(vec![0i64, 1]);
        let e = batched_nms(boxes.view(), s.view(), l2.view(), 0.5).unwrap_err();
        assert!(e.to_string().starts_with("labels:"));
        let e = batched_nms(boxes.view(), s.view(), l.view(), f64::NAN).unwrap_err();
        assert!(e.to_string().starts_with("iou_threshold:"));
    }
}
