//! Task-level amalgamation (TA) pseudo-targets: candidate selection, cross-teacher
//! deduplication, top-n and the soft-target remap into the union label space
//! (docs/method.md §4), for a whole batch and all teachers in one call.
//!
//! For every image `b` and every teacher `k` (logits `(B, Q_k, K_k)`, boxes `(B, Q_k, 4)`
//! normalised cxcywh, local→union class map of length `C_k`; a map entry of `-1` marks a
//! *non-class slot*, such as the unused category ids in DETR's 91-slot COCO head):
//!
//! 1. **Candidates.** A *softmax* teacher has `K_k = C_k + 1` logits, the last one being
//!    "no object"; query `q` is a candidate when the arg-max over all `K_k` logits is a
//!    foreground class and its softmax probability is `> threshold`. A *sigmoid*
//!    (focal-style) teacher has `K_k = C_k` logits and no background; query `q` is a candidate
//!    when its largest sigmoid probability is `> threshold`, with the arg-max as its class.
//!    Arg-max ties go to the lower class index; probabilities are computed in `f64`.
//!    Non-class slots take no part in the arg-max (they never become candidates), but a
//!    softmax teacher's probabilities are its own: the denominator sums over all `K_k` logits.
//! 2. **Pool and order.** Candidates of all teachers are pooled and sorted by decreasing score;
//!    ties go to the lower teacher index, then to the lower query index. This is the output order.
//! 3. **Dedupe (optional).** With `nms_iou = Some(t)`, class-aware NMS in *union* space: a
//!    candidate is dropped when an earlier (more confident) kept candidate with the same union
//!    label has IoU `> t` with it (IoU on xyxy boxes converted from the cxcywh teacher boxes).
//!    It only merges anything when the teachers' class sets overlap or a teacher repeats itself,
//!    but it is applied uniformly. **NMS runs before top-n**, so duplicates of one object never
//!    use up the `top_n` budget.
//! 4. **Top-n.** The first `top_n` survivors are kept.
//! 5. **Remap.** Hard label = union index of the arg-max class; box = the teacher's box;
//!    soft logits = a `|U| + 1` row filled with `fill_logit`, into which the teacher's raw
//!    class logits are written at their union positions (non-class slots are left out); a
//!    softmax teacher's background logit goes to the union background index `|U|`. A sigmoid teacher has no background logit, so
//!    for its pseudo-targets the background entry stays `fill_logit`.
//!
//! Images are processed in parallel on the process-local pool only above a work threshold.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, ArrayView3, Axis};

use crate::alloc;
use crate::boxes;
use crate::error::{KaError, KaResult};
use crate::pool;

/// How a teacher's classification head turns logits into probabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TeacherKind {
    /// Softmax over `C + 1` logits, the last one is "no object" (DETR).
    Softmax,
    /// Independent sigmoids over `C` logits, no background logit (Deformable DETR, DINO, ...).
    Sigmoid,
}

impl TeacherKind {
    /// Parse `"softmax"` or `"sigmoid"` (alias `"focal"`); `arg` names the argument in errors.
    pub fn parse(kind: &str, arg: &str) -> KaResult<Self> {
        match kind {
            "softmax" => Ok(TeacherKind::Softmax),
            "sigmoid" | "focal" => Ok(TeacherKind::Sigmoid),
            other => Err(KaError::invalid(
                arg,
                format!("unknown teacher kind {other:?}; expected \"softmax\" or \"sigmoid\""),
            )),
        }
    }

    /// Number of logits per query for a teacher with `num_classes` classes.
    pub fn num_logits(self, num_classes: usize) -> usize {
        match self {
            TeacherKind::Softmax => num_classes + 1,
            TeacherKind::Sigmoid => num_classes,
        }
    }

    /// Lower-case name as accepted by [`TeacherKind::parse`].
    pub fn as_str(self) -> &'static str {
        match self {
            TeacherKind::Softmax => "softmax",
            TeacherKind::Sigmoid => "sigmoid",
        }
    }
}

/// One teacher's predictions for the batch (borrowed, any strides).
#[derive(Clone, Copy, Debug)]
pub struct TeacherOutputs<'a> {
    /// `(B, Q_k, K_k)` raw class logits.
    pub logits: ArrayView3<'a, f32>,
    /// `(B, Q_k, 4)` normalised cxcywh boxes.
    pub boxes: ArrayView3<'a, f32>,
    /// `(C_k,)` union index of each local class, or `-1` for a non-class slot.
    pub local_to_union: ArrayView1<'a, i64>,
    /// Classification head type.
    pub kind: TeacherKind,
}

/// Scalar settings of [`build_pseudo_targets`], validated by [`PseudoTargetConfig::new`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PseudoTargetConfig {
    /// `|U|`, the number of union classes (the background index is `|U|`).
    pub num_union_classes: usize,
    /// A candidate's probability must be strictly greater than this; in `[0, 1)`.
    pub threshold: f64,
    /// Keep at most this many pseudo-targets per image (after NMS).
    pub top_n: usize,
    /// Value of soft-logit entries no teacher logit is written to.
    pub fill_logit: f32,
    /// Class-aware NMS IoU threshold in union space, or `None` for no dedupe.
    pub nms_iou: Option<f64>,
}

impl PseudoTargetConfig {
    /// Validate raw user values (errors name `num_union_classes`, `threshold`, `top_n`,
    /// `fill_logit`, `nms_iou`).
    pub fn new(
        num_union_classes: i64,
        threshold: f64,
        top_n: i64,
        fill_logit: f64,
        nms_iou: Option<f64>,
    ) -> KaResult<Self> {
        if num_union_classes < 1 {
            return Err(KaError::invalid(
                "num_union_classes",
                format!("must be >= 1, got {num_union_classes}"),
            ));
        }
        if !(0.0..1.0).contains(&threshold) {
            return Err(KaError::invalid(
                "threshold",
                format!("must be in [0, 1), got {threshold}"),
            ));
        }
        if top_n < 0 {
            return Err(KaError::invalid(
                "top_n",
                format!("must be >= 0, got {top_n}"),
            ));
        }
        if !fill_logit.is_finite() || !(fill_logit as f32).is_finite() {
            return Err(KaError::invalid(
                "fill_logit",
                format!("must be a finite float32 value, got {fill_logit}"),
            ));
        }
        if let Some(t) = nms_iou {
            if !(0.0..=1.0).contains(&t) {
                return Err(KaError::invalid(
                    "nms_iou",
                    format!("must be in [0, 1] or None, got {t}"),
                ));
            }
        }
        let num_union_classes = usize::try_from(num_union_classes)
            .map_err(|_| KaError::invalid("num_union_classes", "too large"))?;
        let top_n = usize::try_from(top_n).map_err(|_| KaError::invalid("top_n", "too large"))?;
        Ok(Self {
            num_union_classes,
            threshold,
            top_n,
            fill_logit: fill_logit as f32,
            nms_iou,
        })
    }

    /// Width of a soft-logit row: `|U| + 1`.
    pub fn soft_width(&self) -> usize {
        self.num_union_classes + 1
    }
}

/// Pseudo-targets of a batch, images concatenated in order (`counts[b]` rows for image `b`),
/// each image's rows sorted by decreasing score.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PseudoTargets {
    /// `(M,)` union hard labels.
    pub labels: Vec<i64>,
    /// `(M, 4)` teacher boxes, normalised cxcywh.
    pub boxes: Vec<[f32; 4]>,
    /// `(M, |U| + 1)` soft-target logits, row-major.
    pub soft_logits: Vec<f32>,
    /// `(M,)` teacher confidence of the hard label (softmax or sigmoid probability).
    pub scores: Vec<f32>,
    /// `(M,)` index of the teacher each pseudo-target comes from.
    pub teacher: Vec<i64>,
    /// `(B,)` pseudo-targets per image.
    pub counts: Vec<i64>,
}

impl PseudoTargets {
    /// Total number of pseudo-targets `M`.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when no image has any pseudo-target.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// A candidate query of one image.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    score: f64,
    teacher: usize,
    query: usize,
    label: usize,
}

/// Validated per-teacher metadata.
struct Teacher<'a> {
    logits: ArrayView3<'a, f32>,
    boxes: ArrayView3<'a, f32>,
    /// Union index per local class; `None` = a non-class slot.
    map: Vec<Option<usize>>,
    /// True when the map has no non-class slot (the arg-max then scans plain rows).
    all_classes: bool,
    kind: TeacherKind,
}

/// Build the pseudo-targets of a batch for all teachers in one call (see the module docs).
///
/// Errors (never panics) name the offending input: `teacher_logits[k]`, `teacher_boxes[k]`,
/// `local_to_union[k]` for mismatched batch sizes, query counts, logit widths, out-of-range or
/// repeated union indices, a map with no class (only `-1` entries), non-finite values or
/// negative box sizes.
pub fn build_pseudo_targets(
    teachers: &[TeacherOutputs<'_>],
    config: &PseudoTargetConfig,
) -> KaResult<PseudoTargets> {
    let teachers = validate(teachers, config)?;
    let batch = teachers[0].logits.dim().0;
    let work: usize = teachers
        .iter()
        .map(|t| t.logits.len())
        .fold(0usize, usize::saturating_add);
    // One softmax/sigmoid per logit dominates: parallel over images above the pool's threshold.
    let per_image = pool::try_map_indices(
        batch,
        pool::worth_parallel(work),
        || (),
        |_, b| select_image(&teachers, b, config),
        "teacher_logits",
        "the per-image candidates",
    )?
    .into_iter()
    .collect::<KaResult<Vec<Vec<Candidate>>>>()?;
    assemble(&teachers, &per_image, config)
}

fn validate<'a>(
    teachers: &[TeacherOutputs<'a>],
    config: &PseudoTargetConfig,
) -> KaResult<Vec<Teacher<'a>>> {
    let Some(first) = teachers.first() else {
        return Err(KaError::invalid(
            "teacher_logits",
            "at least one teacher is required",
        ));
    };
    let batch = first.logits.dim().0;
    let union = config.num_union_classes;
    // a table of `union` flags: allocated fallibly, `num_union_classes` is a user value
    let mut seen = alloc::try_filled(
        union,
        false,
        "num_union_classes",
        "a table of the union classes",
    )?;
    let mut out = Vec::with_capacity(teachers.len());
    for (k, t) in teachers.iter().enumerate() {
        let logits_arg = format!("teacher_logits[{k}]");
        let boxes_arg = format!("teacher_boxes[{k}]");
        let map_arg = format!("local_to_union[{k}]");
        let (b, q, width) = t.logits.dim();
        let (bb, qb, four) = t.boxes.dim();
        if b != batch {
            return Err(KaError::invalid(
                logits_arg,
                format!("batch size {b} differs from teacher_logits[0]'s {batch}"),
            ));
        }
        if bb != b || qb != q || four != 4 {
            return Err(KaError::invalid(
                boxes_arg,
                format!(
                    "expected shape ({b}, {q}, 4) to match {logits_arg}, got ({bb}, {qb}, {four})"
                ),
            ));
        }
        let classes = t.local_to_union.len();
        if classes == 0 {
            return Err(KaError::invalid(
                map_arg,
                "a teacher needs at least one class",
            ));
        }
        let expected = t.kind.num_logits(classes);
        if width != expected {
            let detail = match t.kind {
                TeacherKind::Softmax => "classes + 1 background",
                TeacherKind::Sigmoid => "one per class, no background",
            };
            return Err(KaError::invalid(
                logits_arg,
                format!(
                    "{} teacher with {classes} classes ({map_arg} length) needs {expected} logits \
                     per query ({detail}), got {width}",
                    t.kind.as_str()
                ),
            ));
        }
        seen.fill(false);
        let mut map = alloc::try_with_capacity(classes, &map_arg, "the class map")?;
        for (j, &u) in t.local_to_union.iter().enumerate() {
            if u == -1 {
                map.push(None); // a non-class slot
                continue;
            }
            let idx = usize::try_from(u)
                .ok()
                .filter(|&i| i < union)
                .ok_or_else(|| {
                    KaError::invalid(
                        &map_arg,
                        format!(
                            "entry {j} is {u}, outside [0, num_union_classes={union}) \
                             (-1 = non-class slot)"
                        ),
                    )
                })?;
            if seen[idx] {
                return Err(KaError::invalid(
                    &map_arg,
                    format!("union index {idx} appears more than once"),
                ));
            }
            seen[idx] = true;
            map.push(Some(idx));
        }
        if map.iter().all(Option::is_none) {
            return Err(KaError::invalid(
                map_arg,
                "every entry is -1: a teacher needs at least one class",
            ));
        }
        check_finite(&t.logits, &logits_arg)?;
        check_finite(&t.boxes, &boxes_arg)?;
        // a broadcast input is checked once per distinct box (same first offending index)
        let distinct = alloc::collapse_broadcast_rows(t.boxes);
        let qd = distinct.dim().1.max(1);
        let negative = match distinct.as_slice() {
            Some(s) => s.chunks_exact(4).position(|bx| bx[2] < 0.0 || bx[3] < 0.0),
            None => distinct
                .lanes(Axis(2))
                .into_iter()
                .position(|bx| bx[2] < 0.0 || bx[3] < 0.0),
        };
        if let Some(i) = negative {
            return Err(KaError::invalid(
                boxes_arg,
                format!(
                    "box [{}, {}] has negative width or height (boxes are cxcywh)",
                    i / qd,
                    i % qd
                ),
            ));
        }
        out.push(Teacher {
            logits: t.logits,
            boxes: t.boxes,
            all_classes: map.iter().all(Option::is_some),
            map,
            kind: t.kind,
        });
    }
    Ok(out)
}

/// Error naming `arg` and the first non-finite entry's index, if any.
fn check_finite(a: &ArrayView3<'_, f32>, arg: &str) -> KaResult<()> {
    // Fast branch-free scan first (an f32 is non-finite exactly when its exponent bits are all
    // ones; an integer max over them vectorises); locate the offending entry only on failure.
    const EXP: u32 = 0x7f80_0000;
    // a broadcast input is scanned once per distinct element
    let a = &alloc::collapse_broadcast(a.view());
    let all_finite = match a.as_slice_memory_order() {
        Some(s) => s.iter().fold(0u32, |acc, v| acc.max(v.to_bits() & EXP)) < EXP,
        None => a.iter().all(|v| v.is_finite()),
    };
    if all_finite {
        return Ok(());
    }
    match a.indexed_iter().find(|(_, v)| !v.is_finite()) {
        Some(((b, q, j), v)) => Err(KaError::invalid(
            arg,
            format!("contains a non-finite value ({v} at [{b}, {q}, {j}])"),
        )),
        None => Ok(()),
    }
}

/// Arg-max (first maximum) and maximum of a non-empty row, over the entries `take` allows.
fn argmax(row: &[f32], take: impl Fn(usize) -> bool) -> (usize, f32) {
    let mut best = 0usize;
    let mut max = f32::NEG_INFINITY;
    for (j, &v) in row.iter().enumerate() {
        if v > max && take(j) {
            max = v;
            best = j;
        }
    }
    (best, max)
}

/// Candidate class and probability of one query, or `None` when it is not a candidate.
/// Non-class slots of `t.map` are skipped by the arg-max; a softmax still normalises over the
/// whole row (the teacher's own probabilities).
fn candidate(row: &[f32], t: &Teacher<'_>, threshold: f64) -> Option<(usize, f64)> {
    let (class, max) = if t.all_classes {
        argmax(row, |_| true)
    } else {
        argmax(row, |j| t.map.get(j).is_none_or(Option::is_some))
    };
    let prob = match t.kind {
        TeacherKind::Softmax => {
            if class + 1 == row.len() {
                return None; // background wins
            }
            let m = row.iter().fold(max, |a, &v| a.max(v)); // a non-class slot may be larger
            let m = f64::from(m);
            let denom: f64 = row.iter().map(|&v| (f64::from(v) - m).exp()).sum();
            (f64::from(max) - m).exp() / denom
        }
        TeacherKind::Sigmoid => 1.0 / (1.0 + (-f64::from(max)).exp()),
    };
    (prob > threshold).then_some((class, prob))
}

/// Candidates of image `b`, deduplicated and cut to `top_n`, in output order.
fn select_image(
    teachers: &[Teacher<'_>],
    b: usize,
    config: &PseudoTargetConfig,
) -> KaResult<Vec<Candidate>> {
    // at most one candidate per query: room for all of them up front (fallibly; a broadcast
    // input can have any number of queries), so the pushes below never reallocate
    let queries = teachers
        .iter()
        .map(|t| t.logits.dim().1)
        .fold(0usize, usize::saturating_add);
    let mut cands = alloc::try_with_capacity(queries, "teacher_logits", "the candidates")?;
    for (k, t) in teachers.iter().enumerate() {
        let logits: ArrayView2<'_, f32> = t.logits.index_axis(Axis(0), b);
        let mut push = |q: usize, row: &[f32]| {
            if let Some((class, score)) = candidate(row, t, config.threshold) {
                if let Some(label) = t.map[class] {
                    cands.push(Candidate {
                        score,
                        teacher: k,
                        query: q,
                        label,
                    });
                }
            }
        };
        match logits.as_slice() {
            // C-contiguous (what the Python wrapper passes): plain slices.
            Some(s) if logits.ncols() > 0 => {
                for (q, row) in s.chunks_exact(logits.ncols()).enumerate() {
                    push(q, row);
                }
            }
            _ => {
                let mut scratch =
                    alloc::try_with_capacity(logits.ncols(), "teacher_logits", "a logit row")?;
                for (q, row) in logits.outer_iter().enumerate() {
                    scratch.clear();
                    scratch.extend(row.iter().copied());
                    push(q, &scratch);
                }
            }
        }
    }
    // Descending score; ties: lower teacher, then lower query (scores are finite).
    cands.sort_by(|a, c| {
        c.score
            .total_cmp(&a.score)
            .then(a.teacher.cmp(&c.teacher))
            .then(a.query.cmp(&c.query))
    });
    if let Some(iou) = config.nms_iou {
        cands = dedupe(teachers, b, cands, iou)?;
    }
    cands.truncate(config.top_n);
    if cands.capacity() > 2 * cands.len() + 16 {
        // keep only what is used until the batch is assembled (room was made for every query)
        let n = cands.len();
        return alloc::try_collect(cands, n, "teacher_logits", "the candidates");
    }
    Ok(cands)
}

/// Class-aware greedy NMS (`boxes::batched_nms`, union labels, f64 xyxy boxes) over candidates
/// already in output order. Its stable sort keeps our tie order, so the result stays in order.
fn dedupe(
    teachers: &[Teacher<'_>],
    b: usize,
    cands: Vec<Candidate>,
    iou: f64,
) -> KaResult<Vec<Candidate>> {
    if cands.len() < 2 {
        return Ok(cands);
    }
    let n = cands.len();
    const WHAT: &str = "the NMS buffers";
    let flat = alloc::try_zeroed::<f64>(n.saturating_mul(4), "teacher_boxes", WHAT)?;
    let mut xyxy = Array2::from_shape_vec((n, 4), flat)
        .map_err(|e| KaError::invalid("teacher_boxes", format!("internal shape error: {e}")))?;
    for (mut row, c) in xyxy.outer_iter_mut().zip(&cands) {
        let bx = teachers[c.teacher].boxes.index_axis(Axis(0), b);
        let bx = bx.row(c.query);
        let (cx, cy, w, h) = (
            f64::from(bx[0]),
            f64::from(bx[1]),
            f64::from(bx[2]),
            f64::from(bx[3]),
        );
        row.assign(&ArrayView1::from(&[
            cx - 0.5 * w,
            cy - 0.5 * h,
            cx + 0.5 * w,
            cy + 0.5 * h,
        ]));
    }
    let scores = Array1::from(alloc::try_collect(
        cands.iter().map(|c| c.score),
        n,
        "teacher_logits",
        WHAT,
    )?);
    let labels = Array1::from(alloc::try_collect(
        cands.iter().map(|c| c.label as i64),
        n,
        "teacher_logits",
        WHAT,
    )?);
    let keep = boxes::batched_nms(xyxy.view(), scores.view(), labels.view(), iou)?;
    let kept = keep.len();
    alloc::try_collect(
        keep.into_iter().map(|i| cands[i]),
        kept,
        "teacher_logits",
        WHAT,
    )
}

/// Gather the selected candidates of every image into the flat output.
fn assemble(
    teachers: &[Teacher<'_>],
    per_image: &[Vec<Candidate>],
    config: &PseudoTargetConfig,
) -> KaResult<PseudoTargets> {
    let total: usize = per_image.iter().map(Vec::len).sum();
    let width = config.soft_width();
    let background = config.num_union_classes;
    // (M, |U| + 1) soft logits: |U| is a user value, so the size is checked and the buffers
    // allocated fallibly
    const ARG: &str = "num_union_classes";
    const WHAT: &str = "the pseudo-targets";
    let soft = alloc::checked_len::<f32>(&[total, width], ARG, "the soft logits")?;
    let mut out = PseudoTargets {
        labels: alloc::try_with_capacity(total, ARG, WHAT)?,
        boxes: alloc::try_with_capacity(total, ARG, WHAT)?,
        soft_logits: alloc::try_filled(soft, config.fill_logit, ARG, "the soft logits")?,
        scores: alloc::try_with_capacity(total, ARG, WHAT)?,
        teacher: alloc::try_with_capacity(total, ARG, WHAT)?,
        counts: alloc::try_with_capacity(per_image.len(), ARG, WHAT)?,
    };
    let mut m = 0usize;
    for (b, cands) in per_image.iter().enumerate() {
        out.counts.push(cands.len() as i64);
        for c in cands {
            let t = &teachers[c.teacher];
            let bx = t.boxes.index_axis(Axis(0), b);
            let bx = bx.row(c.query);
            let logits = t.logits.index_axis(Axis(0), b);
            let logits = logits.row(c.query);
            let row = &mut out.soft_logits[m * width..(m + 1) * width];
            for (u, &v) in t.map.iter().zip(logits.iter()) {
                if let Some(u) = *u {
                    row[u] = v;
                }
            }
            if t.kind == TeacherKind::Softmax {
                row[background] = logits[t.map.len()];
            }
            out.labels.push(c.label as i64);
            out.boxes.push([bx[0], bx[1], bx[2], bx[3]]);
            out.scores.push(c.score as f32);
            out.teacher.push(c.teacher as i64);
            m += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, Array1, Array3};

    fn cfg(union: i64, threshold: f64, top_n: i64, nms: Option<f64>) -> PseudoTargetConfig {
        PseudoTargetConfig::new(union, threshold, top_n, -5.0, nms).unwrap()
    }

    fn teacher<'a>(
        logits: &'a Array3<f32>,
        boxes: &'a Array3<f32>,
        map: &'a Array1<i64>,
        kind: TeacherKind,
    ) -> TeacherOutputs<'a> {
        TeacherOutputs {
            logits: logits.view(),
            boxes: boxes.view(),
            local_to_union: map.view(),
            kind,
        }
    }

    fn boxes_of(b: usize, q: usize) -> Array3<f32> {
        Array3::from_shape_fn((b, q, 4), |(i, j, c)| match c {
            0 => 0.1 + 0.05 * j as f32 + 0.01 * i as f32,
            1 => 0.5,
            _ => 0.04,
        })
    }

    #[test]
    fn softmax_candidates_remap_and_background() {
        // One image, 3 queries, teacher with 2 classes mapped to union {2, 0}, |U| = 3.
        let logits = Array3::from_shape_vec(
            (1, 3, 3),
            vec![
                5.0, 0.0, 0.0, // class 0 wins with p ~ 0.987
                0.0, 0.0, 5.0, // background wins: not a candidate
                0.0, 2.0, 1.0, // class 1 wins with p ~ 0.665
            ],
        )
        .unwrap();
        let boxes = boxes_of(1, 3);
        let map = arr1(&[2i64, 0]);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t], &cfg(3, 0.1, 50, None)).unwrap();
        assert_eq!(out.counts, vec![2]);
        assert_eq!(out.labels, vec![2, 0]);
        assert_eq!(out.teacher, vec![0, 0]);
        assert_eq!(out.boxes[0], [0.1, 0.5, 0.04, 0.04]);
        assert_eq!(out.boxes[1], [0.2, 0.5, 0.04, 0.04]);
        let p0 = 1.0 / (1.0 + 2.0 * (-5.0f64).exp());
        assert!((f64::from(out.scores[0]) - p0).abs() < 1e-6);
        // Soft row: union [c0, c1, c2, bg] = [local1, fill, local0, bg].
        assert_eq!(&out.soft_logits[0..4], &[0.0, -5.0, 5.0, 0.0]);
        assert_eq!(&out.soft_logits[4..8], &[2.0, -5.0, 0.0, 1.0]);
    }

    #[test]
    fn non_class_slots_never_become_candidates_and_keep_the_softmax() {
        // Softmax teacher with 3 slots, slot 1 a non-class slot (-1), |U| = 2.
        let logits = Array3::from_shape_vec(
            (1, 3, 4),
            vec![
                0.0, 6.0, 0.0, 0.0, // the non-class slot wins: class 0 / 2 at p ~ 0.0025
                1.0, 6.0, 3.0, 0.0, // class 2 is the best real class, p = e^3 / sum
                0.0, 0.0, 0.0, 9.0, // background
            ],
        )
        .unwrap();
        let boxes = boxes_of(1, 3);
        let map = arr1(&[0i64, -1, 1]);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t], &cfg(2, 0.01, 50, None)).unwrap();
        assert_eq!(out.counts, vec![1]);
        assert_eq!(out.labels, vec![1]);
        let denom = 1f64.exp() + 6f64.exp() + 3f64.exp() + 1.0;
        let p = 3f64.exp() / denom; // the teacher's own softmax, non-class slot included
        assert!((f64::from(out.scores[0]) - p).abs() < 1e-6);
        // Soft row [u0, u1, bg]: the non-class slot's logit is not written anywhere.
        assert_eq!(&out.soft_logits[0..3], &[1.0, 3.0, 0.0]);
        // A sigmoid teacher: the non-class slot's large logit is ignored too.
        let sig = Array3::from_shape_vec((1, 1, 3), vec![-1.0, 8.0, -3.0]).unwrap();
        let b1 = boxes_of(1, 1);
        let t = teacher(&sig, &b1, &map, TeacherKind::Sigmoid);
        let out = build_pseudo_targets(&[t], &cfg(2, 0.2, 50, None)).unwrap();
        assert_eq!(out.labels, vec![0]);
        assert!((f64::from(out.scores[0]) - 1.0 / (1.0 + 1f64.exp())).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_teacher_keeps_fill_on_background() {
        let logits = Array3::from_shape_vec((1, 2, 2), vec![-3.0, 1.0, -4.0, -5.0]).unwrap();
        let boxes = boxes_of(1, 2);
        let map = arr1(&[1i64, 3]);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Sigmoid);
        let out = build_pseudo_targets(&[t], &cfg(4, 0.3, 50, Some(0.7))).unwrap();
        // Query 1: sigmoid(-4) ~ 0.018 < 0.3, dropped.
        assert_eq!(out.counts, vec![1]);
        assert_eq!(out.labels, vec![3]);
        assert_eq!(&out.soft_logits, &[-5.0, -3.0, -5.0, 1.0, -5.0]);
        let p = 1.0 / (1.0 + (-1.0f64).exp());
        assert!((f64::from(out.scores[0]) - p).abs() < 1e-6);
    }

    #[test]
    fn threshold_is_strict() {
        // Sigmoid of 0 is exactly 0.5: not > 0.5.
        let logits = Array3::from_shape_vec((1, 1, 1), vec![0.0]).unwrap();
        let boxes = boxes_of(1, 1);
        let map = arr1(&[0i64]);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Sigmoid);
        assert_eq!(
            build_pseudo_targets(&[t], &cfg(1, 0.5, 5, None))
                .unwrap()
                .len(),
            0
        );
        assert_eq!(
            build_pseudo_targets(&[t], &cfg(1, 0.49, 5, None))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn top_n_order_and_ties() {
        // Two identical sigmoid teachers on disjoint classes: equal scores tie-break by
        // teacher, then query. Scores: q0 < q1 == q2.
        let logits = Array3::from_shape_vec((1, 3, 1), vec![1.0, 2.0, 2.0]).unwrap();
        let boxes = boxes_of(1, 3);
        let m0 = arr1(&[0i64]);
        let m1 = arr1(&[1i64]);
        let t0 = teacher(&logits, &boxes, &m0, TeacherKind::Sigmoid);
        let t1 = teacher(&logits, &boxes, &m1, TeacherKind::Sigmoid);
        let out = build_pseudo_targets(&[t0, t1], &cfg(2, 0.1, 5, Some(0.5))).unwrap();
        assert_eq!(out.teacher, vec![0, 0, 1, 1, 0]);
        assert_eq!(out.labels, vec![0, 0, 1, 1, 0]);
        assert_eq!(out.boxes[0][0], out.boxes[2][0]);
        assert!(out.boxes[0][0] < out.boxes[1][0]); // q1 before q2
        let out = build_pseudo_targets(&[t0, t1], &cfg(2, 0.1, 3, None)).unwrap();
        assert_eq!(out.counts, vec![3]);
        assert_eq!(out.teacher, vec![0, 0, 1]);
        let out = build_pseudo_targets(&[t0, t1], &cfg(2, 0.1, 0, None)).unwrap();
        assert_eq!(out.counts, vec![0]);
        assert!(out.is_empty());
    }

    #[test]
    fn nms_merges_overlapping_teachers_before_top_n() {
        // Two teachers share union class 0 and see the same object (same box); teacher 1 is
        // more confident. Teacher 0 also sees a second, separate object of class 0.
        let l0 = Array3::from_shape_vec((1, 2, 2), vec![3.0, 0.0, 2.0, 0.0]).unwrap();
        let l1 = Array3::from_shape_vec((1, 1, 2), vec![6.0, 0.0]).unwrap();
        let b0 = Array3::from_shape_vec((1, 2, 4), vec![0.3, 0.3, 0.2, 0.2, 0.7, 0.7, 0.2, 0.2])
            .unwrap();
        let b1 = Array3::from_shape_vec((1, 1, 4), vec![0.31, 0.3, 0.2, 0.2]).unwrap();
        let m0 = arr1(&[0i64]);
        let m1 = arr1(&[0i64]);
        let t0 = teacher(&l0, &b0, &m0, TeacherKind::Softmax);
        let t1 = teacher(&l1, &b1, &m1, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t0, t1], &cfg(1, 0.1, 2, Some(0.7))).unwrap();
        assert_eq!(out.counts, vec![2]);
        assert_eq!(out.teacher, vec![1, 0]);
        assert_eq!(out.boxes[1], [0.7, 0.7, 0.2, 0.2]);
        // Without NMS the duplicate eats the budget.
        let out = build_pseudo_targets(&[t0, t1], &cfg(1, 0.1, 2, None)).unwrap();
        assert_eq!(out.teacher, vec![1, 0]);
        assert_eq!(out.boxes[1], [0.3, 0.3, 0.2, 0.2]);
        // Different union classes are never merged.
        let m1b = arr1(&[1i64]);
        let t1b = teacher(&l1, &b1, &m1b, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t0, t1b], &cfg(2, 0.1, 5, Some(0.7))).unwrap();
        assert_eq!(out.counts, vec![3]);
    }

    #[test]
    fn batch_counts_and_parallel_path_match_sequential() {
        // Deterministic pseudo-random logits, large enough to take the parallel path.
        let (b, q, c) = (64, 100, 20);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let logits = Array3::from_shape_fn((b, q, c + 1), |_| 6.0 * next() - 3.0);
        let boxes = Array3::from_shape_fn((b, q, 4), |(_, _, j)| {
            if j < 2 {
                0.2 + 0.6 * next()
            } else {
                0.05 + 0.3 * next()
            }
        });
        let map = Array1::from_iter(0..c as i64);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        assert!(logits.len() >= pool::PARALLEL_MIN_WORK);
        let config = cfg(c as i64, 0.2, 7, Some(0.5));
        let all = build_pseudo_targets(&[t], &config).unwrap();
        assert_eq!(all.counts.len(), b);
        assert_eq!(all.counts.iter().sum::<i64>() as usize, all.len());
        // Image by image (small, sequential path) gives the same rows.
        let mut start = 0usize;
        for i in 0..b {
            let li = logits.slice(ndarray::s![i..i + 1, .., ..]);
            let bi = boxes.slice(ndarray::s![i..i + 1, .., ..]);
            let ti = TeacherOutputs {
                logits: li,
                boxes: bi,
                local_to_union: map.view(),
                kind: TeacherKind::Softmax,
            };
            let one = build_pseudo_targets(&[ti], &config).unwrap();
            let n = one.len();
            assert!(n <= 7);
            assert_eq!(&all.labels[start..start + n], &one.labels[..]);
            assert_eq!(&all.scores[start..start + n], &one.scores[..]);
            assert!(one.scores.windows(2).all(|w| w[0] >= w[1]));
            start += n;
        }
    }

    #[test]
    fn strided_views_match_contiguous() {
        // (Q, B, K) storage viewed as (B, Q, K): not C-contiguous.
        let (b, q, c) = (3, 7, 4);
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let lt = Array3::from_shape_fn((q, b, c + 1), |_| 4.0 * next() - 2.0);
        let bt = Array3::from_shape_fn((q, b, 4), |_| 0.1 + 0.5 * next());
        let lv = lt.view().permuted_axes([1, 0, 2]);
        let bv = bt.view().permuted_axes([1, 0, 2]);
        assert!(lv.as_slice().is_none() && bv.as_slice().is_none());
        let lc = Array3::from_shape_vec(lv.dim(), lv.iter().copied().collect()).unwrap();
        let bc = Array3::from_shape_vec(bv.dim(), bv.iter().copied().collect()).unwrap();
        assert!(lc.is_standard_layout() && bc.is_standard_layout());
        let map = Array1::from_iter(0..c as i64);
        let config = cfg(c as i64, 0.1, 50, Some(0.5));
        let strided = TeacherOutputs {
            logits: lv,
            boxes: bv,
            local_to_union: map.view(),
            kind: TeacherKind::Softmax,
        };
        let contiguous = teacher(&lc, &bc, &map, TeacherKind::Softmax);
        let a = build_pseudo_targets(&[strided], &config).unwrap();
        let z = build_pseudo_targets(&[contiguous], &config).unwrap();
        assert!(!a.is_empty());
        assert_eq!(a, z);
        // Negative sizes are located in strided boxes too.
        let mut bt2 = bt.clone();
        bt2[[5, 2, 3]] = -1.0; // (q=5, b=2) in storage order
        let strided = TeacherOutputs {
            boxes: bt2.view().permuted_axes([1, 0, 2]),
            ..strided
        };
        let e = err_of(build_pseudo_targets(&[strided], &config));
        assert!(e.contains("box [2, 5]"), "{e}");
        let mut lt2 = lt.clone();
        lt2[[6, 1, 2]] = f32::NEG_INFINITY;
        let strided = TeacherOutputs {
            logits: lt2.view().permuted_axes([1, 0, 2]),
            ..strided
        };
        let e = err_of(build_pseudo_targets(&[strided], &config));
        assert!(e.contains("-inf at [1, 6, 2]"), "{e}");
    }

    fn err_of(r: KaResult<PseudoTargets>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn invalid_inputs_name_the_argument() {
        let logits = Array3::<f32>::zeros((2, 3, 3));
        let boxes = boxes_of(2, 3);
        let map = arr1(&[0i64, 1]);
        let good = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        let c = cfg(2, 0.1, 5, None);

        assert!(err_of(build_pseudo_targets(&[], &c)).starts_with("teacher_logits:"));

        let other_b = Array3::<f32>::zeros((3, 3, 3));
        let boxes3 = boxes_of(3, 3);
        let t = teacher(&other_b, &boxes3, &map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[good, t], &c)).starts_with("teacher_logits[1]:"));

        let short = boxes_of(2, 2);
        let t = teacher(&logits, &short, &map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[good, t], &c)).starts_with("teacher_boxes[1]:"));

        let t = teacher(&logits, &boxes, &map, TeacherKind::Sigmoid);
        let e = err_of(build_pseudo_targets(&[t], &c));
        assert!(
            e.starts_with("teacher_logits[0]:") && e.contains("needs 2 logits"),
            "{e}"
        );

        let bad_map = arr1(&[0i64, 2]);
        let t = teacher(&logits, &boxes, &bad_map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).starts_with("local_to_union[0]:"));
        let neg_map = arr1(&[-2i64, 0]);
        let t = teacher(&logits, &boxes, &neg_map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).starts_with("local_to_union[0]:"));
        let no_class_map = arr1(&[-1i64, -1]);
        let t = teacher(&logits, &boxes, &no_class_map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).contains("at least one class"));
        let dup_map = arr1(&[1i64, 1]);
        let t = teacher(&logits, &boxes, &dup_map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).contains("more than once"));
        let empty_map = Array1::<i64>::zeros(0);
        let one = Array3::<f32>::zeros((2, 3, 1));
        let t = teacher(&one, &boxes, &empty_map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).starts_with("local_to_union[0]:"));

        let mut nan = logits.clone();
        nan[[1, 2, 0]] = f32::NAN;
        let t = teacher(&nan, &boxes, &map, TeacherKind::Softmax);
        let e = err_of(build_pseudo_targets(&[good, t], &c));
        assert!(
            e.starts_with("teacher_logits[1]:") && e.contains("non-finite"),
            "{e}"
        );
        let mut inf = boxes.clone();
        inf[[0, 0, 0]] = f32::INFINITY;
        let t = teacher(&logits, &inf, &map, TeacherKind::Softmax);
        assert!(err_of(build_pseudo_targets(&[t], &c)).starts_with("teacher_boxes[0]:"));
        let mut neg = boxes.clone();
        neg[[1, 2, 3]] = -0.1;
        let t = teacher(&logits, &neg, &map, TeacherKind::Softmax);
        let e = err_of(build_pseudo_targets(&[t], &c));
        assert!(
            e.starts_with("teacher_boxes[0]:") && e.contains("[1, 2]"),
            "{e}"
        );
    }

    #[test]
    fn oversized_inputs_are_errors_not_aborts() {
        let logits = Array3::<f32>::zeros((2, 3, 3));
        let boxes = boxes_of(2, 3);
        let map = arr1(&[0i64, 1]);
        let good = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        // a union label space of 2^60 classes: its table cannot be allocated
        let c = cfg(1 << 60, 0.1, 5, None);
        let e = build_pseudo_targets(&[good], &c).unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        assert!(e.to_string().starts_with("num_union_classes:"), "{e}");
        // a broadcast teacher with 2^54 queries per image: refused before the scan (room for
        // its candidates would take 2^59 bytes, beyond any address space)
        let q = 1 << 54;
        let row = arr1(&[2.0f32, 0.0, -1.0]);
        let big = row.broadcast((2, q, 3)).unwrap();
        let bx = arr1(&[0.5f32, 0.5, 0.1, 0.1]);
        let big_boxes = bx.broadcast((2, q, 4)).unwrap();
        let t = TeacherOutputs {
            logits: big,
            boxes: big_boxes,
            local_to_union: map.view(),
            kind: TeacherKind::Softmax,
        };
        let e = build_pseudo_targets(&[t], &cfg(2, 0.1, 5, None)).unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
        // a small broadcast teacher gives what its copy gives
        let small = row.broadcast((2, 4, 3)).unwrap();
        let small_boxes = bx.broadcast((2, 4, 4)).unwrap();
        let (lo, bo) = (small.to_owned(), small_boxes.to_owned());
        let t = TeacherOutputs {
            logits: small,
            boxes: small_boxes,
            local_to_union: map.view(),
            kind: TeacherKind::Softmax,
        };
        let c = cfg(2, 0.1, 3, Some(0.5));
        let copy = teacher(&lo, &bo, &map, TeacherKind::Softmax);
        assert_eq!(
            build_pseudo_targets(&[t], &c).unwrap(),
            build_pseudo_targets(&[copy], &c).unwrap()
        );
    }

    #[test]
    fn invalid_config_names_the_argument() {
        let e = |r: KaResult<PseudoTargetConfig>| r.unwrap_err().to_string();
        assert!(e(PseudoTargetConfig::new(0, 0.1, 5, -5.0, None)).starts_with("num_union_classes:"));
        assert!(e(PseudoTargetConfig::new(2, 1.0, 5, -5.0, None)).starts_with("threshold:"));
        assert!(e(PseudoTargetConfig::new(2, -0.1, 5, -5.0, None)).starts_with("threshold:"));
        assert!(e(PseudoTargetConfig::new(2, f64::NAN, 5, -5.0, None)).starts_with("threshold:"));
        assert!(e(PseudoTargetConfig::new(2, 0.1, -1, -5.0, None)).starts_with("top_n:"));
        assert!(e(PseudoTargetConfig::new(2, 0.1, 5, f64::NAN, None)).starts_with("fill_logit:"));
        assert!(e(PseudoTargetConfig::new(2, 0.1, 5, 1e300, None)).starts_with("fill_logit:"));
        assert!(e(PseudoTargetConfig::new(2, 0.1, 5, -5.0, Some(1.5))).starts_with("nms_iou:"));
        assert!(e(PseudoTargetConfig::new(2, 0.1, 5, -5.0, Some(f64::NAN))).starts_with("nms_iou:"));
        assert!(PseudoTargetConfig::new(2, 0.0, 0, -5.0, Some(1.0)).is_ok());
        assert!(TeacherKind::parse("softmax", "k").is_ok());
        assert_eq!(TeacherKind::parse("focal", "k"), Ok(TeacherKind::Sigmoid));
        assert!(TeacherKind::parse("relu", "teacher_kinds[2]")
            .unwrap_err()
            .to_string()
            .starts_with("teacher_kinds[2]:"));
    }

    #[test]
    fn empty_batch_and_no_queries() {
        let logits = Array3::<f32>::zeros((0, 3, 2));
        let boxes = boxes_of(0, 3);
        let map = arr1(&[0i64]);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t], &cfg(1, 0.1, 5, Some(0.7))).unwrap();
        assert!(out.counts.is_empty() && out.is_empty());
        let logits = Array3::<f32>::zeros((2, 0, 2));
        let boxes = boxes_of(2, 0);
        let t = teacher(&logits, &boxes, &map, TeacherKind::Softmax);
        let out = build_pseudo_targets(&[t], &cfg(1, 0.1, 5, Some(0.7))).unwrap();
        assert_eq!(out.counts, vec![0, 0]);
    }
}
