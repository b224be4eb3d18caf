//! Box formats, IoU, generalised IoU and class-aware NMS, for `f32` and `f64`.
//!
//! Formats: `xyxy` (x1, y1, x2, y2), `cxcywh` (centre, width, height), `xywh` (top-left,
//! width, height). IoU code works on `xyxy`. Zero-area boxes give IoU 0 (never NaN); a pair
//! whose enclosing box has zero area has GIoU equal to its IoU (0).

use crate::error::{KaError, KaResult};
use crate::pool;
use ndarray::{Array2, ArrayView1, ArrayView2};
use std::collections::HashMap;
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
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + 'static
{
    const ZERO: Self;
    const HALF: Self;
    fn is_finite(self) -> bool;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

macro_rules! impl_float {
    ($t:ty) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const HALF: Self = 0.5;
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
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
impl_float!(f32);
impl_float!(f64);

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
        BoxFormat::Cxcywh => [T::HALF * (x1 + x2), T::HALF * (y1 + y2), x2 - x1, y2 - y1],
        BoxFormat::Xywh => [x1, y1, x2 - x1, y2 - y1],
    }
}

fn row4<T: Float>(a: &ArrayView2<T>, i: usize) -> [T; 4] {
    [a[[i, 0]], a[[i, 1]], a[[i, 2]], a[[i, 3]]]
}

/// Check an (N, 4) array: 4 columns and finite values. Errors name `arg`.
pub fn check_n4<T: Float>(a: &ArrayView2<T>, arg: &str) -> KaResult<()> {
    if a.ncols() != 4 {
        return Err(KaError::invalid(
            arg,
            format!("expected shape (N, 4), got ({}, {})", a.nrows(), a.ncols()),
        ));
    }
    if let Some(((i, _), _)) = a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(KaError::invalid(
            arg,
            format!("box {i} has a non-finite coordinate"),
        ));
    }
    Ok(())
}

/// Check (N, 4) `xyxy` boxes: shape, finiteness and x2 ≥ x1, y2 ≥ y1. Errors name `arg`.
pub fn check_xyxy<T: Float>(a: &ArrayView2<T>, arg: &str) -> KaResult<()> {
    check_n4(a, arg)?;
    for i in 0..a.nrows() {
        let [x1, y1, x2, y2] = row4(a, i);
        if x2 < x1 || y2 < y1 {
            return Err(KaError::invalid(
                arg,
                format!(
                    "box {i} is inverted (x2 < x1 or y2 < y1): [{:?}, {:?}, {:?}, {:?}]",
                    x1, y1, x2, y2
                ),
            ));
        }
    }
    Ok(())
}

/// Convert (N, 4) boxes between formats (validated: shape, finite). Errors name `boxes`.
pub fn convert<T: Float>(
    boxes: ArrayView2<T>,
    from: BoxFormat,
    to: BoxFormat,
) -> KaResult<Array2<T>> {
    check_n4(&boxes, "boxes")?;
    let n = boxes.nrows();
    let mut out = Vec::with_capacity(n * 4);
    for i in 0..n {
        out.extend_from_slice(&convert_box(row4(&boxes, i), from, to));
    }
    Array2::from_shape_vec((n, 4), out).map_err(|e| KaError::invalid("boxes", e.to_string()))
}

#[inline(always)]
fn area<T: Float>(b: &[T; 4]) -> T {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// IoU of two `xyxy` boxes; 0 when the union has zero area.
#[inline]
pub fn iou_xyxy<T: Float>(a: &[T; 4], b: &[T; 4]) -> T {
    let iw = fmax(fmin(a[2], b[2]) - fmax(a[0], b[0]), T::ZERO);
    let ih = fmax(fmin(a[3], b[3]) - fmax(a[1], b[1]), T::ZERO);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > T::ZERO {
        inter / union
    } else {
        T::ZERO
    }
}

/// Generalised IoU of two `xyxy` boxes: IoU − (C − U)/C with C the enclosing box's area;
/// equals the IoU when C has zero area. Never NaN for finite input.
#[inline]
pub fn giou_xyxy<T: Float>(a: &[T; 4], b: &[T; 4]) -> T {
    let iw = fmax(fmin(a[2], b[2]) - fmax(a[0], b[0]), T::ZERO);
    let ih = fmax(fmin(a[3], b[3]) - fmax(a[1], b[1]), T::ZERO);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let iou = if union > T::ZERO {
        inter / union
    } else {
        T::ZERO
    };
    let cw = fmax(a[2], b[2]) - fmin(a[0], b[0]);
    let ch = fmax(a[3], b[3]) - fmin(a[1], b[1]);
    let c = cw * ch;
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
    fn from_view(b: &ArrayView2<T>) -> Self {
        let n = b.nrows();
        let mut s = Soa {
            x1: Vec::with_capacity(n),
            y1: Vec::with_capacity(n),
            x2: Vec::with_capacity(n),
            y2: Vec::with_capacity(n),
            area: Vec::with_capacity(n),
        };
        for i in 0..n {
            let r = row4(b, i);
            s.x1.push(r[0]);
            s.y1.push(r[1]);
            s.x2.push(r[2]);
            s.y2.push(r[3]);
            s.area.push(area(&r));
        }
        s
    }
}

/// IoU (or GIoU when `generalized`) of box `a` against every box of `b`, written to `out`.
/// Written as a flat loop over slices so that it vectorises.
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
    check_xyxy(&boxes1, "boxes1")?;
    check_xyxy(&boxes2, "boxes2")?;
    let (n, m) = (boxes1.nrows(), boxes2.nrows());
    let mut out = vec![T::ZERO; n * m];
    if n > 0 && m > 0 {
        let soa = Soa::from_view(&boxes2);
        let par = pool::worth_parallel(n * m);
        pool::for_each_chunk_mut(&mut out, m, par, |i, row| {
            iou_row(&row4(&boxes1, i), &soa, row, generalized)
        });
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
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(KaError::invalid(
            "scores",
            format!("score {i} is not finite"),
        ));
    }
    if iou_threshold.is_nan() {
        return Err(KaError::invalid("iou_threshold", "must not be NaN"));
    }
    let mut order: Vec<usize> = (0..n).collect();
    // Stable sort: equal scores keep index order. Scores are finite, so partial_cmp is total.
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let thr = T::from_f64(iou_threshold);
    let mut kept_per_label: HashMap<i64, Vec<[T; 4]>> = HashMap::new();
    let mut keep = Vec::new();
    for &i in &order {
        let b = row4(&boxes, i);
        let kept = kept_per_label.entry(labels[i]).or_default();
        // Compare in the input precision; IoU is never NaN for finite boxes.
        if kept.iter().all(|k| iou_xyxy(k, &b) <= thr) {
            kept.push(b);
            keep.push(i);
        }
    }
    Ok(keep)
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
