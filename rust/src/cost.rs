//! DETR matching costs for one image: only that image's own Q×T block, never the
//! batch-wide [B·Q, ΣT] matrix.
//!
//! cost[q, t] = w_bbox·L1(pred_q, tgt_t) + w_class·class(q, label_t) − w_giou·GIoU(pred_q, tgt_t)
//!
//! - L1 on normalised `cxcywh`; GIoU on `xyxy` (boxes converted once per query / target);
//! - class cost `softmax`: −softmax(logits_q)[label] (K = C + 1 logits, last = no-object);
//! - class cost `focal` (Deformable DETR & co., K = C logits), with p = sigmoid(logit):
//!   α(1−p)^γ·(−ln(p+1e-8)) − (1−α)p^γ·(−ln(1−p+1e-8)).
//!
//! The arithmetic is f32 (as in the PyTorch matchers), laid out so the inner loops vectorise:
//! predictions are turned into structure-of-arrays once per image, the block is built
//! target-major (row t holds all Q queries, which is also the orientation the solver wants
//! when T ≤ Q), the class cost is computed once per *distinct* label (the softmax for eight
//! queries at a time), and exp / ln use vectorisable approximations (relative error ≤ 4e-7,
//! a few f32 ulp: below the f32 noise of the costs). The block stays f32; the solver widens
//! each entry to f64 (exactly) as it reads it.

use crate::alloc;
use crate::error::{KaError, KaResult};

/// Which class cost to use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClassCost {
    /// −softmax(logits)[label]; K = C + 1 (last logit = no-object).
    Softmax,
    /// Sigmoid focal cost; K = C.
    Focal { alpha: f32, gamma: f32 },
}

impl ClassCost {
    /// Parse `"softmax"` / `"focal"` (errors name `class_cost`, `focal_alpha`, `focal_gamma`).
    /// The focal parameters are checked whatever the kind: a NaN is never silently accepted.
    pub fn parse(kind: &str, focal_alpha: f64, focal_gamma: f64) -> KaResult<Self> {
        if !(focal_alpha as f32).is_finite() {
            return Err(KaError::invalid(
                "focal_alpha",
                format!("must be a finite float32 value, got {focal_alpha}"),
            ));
        }
        if !((focal_gamma as f32).is_finite() && focal_gamma >= 0.0) {
            return Err(KaError::invalid(
                "focal_gamma",
                format!("must be finite and >= 0, got {focal_gamma}"),
            ));
        }
        match kind {
            "softmax" => Ok(ClassCost::Softmax),
            "focal" | "sigmoid" => Ok(ClassCost::Focal {
                alpha: focal_alpha as f32,
                gamma: focal_gamma as f32,
            }),
            _ => Err(KaError::invalid(
                "class_cost",
                format!("expected 'softmax' or 'focal', got {kind:?}"),
            )),
        }
    }

    /// Number of labels a K-logit head can be matched to: K−1 for softmax, K for focal.
    pub fn num_classes(self, k: usize) -> usize {
        match self {
            ClassCost::Softmax => k.saturating_sub(1),
            ClassCost::Focal { .. } => k,
        }
    }
}

/// Weights and class-cost kind of a matcher.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostParams {
    pub cost_class: f32,
    pub cost_bbox: f32,
    pub cost_giou: f32,
    pub class_cost: ClassCost,
}

impl CostParams {
    /// Validated parameters (weights must be finite; errors name the argument).
    pub fn new(
        cost_class: f64,
        cost_bbox: f64,
        cost_giou: f64,
        class_cost: ClassCost,
    ) -> KaResult<Self> {
        for (name, w) in [
            ("cost_class", cost_class),
            ("cost_bbox", cost_bbox),
            ("cost_giou", cost_giou),
        ] {
            if !w.is_finite() {
                return Err(KaError::invalid(name, format!("must be finite, got {w}")));
            }
            // the costs are f32: a weight beyond its range would make them all inf
            if !(w as f32).is_finite() {
                return Err(KaError::invalid(
                    name,
                    format!("{w} is beyond float32's range (the costs are float32)"),
                ));
            }
        }
        Ok(CostParams {
            cost_class: cost_class as f32,
            cost_bbox: cost_bbox as f32,
            cost_giou: cost_giou as f32,
            class_cost,
        })
    }

    /// DETR: softmax class cost, weights 1 / 5 / 2.
    pub fn detr() -> Self {
        CostParams {
            cost_class: 1.0,
            cost_bbox: 5.0,
            cost_giou: 2.0,
            class_cost: ClassCost::Softmax,
        }
    }

    /// Deformable DETR: focal class cost (α 0.25, γ 2), weights 2 / 5 / 2.
    pub fn deformable() -> Self {
        CostParams {
            cost_class: 2.0,
            cost_bbox: 5.0,
            cost_giou: 2.0,
            class_cost: ClassCost::Focal {
                alpha: 0.25,
                gamma: 2.0,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// vectorisable f32 math

#[inline(always)]
fn sel(c: bool, a: f32, b: f32) -> f32 {
    if c {
        a
    } else {
        b
    }
}

#[inline(always)]
fn mn(a: f32, b: f32) -> f32 {
    sel(a < b, a, b)
}

#[inline(always)]
fn mx(a: f32, b: f32) -> f32 {
    sel(a > b, a, b)
}

/// e^x for finite or infinite x (clamped to [-87.3, 88]); relative error ≈ 1e-7.
/// Cody–Waite range reduction + Cephes `expf` polynomial; branch-free so that it vectorises.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = sel(x < -87.3, -87.3, sel(x > 88.0, 88.0, x));
    let y = x * LOG2E + MAGIC;
    let n_bits = y.to_bits() as i32 - MAGIC.to_bits() as i32; // round(x*log2e) as an integer
    let n = y - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r2 + r + 1.0;
    // 2^n with n in [-126, 128): build the exponent field directly.
    e * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// ln(x) for normal positive x (the callers guarantee x ≥ 1e-8); relative error ≈ 1e-7.
/// Cephes `logf` polynomial, branch-free.
#[inline(always)]
pub fn fast_ln(x: f32) -> f32 {
    const SQRT2: f32 = std::f32::consts::SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000); // [1, 2)
    let big = m > SQRT2;
    let m = sel(big, m * 0.5, m);
    e += big as i32;
    let f = m - 1.0;
    let z = f * f;
    let mut y = ((((((((7.037_683_6e-2 * f - 1.151_461e-1) * f + 1.167_699_9e-1) * f
        - 1.242_014_1e-1)
        * f
        + 1.424_932_3e-1)
        * f
        - 1.666_805_8e-1)
        * f
        + 2.000_071_4e-1)
        * f
        - 2.499_999_4e-1)
        * f
        + 3.333_333e-1)
        * f
        * z;
    let ef = e as f32;
    y += -2.121_944_4e-4 * ef;
    y += -0.5 * z;
    f + y + 0.693_359_4 * ef
}

#[inline(always)]
fn powf_gamma(x: f32, gamma: f32, gamma_kind: u8) -> f32 {
    match gamma_kind {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        4 => (x * x) * (x * x),
        _ => x.powf(gamma),
    }
}

// ---------------------------------------------------------------------------------------------
// cost block

const NO_SLOT: u32 = u32::MAX;

/// Reusable buffers for building cost blocks (one per thread).
#[derive(Debug, Default, Clone)]
pub struct CostWorkspace {
    // predictions as structure-of-arrays: cx, cy, w, h, x1, y1, x2, y2, area
    soa: [Vec<f32>; 9],
    /// per distinct label: that label's class cost for every query, U×Q
    class_rows: Vec<f32>,
    /// label -> slot in `class_rows` (size ≥ K, all NO_SLOT between calls)
    slot_of_label: Vec<u32>,
    labels_u: Vec<usize>,
    slot_of_target: Vec<usize>,
    buf: Vec<f32>,
    /// the block, row-major T×Q (row t = target t)
    pub cost: Vec<f32>,
}

impl CostWorkspace {
    pub fn new() -> Self {
        Self::default()
    }
}

/// Where a block comes from, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct BlockId {
    pub layer: usize,
    pub image: usize,
}

/// Build the cost block of one image into `ws.cost`, row-major **T×Q** (row t = target t).
///
/// - `logits`: Q×K row-major f32; `boxes`: Q×4 `cxcywh`;
/// - `labels`: T labels, already checked to be `< params.class_cost.num_classes(k)`;
/// - `tboxes`: T×4 `cxcywh`, already checked finite with w, h ≥ 0.
///
/// Checks the predictions: non-finite logits → error naming `pred_logits`; non-finite boxes
/// or negative width / height → error naming `pred_boxes` (with layer / image / query).
#[allow(clippy::too_many_arguments)]
pub fn build_block(
    ws: &mut CostWorkspace,
    logits: &[f32],
    k: usize,
    boxes: &[f32],
    labels: &[usize],
    tboxes: &[f32],
    params: &CostParams,
    id: BlockId,
) -> KaResult<()> {
    build_block_impl(ws, logits, k, boxes, labels, tboxes, params, id, use_avx2())
}

/// True when the CPU has AVX2 and FMA: the hot loops then use the 8-lane kernels of
/// [`avx2`]. Checked once.
#[inline]
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[allow(clippy::too_many_arguments)]
fn build_block_impl(
    ws: &mut CostWorkspace,
    logits: &[f32],
    k: usize,
    boxes: &[f32],
    labels: &[usize],
    tboxes: &[f32],
    params: &CostParams,
    id: BlockId,
    simd: bool,
) -> KaResult<()> {
    let q = boxes.len() / 4;
    let t = labels.len();
    debug_assert_eq!(logits.len(), q * k);
    debug_assert_eq!(tboxes.len(), t * 4);
    // Every buffer is sized by the input (Q, T, K): allocated fallibly, so a block too large
    // for memory is an error (MemoryError in Python), never an abort.
    const ARG: &str = "pred_boxes/target_boxes";
    const WHAT: &str = "the cost block";
    let named = |e: KaError| match e {
        KaError::OutOfMemory { bytes, .. } => KaError::OutOfMemory {
            what: format!(
                "{ARG}: the {t}x{q} cost block of layer {}, image {}",
                id.layer, id.image
            ),
            bytes,
        },
        other => other,
    };
    fill_pred_soa(ws, boxes, id)?;
    // distinct labels -> slots
    if ws.slot_of_label.len() < k {
        alloc::try_resize(
            &mut ws.slot_of_label,
            k,
            NO_SLOT,
            "pred_logits",
            "a label table",
        )?;
    }
    ws.labels_u.clear();
    ws.slot_of_target.clear();
    alloc::try_reserve_to(&mut ws.labels_u, t.min(k), ARG, WHAT).map_err(named)?;
    alloc::try_reserve_to(&mut ws.slot_of_target, t, ARG, WHAT).map_err(named)?;
    for &lab in labels {
        let s = &mut ws.slot_of_label[lab];
        if *s == NO_SLOT {
            *s = ws.labels_u.len() as u32;
            ws.labels_u.push(lab);
        }
        ws.slot_of_target.push(*s as usize);
    }
    for &lab in &ws.labels_u {
        ws.slot_of_label[lab] = NO_SLOT;
    }
    let nu = ws.labels_u.len();
    let rows = alloc::checked_len::<f32>(&[nu, q], ARG, WHAT)?;
    // every entry is overwritten below
    alloc::try_resize(&mut ws.class_rows, rows, 0.0, ARG, WHAT).map_err(named)?;
    match params.class_cost {
        ClassCost::Softmax => softmax_rows(ws, logits, k, q, id, simd)?,
        ClassCost::Focal { alpha, gamma } => {
            check_finite(logits, k, id)?;
            focal_rows(ws, logits, k, q, alpha, gamma, simd);
        }
    }
    // assemble T×Q
    let len = alloc::checked_len::<f32>(&[t, q], ARG, WHAT)?;
    // every entry is overwritten below
    alloc::try_resize(&mut ws.cost, len, 0.0, ARG, WHAT).map_err(named)?;
    let wts = [params.cost_class, params.cost_bbox, params.cost_giou];
    let [cx, cy, w, h, x1, y1, x2, y2, area] = &ws.soa;
    let pred = Preds {
        cx: &cx[..q],
        cy: &cy[..q],
        w: &w[..q],
        h: &h[..q],
        x1: &x1[..q],
        y1: &y1[..q],
        x2: &x2[..q],
        y2: &y2[..q],
        area: &area[..q],
    };
    for (ti, out) in ws.cost.chunks_exact_mut(q.max(1)).take(t).enumerate() {
        let tb = &tboxes[ti * 4..ti * 4 + 4];
        let tgt = Target::new([tb[0], tb[1], tb[2], tb[3]]);
        let slot = ws.slot_of_target[ti];
        let cc = &ws.class_rows[slot * q..slot * q + q];
        let out = &mut out[..q];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: `simd` is true only when the CPU supports AVX2 and FMA.
            unsafe { avx2::block_row(&pred, &tgt, cc, wts, out) };
            continue;
        }
        block_row(&pred, &tgt, cc, wts, out, 0);
    }
    Ok(())
}

/// One image's predictions as structure-of-arrays (all slices of length Q).
struct Preds<'a> {
    cx: &'a [f32],
    cy: &'a [f32],
    w: &'a [f32],
    h: &'a [f32],
    x1: &'a [f32],
    y1: &'a [f32],
    x2: &'a [f32],
    y2: &'a [f32],
    area: &'a [f32],
}

/// One target box in both formats.
struct Target {
    cxcywh: [f32; 4],
    xyxy: [f32; 4],
    area: f32,
}

impl Target {
    fn new(b: [f32; 4]) -> Self {
        let xyxy = [
            b[0] - 0.5 * b[2],
            b[1] - 0.5 * b[3],
            b[0] + 0.5 * b[2],
            b[1] + 0.5 * b[3],
        ];
        let area = (xyxy[2] - xyxy[0]) * (xyxy[3] - xyxy[1]);
        Target {
            cxcywh: b,
            xyxy,
            area,
        }
    }
}

/// Scalar kernel: `out[j] = wb·L1 + wc·cc[j] − wg·GIoU` for queries `from..`.
#[inline(always)]
fn block_row(p: &Preds<'_>, t: &Target, cc: &[f32], wts: [f32; 3], out: &mut [f32], from: usize) {
    let [wc, wb, wg] = wts;
    let [tcx, tcy, tw, th] = t.cxcywh;
    let [tx1, ty1, tx2, ty2] = t.xyxy;
    let tarea = t.area;
    for j in from..out.len() {
        let l1 = (p.cx[j] - tcx).abs()
            + (p.cy[j] - tcy).abs()
            + (p.w[j] - tw).abs()
            + (p.h[j] - th).abs();
        let iw = mx(mn(p.x2[j], tx2) - mx(p.x1[j], tx1), 0.0);
        let ih = mx(mn(p.y2[j], ty2) - mx(p.y1[j], ty1), 0.0);
        let inter = iw * ih;
        let union = p.area[j] + tarea - inter;
        let iou = sel(union > 0.0, inter / union, 0.0);
        let c = (mx(p.x2[j], tx2) - mn(p.x1[j], tx1)) * (mx(p.y2[j], ty2) - mn(p.y1[j], ty1));
        let giou = sel(c > 0.0, iou - (c - union) / c, iou);
        out[j] = wb * l1 + wc * cc[j] - wg * giou;
    }
}

#[inline(always)]
fn fill_pred_soa(ws: &mut CostWorkspace, boxes: &[f32], id: BlockId) -> KaResult<()> {
    let q = boxes.len() / 4;
    for v in ws.soa.iter_mut() {
        // every entry is overwritten below
        alloc::try_resize(v, q, 0.0, "pred_boxes", "a copy of one image's boxes")?;
    }
    let [cx, cy, w, h, x1, y1, x2, y2, area] = &mut ws.soa;
    let mut bad = false;
    for (j, b) in boxes.chunks_exact(4).enumerate() {
        let (bcx, bcy, bw, bh) = (b[0], b[1], b[2], b[3]);
        bad |= !(bcx.is_finite() && bcy.is_finite() && bw.is_finite() && bh.is_finite());
        bad |= bw < 0.0 || bh < 0.0;
        cx[j] = bcx;
        cy[j] = bcy;
        w[j] = bw;
        h[j] = bh;
        x1[j] = bcx - 0.5 * bw;
        y1[j] = bcy - 0.5 * bh;
        x2[j] = bcx + 0.5 * bw;
        y2[j] = bcy + 0.5 * bh;
        area[j] = (x2[j] - x1[j]) * (y2[j] - y1[j]);
    }
    if bad {
        return check_boxes(boxes, id);
    }
    Ok(())
}

fn check_boxes(boxes: &[f32], id: BlockId) -> KaResult<()> {
    for (j, b) in boxes.chunks_exact(4).enumerate() {
        if !b.iter().all(|x| x.is_finite()) {
            return Err(KaError::invalid(
                "pred_boxes",
                format!(
                    "non-finite value at layer {}, image {}, query {j}",
                    id.layer, id.image
                ),
            ));
        }
        if b[2] < 0.0 || b[3] < 0.0 {
            return Err(KaError::invalid(
                "pred_boxes",
                format!(
                    "negative width or height at layer {}, image {}, query {j} \
                     (boxes must be cxcywh)",
                    id.layer, id.image
                ),
            ));
        }
    }
    Ok(())
}

/// Check one image's predictions without building a block (used for images without
/// targets): logits finite, boxes finite with w, h ≥ 0. Errors name `pred_logits` /
/// `pred_boxes`.
pub fn check_predictions(logits: &[f32], k: usize, boxes: &[f32], id: BlockId) -> KaResult<()> {
    check_finite(logits, k, id)?;
    check_boxes(boxes, id)
}

fn logits_error(k: usize, logits: &[f32], id: BlockId) -> KaError {
    let pos = logits.iter().position(|x| !x.is_finite()).unwrap_or(0);
    KaError::invalid(
        "pred_logits",
        format!(
            "non-finite value at layer {}, image {}, query {}",
            id.layer,
            id.image,
            pos / k.max(1)
        ),
    )
}

#[inline(always)]
fn check_finite(logits: &[f32], k: usize, id: BlockId) -> KaResult<()> {
    // x * 0 is NaN exactly for non-finite x; a lane-wise sum vectorises.
    let mut acc = [0.0f32; 8];
    let mut chunks = logits.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l] * 0.0;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|x| x * 0.0).sum();
    if acc.iter().sum::<f32>() + tail == 0.0 {
        Ok(())
    } else {
        Err(logits_error(k, logits, id))
    }
}

/// Softmax class rows: class_rows[u][q] = −softmax(logits_q)[label_u]; also checks finiteness.
fn softmax_rows(
    ws: &mut CostWorkspace,
    logits: &[f32],
    k: usize,
    q: usize,
    id: BlockId,
    simd: bool,
) -> KaResult<()> {
    if k == 0 {
        return Ok(());
    }
    ws.buf.clear();
    // padded rows (the SIMD tail stores 8 lanes); the AVX2 kernel keeps 8 rows at a time
    let width = k
        .checked_next_multiple_of(8)
        .ok_or_else(|| KaError::invalid("pred_logits", format!("K={k} logits is too many")))?;
    let len = alloc::checked_len::<f32>(&[8, width], "pred_logits", "a softmax buffer")?;
    alloc::try_resize(&mut ws.buf, len, 0.0, "pred_logits", "a softmax buffer")?;
    let (labels_u, class_rows, buf) = (&ws.labels_u[..], &mut ws.class_rows[..], &mut ws.buf[..]);
    #[cfg(target_arch = "x86_64")]
    let ok = if simd {
        // SAFETY: `simd` is true only when the CPU supports AVX2 and FMA.
        unsafe { avx2::softmax_rows(logits, k, q, labels_u, class_rows, buf) }
    } else {
        scalar_softmax_rows(logits, k, q, labels_u, class_rows, buf)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let ok = {
        let _ = simd;
        scalar_softmax_rows(logits, k, q, labels_u, class_rows, buf)
    };
    if ok {
        Ok(())
    } else {
        Err(logits_error(k, logits, id))
    }
}

/// Scalar [`softmax_rows`], one query at a time. Returns false on a non-finite logit.
fn scalar_softmax_rows(
    logits: &[f32],
    k: usize,
    q: usize,
    labels_u: &[usize],
    class_rows: &mut [f32],
    buf: &mut [f32],
) -> bool {
    let nu = labels_u.len();
    let class_rows = &mut class_rows[..nu * q];
    for (qi, row) in logits.chunks_exact(k).take(q).enumerate() {
        let Some(sum) = scalar_softmax_denominator(row, buf) else {
            return false;
        };
        let inv = 1.0 / sum;
        for (u, &lab) in labels_u.iter().enumerate() {
            class_rows[u * q + qi] = -(buf[lab] * inv);
        }
    }
    true
}

/// Writes `exp(row - max(row))` into `buf` and returns its sum, or `None` when `row` holds a
/// non-finite value (scalar; `avx2::softmax_denominator` is the 8-lane version).
#[inline(always)]
fn scalar_softmax_denominator(row: &[f32], buf: &mut [f32]) -> Option<f32> {
    let (mut m, mut fin) = (f32::NEG_INFINITY, 0.0f32);
    for &x in row {
        m = mx(x, m);
        fin += x * 0.0;
    }
    if fin != 0.0 || fin.is_nan() {
        return None;
    }
    let mut s = 0.0f32;
    for (b, &x) in buf.iter_mut().zip(row) {
        let e = fast_exp(x - m);
        *b = e;
        s += e;
    }
    Some(s)
}

/// Focal class rows: class_rows[u][q] = focal cost of label_u for query q.
fn focal_rows(
    ws: &mut CostWorkspace,
    logits: &[f32],
    k: usize,
    q: usize,
    alpha: f32,
    gamma: f32,
    simd: bool,
) {
    let gamma_kind: u8 = if gamma == gamma.round() && (0.0..=4.0).contains(&gamma) {
        gamma as u8
    } else {
        u8::MAX
    };
    #[cfg(target_arch = "x86_64")]
    if simd && gamma_kind <= 4 {
        let (labels_u, class_rows) = (&ws.labels_u[..], &mut ws.class_rows[..]);
        // SAFETY: `simd` is true only when the CPU supports AVX2 and FMA.
        unsafe { avx2::focal_rows(logits, k, q, labels_u, class_rows, alpha, gamma_kind) };
        return;
    }
    let _ = simd;
    for (u, &lab) in ws.labels_u.iter().enumerate() {
        let row = &mut ws.class_rows[u * q..(u + 1) * q];
        for (qi, out) in row.iter_mut().enumerate() {
            *out = logits[qi * k + lab];
        }
        focal_inplace(row, alpha, gamma, gamma_kind, 0);
    }
}

/// Scalar kernel: replace logits by their focal class cost, from index `from` on.
#[inline(always)]
fn focal_inplace(xs: &mut [f32], alpha: f32, gamma: f32, gamma_kind: u8, from: usize) {
    for out in xs[from..].iter_mut() {
        let x = *out;
        let p = 1.0 / (1.0 + fast_exp(-x));
        let neg = (1.0 - alpha) * powf_gamma(p, gamma, gamma_kind) * -fast_ln(1.0 - p + 1e-8);
        let pos = alpha * powf_gamma(1.0 - p, gamma, gamma_kind) * -fast_ln(p + 1e-8);
        *out = pos - neg;
    }
}

/// AVX2 + FMA versions of the hot kernels (8 f32 lanes). Same formulas as the scalar
/// kernels; results agree to a few ulp (FMA rounding).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Preds, Target};
    use std::arch::x86_64::*;

    /// Load 8 floats from `s[i..i + 8]` (bounds-checked).
    #[inline(always)]
    fn ld(s: &[f32], i: usize) -> __m256 {
        let s = &s[i..i + 8];
        // SAFETY: `s` holds exactly 8 readable f32 (checked by the slice above); unaligned
        // loads are allowed. Only reached from functions compiled with AVX enabled.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }

    /// Store 8 floats to `s[i..i + 8]` (bounds-checked).
    #[inline(always)]
    fn st(s: &mut [f32], i: usize, v: __m256) {
        let s = &mut s[i..i + 8];
        // SAFETY: `s` holds exactly 8 writable f32 (checked by the slice above).
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }

    #[inline(always)]
    fn splat(x: f32) -> __m256 {
        // SAFETY: AVX register op, only reached with AVX enabled.
        unsafe { _mm256_set1_ps(x) }
    }

    /// 8-lane `fast_exp` (same constants as the scalar one).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, splat(88.0)), splat(-87.3));
        let magic = splat(12_582_912.0);
        let y = _mm256_fmadd_ps(x, splat(std::f32::consts::LOG2_E), magic);
        let n_bits = _mm256_sub_epi32(_mm256_castps_si256(y), _mm256_castps_si256(magic));
        let n = _mm256_sub_ps(y, magic);
        let r = _mm256_fnmadd_ps(n, splat(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, splat(-2.121_944_4e-4), r);
        let r2 = _mm256_mul_ps(r, r);
        let mut p = _mm256_fmadd_ps(splat(1.987_569_1e-4), r, splat(1.398_199_9e-3));
        p = _mm256_fmadd_ps(p, r, splat(8.333_452e-3));
        p = _mm256_fmadd_ps(p, r, splat(4.166_579_6e-2));
        p = _mm256_fmadd_ps(p, r, splat(1.666_666_5e-1));
        p = _mm256_fmadd_ps(p, r, splat(0.5));
        let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), splat(1.0));
        let scale = _mm256_slli_epi32(_mm256_add_epi32(n_bits, _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(e, _mm256_castsi256_ps(scale))
    }

    /// 8-lane `fast_ln` for normal positive inputs.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn ln8(x: __m256) -> __m256 {
        let bits = _mm256_castps_si256(x);
        let e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(127));
        let m = _mm256_castsi256_ps(_mm256_or_si256(
            _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
            _mm256_set1_epi32(0x3f80_0000),
        ));
        let big = _mm256_cmp_ps(m, splat(std::f32::consts::SQRT_2), _CMP_GT_OQ);
        let m = _mm256_blendv_ps(m, _mm256_mul_ps(m, splat(0.5)), big);
        let e = _mm256_sub_epi32(e, _mm256_castps_si256(big)); // big lanes are -1: e += 1
        let f = _mm256_sub_ps(m, splat(1.0));
        let z = _mm256_mul_ps(f, f);
        let mut y = _mm256_fmadd_ps(splat(7.037_683_6e-2), f, splat(-1.151_461e-1));
        y = _mm256_fmadd_ps(y, f, splat(1.167_699_9e-1));
        y = _mm256_fmadd_ps(y, f, splat(-1.242_014_1e-1));
        y = _mm256_fmadd_ps(y, f, splat(1.424_932_3e-1));
        y = _mm256_fmadd_ps(y, f, splat(-1.666_805_8e-1));
        y = _mm256_fmadd_ps(y, f, splat(2.000_071_4e-1));
        y = _mm256_fmadd_ps(y, f, splat(-2.499_999_4e-1));
        y = _mm256_fmadd_ps(y, f, splat(3.333_333e-1));
        y = _mm256_mul_ps(_mm256_mul_ps(y, f), z);
        let ef = _mm256_cvtepi32_ps(e);
        y = _mm256_fmadd_ps(ef, splat(-2.121_944_4e-4), y);
        y = _mm256_fmadd_ps(z, splat(-0.5), y);
        _mm256_fmadd_ps(ef, splat(0.693_359_4), _mm256_add_ps(f, y))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Lane mask selecting the first `n` (< 8) lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tail_mask(n: usize) -> __m256i {
        let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), idx)
    }

    /// Load the `n = s.len() - i` (< 8) trailing floats, zero in the other lanes.
    #[inline(always)]
    fn ld_tail(s: &[f32], i: usize, mask: __m256i) -> __m256 {
        let s = &s[i..];
        debug_assert!(s.len() < 8);
        // SAFETY: maskload reads only the lanes selected by `mask`, which are the first
        // s.len() lanes (see `tail_mask`), all inside `s`. Only reached with AVX enabled.
        unsafe { _mm256_maskload_ps(s.as_ptr(), mask) }
    }

    /// Store the first `n = s.len() - i` (< 8) lanes of `v` to the tail of `s`.
    #[inline(always)]
    fn st_tail(s: &mut [f32], i: usize, mask: __m256i, v: __m256) {
        let s = &mut s[i..];
        debug_assert!(s.len() < 8);
        // SAFETY: maskstore writes only the lanes selected by `mask`, the first s.len()
        // lanes, all inside `s`. Only reached with AVX enabled.
        unsafe { _mm256_maskstore_ps(s.as_mut_ptr(), mask, v) }
    }

    /// Largest logit the unshifted exponentials of [`softmax_rows`] accept (e^60 · K is far
    /// from f32 overflow, and the reduction error of `exp8_bounded` stays ≤ 1.7e-7).
    const UNSHIFTED_MAX: f32 = 60.0;
    /// Smallest softmax denominator accepted unshifted: a row whose largest logit is below
    /// about −46 could lose precision to the −87.3 clamp and is redone with the row max.
    const UNSHIFTED_MIN_SUM: f32 = 1e-20;

    /// Eight row sums at once: `out[r] = Σ lanes of v[r]`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum_rows(v: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        let u0 = _mm256_hadd_ps(t0, t1); // rows 0..4: low-half sums | high-half sums
        let u1 = _mm256_hadd_ps(t2, t3); // rows 4..8
        _mm256_add_ps(
            _mm256_permute2f128_ps(u0, u1, 0x20),
            _mm256_permute2f128_ps(u0, u1, 0x31),
        )
    }

    /// See `super::softmax_rows`. Eight queries at a time, so that no step waits on one
    /// row's reductions: the exponentials are taken of the logits themselves (softmax is
    /// shift-invariant; no max pass), the eight denominators come out of one horizontal-add
    /// tree, and a group whose logits could overflow (> 60), whose rows are all very negative
    /// or which holds a non-finite value is redone row by row with the max subtracted
    /// (`softmax_denominator`, which also reports the non-finite value).
    /// `buf` holds at least 8 rows of `k.next_multiple_of(8)` floats.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_rows(
        logits: &[f32],
        k: usize,
        q: usize,
        labels_u: &[usize],
        class_rows: &mut [f32],
        buf: &mut [f32],
    ) -> bool {
        let kp = k.next_multiple_of(8);
        let k8 = k - k % 8;
        let mask = tail_mask(k - k8);
        let fmask = _mm256_castsi256_ps(mask);
        let zero = _mm256_setzero_ps();
        let buf = &mut buf[..8 * kp];
        let mut q0 = 0;
        while q0 < q {
            let rows = (q - q0).min(8);
            let mut sums = [splat(1.0); 8]; // rows past the end stay at 1 (no division by 0)
            let mut vmax = splat(f32::NEG_INFINITY);
            let mut vmin = splat(f32::INFINITY);
            for (r, sum) in sums.iter_mut().enumerate().take(rows) {
                let row = &logits[(q0 + r) * k..(q0 + r + 1) * k];
                let out = &mut buf[r * kp..(r + 1) * kp];
                let (mut s0, mut s1) = (zero, zero);
                let mut i = 0;
                while i + 16 <= k8 {
                    let (a, b) = (ld(row, i), ld(row, i + 8));
                    vmax = _mm256_max_ps(_mm256_max_ps(a, b), vmax);
                    vmin = _mm256_min_ps(_mm256_min_ps(a, b), vmin);
                    let (ea, eb) = (exp8_bounded(a), exp8_bounded(b));
                    st(out, i, ea);
                    st(out, i + 8, eb);
                    s0 = _mm256_add_ps(s0, ea);
                    s1 = _mm256_add_ps(s1, eb);
                    i += 16;
                }
                if i < k8 {
                    let a = ld(row, i);
                    vmax = _mm256_max_ps(a, vmax);
                    vmin = _mm256_min_ps(a, vmin);
                    let ea = exp8_bounded(a);
                    st(out, i, ea);
                    s0 = _mm256_add_ps(s0, ea);
                }
                if k8 < k {
                    let a = ld_tail(row, k8, mask); // lanes past the row are 0: harmless here
                    vmax = _mm256_max_ps(a, vmax);
                    vmin = _mm256_min_ps(a, vmin);
                    let ea = _mm256_and_ps(exp8_bounded(a), fmask);
                    st(out, k8, ea);
                    s1 = _mm256_add_ps(s1, ea);
                }
                *sum = _mm256_add_ps(s0, s1);
            }
            let mut denom = hsum_rows(&sums);
            // NaN fails every ordered comparison; +inf shows in the max, -inf in the min
            let sums_ok =
                _mm256_movemask_ps(_mm256_cmp_ps(denom, splat(UNSHIFTED_MIN_SUM), _CMP_GE_OQ))
                    == 0xff;
            if !(sums_ok
                && hmax(vmax) <= UNSHIFTED_MAX
                && -hmax(_mm256_xor_ps(vmin, splat(-0.0))) > f32::NEG_INFINITY)
            {
                let mut exact = [1.0f32; 8];
                for (r, d) in exact.iter_mut().enumerate().take(rows) {
                    let row = &logits[(q0 + r) * k..(q0 + r + 1) * k];
                    match softmax_denominator(row, &mut buf[r * kp..(r + 1) * kp]) {
                        Some(s) => *d = s,
                        None => return false,
                    }
                }
                denom = ld(&exact, 0);
            }
            let neg_inv = _mm256_div_ps(splat(-1.0), denom);
            if rows == 8 {
                // column `lab` of the 8 buffered rows, scaled, is 8 consecutive outputs
                for (u, &lab) in labels_u.iter().enumerate() {
                    let col = &buf[lab..lab + 7 * kp + 1];
                    let e = _mm256_setr_ps(
                        col[0],
                        col[kp],
                        col[2 * kp],
                        col[3 * kp],
                        col[4 * kp],
                        col[5 * kp],
                        col[6 * kp],
                        col[7 * kp],
                    );
                    st(class_rows, u * q + q0, _mm256_mul_ps(e, neg_inv));
                }
            } else {
                let mut ninv = [0.0f32; 8];
                st(&mut ninv, 0, neg_inv);
                for (u, &lab) in labels_u.iter().enumerate() {
                    let dst = &mut class_rows[u * q + q0..u * q + q0 + rows];
                    for (r, d) in dst.iter_mut().enumerate() {
                        *d = buf[r * kp + lab] * ninv[r];
                    }
                }
            }
            q0 += rows;
        }
        true
    }

    /// 2^(j/8) for j = 0..8, rounded to f32: the table of [`exp8_bounded`].
    const EXP2_EIGHTHS: [f32; 8] = [
        1.0,
        1.090_507_7,
        1.189_207_1,
        1.296_839_6,
        std::f32::consts::SQRT_2,
        1.542_210_8,
        1.681_792_8,
        1.834_008,
    ];

    /// `exp8` for x ≤ 88 (a logit, or a logit minus its row's max), the softmax hot loop.
    /// Only the lower clamp is done (callers check the upper bound); it is ordered so that a
    /// NaN lane stays NaN. e^x = 2^(n/8) · e^r with n = round(8x·log2 e), |r| ≤ ln2/16:
    /// 2^(n/8) is an 8-entry table (one `vpermps`, which reads only the low 3 bits of `y`)
    /// times 2^floor(n/8) added straight into the exponent bits, and e^r is a degree-3
    /// minimax polynomial (error 2.6e-8 on that interval). Six multiply/FMA ops instead of the
    /// ten of a degree-7 polynomial on |r| ≤ ln2/2 (the FMA ports bound this loop).
    /// Relative error ≤ 2.1e-7 for |x| ≤ 20, ≤ 4e-7 down to the clamp at -87.3
    /// (`exp8_is_accurate`); torch's own f32 softmax is within a few ulp too.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp8_bounded(x: __m256) -> __m256 {
        let x = _mm256_max_ps(splat(-87.3), x); // NaN in x → NaN out (second operand)
        let magic = splat(12_582_912.0); // 1.5 * 2^23: adding it rounds to an integer
        let y = _mm256_fmadd_ps(x, splat(8.0 * std::f32::consts::LOG2_E), magic);
        let n = _mm256_sub_ps(y, magic); // n = round(8x·log2 e), |n| ≤ 1016
        let r = _mm256_fnmadd_ps(n, splat(std::f32::consts::LN_2 / 8.0), x);
        // y's mantissa holds 2^22 + n: its low 3 bits pick the table entry (n mod 8), and
        // shifting right 3 then left 23 leaves floor(n/8) in the exponent field (the higher
        // bits shift out), which an integer add applies to the table value.
        let y_bits = _mm256_castps_si256(y);
        // SAFETY: unaligned 8-float load from a local array. Only reached with AVX enabled.
        let table = unsafe { _mm256_loadu_ps(EXP2_EIGHTHS.as_ptr()) };
        let frac = _mm256_permutevar8x32_ps(table, y_bits);
        let whole = _mm256_slli_epi32(_mm256_srli_epi32(y_bits, 3), 23);
        let scale = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(frac), whole));
        let p = _mm256_fmadd_ps(splat(0.166_668_58), r, splat(0.500_064_5));
        let p = _mm256_fmadd_ps(p, r, splat(1.0));
        let p = _mm256_fmadd_ps(p, r, splat(1.0));
        _mm256_mul_ps(p, scale)
    }

    /// See `super::scalar_softmax_denominator`; the fallback of [`softmax_rows`] for groups
    /// that need the row max. Two accumulators per pass (the loops are latency
    /// bound on one), finiteness checked on the max / min and the sum instead of per element:
    /// +inf makes the max infinite, −inf the min, and a NaN propagates through `exp8_bounded`
    /// into the sum.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn softmax_denominator(row: &[f32], full_buf: &mut [f32]) -> Option<f32> {
        let k = row.len().min(full_buf.len());
        let row = &row[..k];
        let k16 = k - k % 16;
        let k8 = k - k % 8;
        let mask = tail_mask(k - k8);
        let ninf = splat(f32::NEG_INFINITY);
        let pinf = splat(f32::INFINITY);
        let (mut m0, mut m1, mut n0, mut n1) = (ninf, ninf, pinf, pinf);
        let mut i = 0;
        while i < k16 {
            let (a, b) = (ld(row, i), ld(row, i + 8));
            m0 = _mm256_max_ps(a, m0);
            m1 = _mm256_max_ps(b, m1);
            n0 = _mm256_min_ps(a, n0);
            n1 = _mm256_min_ps(b, n1);
            i += 16;
        }
        if k16 < k8 {
            let a = ld(row, k16);
            m0 = _mm256_max_ps(a, m0);
            n0 = _mm256_min_ps(a, n0);
        }
        if k8 < k {
            let x = ld_tail(row, k8, mask);
            let fm = _mm256_castsi256_ps(mask);
            m1 = _mm256_max_ps(_mm256_blendv_ps(ninf, x, fm), m1);
            n1 = _mm256_min_ps(_mm256_blendv_ps(pinf, x, fm), n1);
        }
        let m = hmax(_mm256_max_ps(m0, m1));
        let lo = -hmax(_mm256_xor_ps(_mm256_min_ps(n0, n1), splat(-0.0)));
        if !(m.is_finite() && lo.is_finite()) {
            return None;
        }
        let vmax = splat(m);
        let zero = _mm256_setzero_ps();
        let (mut s0, mut s1) = (zero, zero);
        let mut i = 0;
        while i < k16 {
            let e0 = exp8_bounded(_mm256_sub_ps(ld(row, i), vmax));
            let e1 = exp8_bounded(_mm256_sub_ps(ld(row, i + 8), vmax));
            st(full_buf, i, e0);
            st(full_buf, i + 8, e1);
            s0 = _mm256_add_ps(s0, e0);
            s1 = _mm256_add_ps(s1, e1);
            i += 16;
        }
        if k16 < k8 {
            let e = exp8_bounded(_mm256_sub_ps(ld(row, k16), vmax));
            st(full_buf, k16, e);
            s0 = _mm256_add_ps(s0, e);
        }
        if k8 < k {
            let e = exp8_bounded(_mm256_sub_ps(ld_tail(row, k8, mask), vmax));
            let e = _mm256_and_ps(e, _mm256_castsi256_ps(mask));
            if full_buf.len() >= k8 + 8 {
                // a plain store into the caller's padding: masked stores are slow on AMD
                st(full_buf, k8, e);
            } else {
                st_tail(&mut full_buf[..k], k8, mask, e);
            }
            s1 = _mm256_add_ps(s1, e);
        }
        let s = hsum(_mm256_add_ps(s0, s1));
        if s.is_nan() {
            return None;
        }
        Some(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn pow8(x: __m256, kind: u8) -> __m256 {
        match kind {
            0 => splat(1.0),
            1 => x,
            2 => _mm256_mul_ps(x, x),
            3 => _mm256_mul_ps(_mm256_mul_ps(x, x), x),
            _ => {
                let x2 = _mm256_mul_ps(x, x);
                _mm256_mul_ps(x2, x2)
            }
        }
    }

    /// Focal class cost of 8 logits (integer γ in 0..=4 only); see `super::focal_inplace`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn focal8(x: __m256, alpha: f32, gamma_kind: u8) -> __m256 {
        let one = splat(1.0);
        let eps = splat(1e-8);
        // an exact division: p close to 1 feeds 1 − p, where a 1-ulp error in p would show
        let p = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(x, splat(-0.0)))));
        let q = _mm256_sub_ps(one, p);
        let ln_neg = ln8(_mm256_add_ps(q, eps));
        let ln_pos = ln8(_mm256_add_ps(p, eps));
        // neg = (1-α) p^γ (−ln(1−p+ε)); pos = α (1−p)^γ (−ln(p+ε)); cost = pos − neg
        let neg = _mm256_mul_ps(
            _mm256_mul_ps(splat(1.0 - alpha), pow8(p, gamma_kind)),
            ln_neg,
        );
        let pos = _mm256_mul_ps(_mm256_mul_ps(splat(alpha), pow8(q, gamma_kind)), ln_pos);
        _mm256_sub_ps(neg, pos)
    }

    /// See `super::focal_inplace` (integer γ in 0..=4 only); the tests compare it with the
    /// scalar kernel.
    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn focal_inplace(xs: &mut [f32], alpha: f32, gamma_kind: u8) {
        let n8 = xs.len() - xs.len() % 8;
        let mut i = 0;
        while i < n8 {
            st(xs, i, focal8(ld(xs, i), alpha, gamma_kind));
            i += 8;
        }
        super::focal_inplace(xs, alpha, gamma_kind as f32, gamma_kind, n8);
    }

    /// See `super::focal_rows` (integer γ in 0..=4 only): eight queries at a time, each
    /// label's eight logits gathered from their rows into one vector (no strided scalar copy
    /// into `class_rows` first).
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn focal_rows(
        logits: &[f32],
        k: usize,
        q: usize,
        labels_u: &[usize],
        class_rows: &mut [f32],
        alpha: f32,
        gamma_kind: u8,
    ) {
        let q8 = q - q % 8;
        let mut q0 = 0;
        while q0 < q8 {
            let group = &logits[q0 * k..(q0 + 8) * k];
            for (u, &lab) in labels_u.iter().enumerate() {
                let col = &group[lab..lab + 7 * k + 1];
                let x = _mm256_setr_ps(
                    col[0],
                    col[k],
                    col[2 * k],
                    col[3 * k],
                    col[4 * k],
                    col[5 * k],
                    col[6 * k],
                    col[7 * k],
                );
                st(class_rows, u * q + q0, focal8(x, alpha, gamma_kind));
            }
            q0 += 8;
        }
        for (u, &lab) in labels_u.iter().enumerate() {
            let row = &mut class_rows[u * q..(u + 1) * q];
            for (qi, out) in row.iter_mut().enumerate().skip(q8) {
                *out = logits[qi * k + lab];
            }
            super::focal_inplace(row, alpha, gamma_kind as f32, gamma_kind, q8);
        }
    }

    /// a / b via the reciprocal estimate and one Newton step (≈ 1 ulp; much cheaper than
    /// `vdivps`). b = 0 gives NaN: callers mask those lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn div(a: __m256, b: __m256) -> __m256 {
        let r = _mm256_rcp_ps(b);
        let r = _mm256_mul_ps(r, _mm256_fnmadd_ps(b, r, splat(2.0)));
        _mm256_mul_ps(a, r)
    }

    /// See `super::block_row`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_row(p: &Preds<'_>, t: &Target, cc: &[f32], wts: [f32; 3], out: &mut [f32]) {
        let q = out.len();
        let q8 = q - q % 8;
        let [tcx, tcy, tw, th] = t.cxcywh.map(splat);
        let [tx1, ty1, tx2, ty2] = t.xyxy.map(splat);
        let tarea = splat(t.area);
        let [wc, wb, wg] = wts.map(splat);
        let zero = _mm256_setzero_ps();
        let sign = splat(-0.0);
        let abs = |v: __m256| _mm256_andnot_ps(sign, v);
        let mut j = 0;
        while j < q8 {
            let l1 = _mm256_add_ps(
                _mm256_add_ps(
                    abs(_mm256_sub_ps(ld(p.cx, j), tcx)),
                    abs(_mm256_sub_ps(ld(p.cy, j), tcy)),
                ),
                _mm256_add_ps(
                    abs(_mm256_sub_ps(ld(p.w, j), tw)),
                    abs(_mm256_sub_ps(ld(p.h, j), th)),
                ),
            );
            let (x1, y1, x2, y2) = (ld(p.x1, j), ld(p.y1, j), ld(p.x2, j), ld(p.y2, j));
            let iw = _mm256_max_ps(
                _mm256_sub_ps(_mm256_min_ps(x2, tx2), _mm256_max_ps(x1, tx1)),
                zero,
            );
            let ih = _mm256_max_ps(
                _mm256_sub_ps(_mm256_min_ps(y2, ty2), _mm256_max_ps(y1, ty1)),
                zero,
            );
            let inter = _mm256_mul_ps(iw, ih);
            let union = _mm256_sub_ps(_mm256_add_ps(ld(p.area, j), tarea), inter);
            let iou = _mm256_and_ps(div(inter, union), _mm256_cmp_ps(union, zero, _CMP_GT_OQ));
            let c = _mm256_mul_ps(
                _mm256_sub_ps(_mm256_max_ps(x2, tx2), _mm256_min_ps(x1, tx1)),
                _mm256_sub_ps(_mm256_max_ps(y2, ty2), _mm256_min_ps(y1, ty1)),
            );
            let pen = _mm256_and_ps(
                div(_mm256_sub_ps(c, union), c),
                _mm256_cmp_ps(c, zero, _CMP_GT_OQ),
            );
            let giou = _mm256_sub_ps(iou, pen);
            let cost = _mm256_fnmadd_ps(
                wg,
                giou,
                _mm256_fmadd_ps(wc, ld(cc, j), _mm256_mul_ps(wb, l1)),
            );
            st(out, j, cost);
            j += 8;
        }
        super::block_row(p, t, cc, wts, out, q8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn unif(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32) / (1u64 << 24) as f32
        }
    }

    #[test]
    fn fast_exp_and_ln_are_accurate() {
        let mut worst: f64 = 0.0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let a = fast_exp(x) as f64;
            let b = (x as f64).exp();
            worst = worst.max((a - b).abs() / b);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "exp rel err {worst}");
        assert_eq!(fast_exp(f32::NEG_INFINITY), fast_exp(-87.3));
        assert!(fast_exp(f32::NEG_INFINITY) < 1e-37);
        assert!(fast_exp(1000.0).is_finite());
        let mut worst: f64 = 0.0;
        let mut x = 1e-8f32;
        while x < 2.0 {
            let a = fast_ln(x) as f64;
            let b = (x as f64).ln();
            worst = worst.max((a - b).abs() / b.abs().max(1e-3));
            x *= 1.0007;
        }
        assert!(worst < 3e-7, "ln err {worst}");
        assert_eq!(fast_ln(1.0), 0.0);
    }

    /// Straightforward scalar reference (f64 math).
    fn reference(
        logits: &[f32],
        k: usize,
        boxes: &[f32],
        labels: &[usize],
        tboxes: &[f32],
        p: &CostParams,
    ) -> Vec<f64> {
        let q = boxes.len() / 4;
        let t = labels.len();
        let xy = |b: &[f32]| {
            let b: Vec<f64> = b.iter().map(|&x| x as f64).collect();
            [
                b[0] - b[2] / 2.0,
                b[1] - b[3] / 2.0,
                b[0] + b[2] / 2.0,
                b[1] + b[3] / 2.0,
            ]
        };
        let mut out = vec![0.0; t * q];
        for ti in 0..t {
            for qi in 0..q {
                let row: Vec<f64> = logits[qi * k..(qi + 1) * k]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let lab = labels[ti];
                let class = match p.class_cost {
                    ClassCost::Softmax => {
                        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let s: f64 = row.iter().map(|x| (x - m).exp()).sum();
                        -((row[lab] - m).exp() / s)
                    }
                    ClassCost::Focal { alpha, gamma } => {
                        // f32 like the PyTorch matchers: 1 - p cancels in f32 for p ≈ 1,
                        // an f64 reference would differ by more than the approximations.
                        let (a, g) = (alpha, gamma);
                        let pr = 1.0 / (1.0 + (-(row[lab] as f32)).exp());
                        let neg = (1.0 - a) * pr.powf(g) * -(1.0 - pr + 1e-8).ln();
                        let pos = a * (1.0 - pr).powf(g) * -(pr + 1e-8).ln();
                        (pos - neg) as f64
                    }
                };
                let pb = &boxes[qi * 4..qi * 4 + 4];
                let tb = &tboxes[ti * 4..ti * 4 + 4];
                let l1: f64 = (0..4).map(|c| (pb[c] as f64 - tb[c] as f64).abs()).sum();
                let g = crate::boxes::giou_xyxy(&xy(pb), &xy(tb));
                out[ti * q + qi] =
                    p.cost_bbox as f64 * l1 + p.cost_class as f64 * class - p.cost_giou as f64 * g;
            }
        }
        out
    }

    fn random_problem(
        r: &mut Rng,
        q: usize,
        k: usize,
        t: usize,
        ncls: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<usize>, Vec<f32>) {
        let logits: Vec<f32> = (0..q * k).map(|_| (r.unif() - 0.5) * 12.0).collect();
        let mut boxes = Vec::new();
        for _ in 0..q + t {
            boxes.extend_from_slice(&[r.unif(), r.unif(), r.unif() * 0.5, r.unif() * 0.5]);
        }
        // a degenerate predicted box and a degenerate target
        if q > 0 && t > 0 {
            boxes[2] = 0.0;
            boxes[q * 4 + 3] = 0.0;
        }
        let tboxes = boxes.split_off(q * 4);
        let labels: Vec<usize> = (0..t).map(|i| (i * 7 + 3) % ncls).collect();
        (logits, boxes, labels, tboxes)
    }

    #[test]
    fn block_matches_reference_softmax_and_focal() {
        let mut r = Rng(0xdead_beef_1234_5678);
        let id = BlockId { layer: 0, image: 0 };
        let mut ws = CostWorkspace::new();
        for &(q, k, t) in &[
            (30usize, 8usize, 5usize),
            (100, 92, 20),
            (7, 3, 0),
            (0, 5, 3),
            (13, 21, 40),
        ] {
            for params in [
                CostParams::detr(),
                CostParams::deformable(),
                CostParams::new(
                    1.0,
                    2.0,
                    3.0,
                    ClassCost::Focal {
                        alpha: 0.3,
                        gamma: 1.5,
                    },
                )
                .unwrap(),
            ] {
                let ncls = params.class_cost.num_classes(k);
                let (logits, boxes, labels, tboxes) = random_problem(&mut r, q, k, t, ncls);
                build_block(&mut ws, &logits, k, &boxes, &labels, &tboxes, &params, id).unwrap();
                let want = reference(&logits, k, &boxes, &labels, &tboxes, &params);
                assert_eq!(ws.cost.len(), want.len());
                for (&a, b) in ws.cost.iter().zip(&want) {
                    let a = f64::from(a);
                    assert!(
                        (a - b).abs() < 2e-5 * (1.0 + b.abs()),
                        "{a} vs {b} ({q},{k},{t}) {params:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_predictions_are_named() {
        let id = BlockId { layer: 2, image: 5 };
        let mut ws = CostWorkspace::new();
        let mut r = Rng(99);
        let (mut logits, mut boxes, labels, tboxes) = random_problem(&mut r, 10, 4, 3, 3);
        logits[17] = f32::NAN;
        let e = build_block(
            &mut ws,
            &logits,
            4,
            &boxes,
            &labels,
            &tboxes,
            &CostParams::detr(),
            id,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pred_logits: non-finite value at layer 2, image 5, query 4"
        );
        let e = build_block(
            &mut ws,
            &logits,
            4,
            &boxes,
            &labels,
            &tboxes,
            &CostParams::deformable(),
            id,
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("pred_logits:"));
        logits[17] = f32::NEG_INFINITY;
        assert!(build_block(
            &mut ws,
            &logits,
            4,
            &boxes,
            &labels,
            &tboxes,
            &CostParams::detr(),
            id
        )
        .is_err());
        logits[17] = 0.0;
        boxes[9] = f32::INFINITY;
        let e = build_block(
            &mut ws,
            &logits,
            4,
            &boxes,
            &labels,
            &tboxes,
            &CostParams::detr(),
            id,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("pred_boxes: non-finite value at layer 2, image 5, query 2"),
            "{e}"
        );
        boxes[9] = 0.5;
        boxes[10] = -0.1;
        let e = build_block(
            &mut ws,
            &logits,
            4,
            &boxes,
            &labels,
            &tboxes,
            &CostParams::detr(),
            id,
        )
        .unwrap_err();
        assert!(e.to_string().contains("negative width or height"), "{e}");
    }

    #[test]
    fn simd_kernels_agree_with_scalar() {
        if !use_avx2() {
            return; // nothing to compare on this CPU
        }
        let mut r = Rng(0x0123_4567_89ab_cdef);
        for &k in &[1usize, 7, 8, 9, 92, 300] {
            let row: Vec<f32> = (0..k).map(|_| (r.unif() - 0.5) * 40.0).collect();
            let (mut b1, mut b2) = (vec![0.0; k], vec![0.0; k]);
            // SAFETY (every avx2 call in this test): use_avx2() checked above.
            let simd =
                |row: &[f32], buf: &mut [f32]| unsafe { avx2::softmax_denominator(row, buf) };
            let s1 = scalar_softmax_denominator(&row, &mut b1).unwrap();
            let s2 = simd(&row, &mut b2).unwrap();
            assert!((s1 - s2).abs() <= 1e-6 * s1, "{s1} {s2}");
            for (a, b) in b1.iter().zip(&b2) {
                assert!((a - b).abs() <= 1e-6 * a.max(1e-30));
            }
            let mut bad = row.clone();
            bad[k - 1] = f32::NAN;
            assert!(simd(&bad, &mut b2).is_none());
            bad[k - 1] = f32::NEG_INFINITY;
            assert!(simd(&bad, &mut b2).is_none());
            bad[0] = f32::INFINITY;
            assert!(scalar_softmax_denominator(&bad, &mut b2).is_none());
            // focal
            for kind in 0..=4u8 {
                let mut f1 = row.clone();
                let mut f2 = row.clone();
                focal_inplace(&mut f1, 0.25, kind as f32, kind, 0);
                // SAFETY: use_avx2() checked above.
                unsafe { avx2::focal_inplace(&mut f2, 0.25, kind) };
                for (a, b) in f1.iter().zip(&f2) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                        "{a} {b} kind {kind}"
                    );
                }
            }
        }
        // block rows, with tails and degenerate boxes
        let (mut ws1, mut ws2) = (CostWorkspace::new(), CostWorkspace::new());
        let id = BlockId { layer: 0, image: 0 };
        for &q in &[1usize, 8, 13, 300] {
            let (logits, boxes, labels, tboxes) = random_problem(&mut r, q, 5, 6, 4);
            build_block_impl(
                &mut ws1,
                &logits,
                5,
                &boxes,
                &labels,
                &tboxes,
                &CostParams::detr(),
                id,
                false,
            )
            .unwrap();
            build_block_impl(
                &mut ws2,
                &logits,
                5,
                &boxes,
                &labels,
                &tboxes,
                &CostParams::detr(),
                id,
                true,
            )
            .unwrap();
            for (a, b) in ws1.cost.iter().zip(&ws2.cost) {
                assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} {b}");
            }
        }
    }

    #[test]
    fn exp8_is_accurate() {
        if !use_avx2() {
            return; // nothing to test on this CPU
        }
        let mut x = -87.0f32;
        let (mut worst, mut worst_mid) = (0.0f64, 0.0f64);
        while x < 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.001_3);
            // SAFETY: use_avx2() checked above; plain 8-float load / store of local arrays.
            let out: [f32; 8] = unsafe {
                let v = avx2::exp8_bounded(std::arch::x86_64::_mm256_loadu_ps(xs.as_ptr()));
                let mut o = [0.0f32; 8];
                std::arch::x86_64::_mm256_storeu_ps(o.as_mut_ptr(), v);
                o
            };
            for (&xi, &e) in xs.iter().zip(&out) {
                let want = (xi as f64).exp();
                let err = (e as f64 - want).abs() / want;
                worst = worst.max(err);
                if xi.abs() <= 20.0 {
                    worst_mid = worst_mid.max(err);
                }
            }
            x += 0.0371;
        }
        assert!(worst < 4.5e-7, "exp8 rel err {worst}");
        assert!(worst_mid < 2.5e-7, "exp8 rel err on [-20, 20] {worst_mid}");
        // SAFETY: as above.
        let special: [f32; 8] = unsafe {
            let xs = [
                f32::NAN,
                f32::NEG_INFINITY,
                -1000.0,
                0.0,
                1.0,
                -87.3,
                88.0,
                -0.0,
            ];
            let v = avx2::exp8_bounded(std::arch::x86_64::_mm256_loadu_ps(xs.as_ptr()));
            let mut o = [0.0f32; 8];
            std::arch::x86_64::_mm256_storeu_ps(o.as_mut_ptr(), v);
            o
        };
        assert!(special[0].is_nan());
        assert!(special[1] > 0.0 && special[1] < 1e-37 && special[1] == special[2]);
        assert_eq!(special[3], 1.0);
        assert!((special[4] - std::f32::consts::E).abs() < 1e-6);
        assert!(special[6].is_finite() && special[6] > 1e38);
        assert_eq!(special[7], 1.0);
    }

    /// The 8-query softmax kernel: partial groups, K not a multiple of 8, and the groups it
    /// must redo with the row max (huge logits, rows far below zero) all match the f64
    /// reference; a non-finite logit anywhere in a group is reported at its own query.
    #[test]
    fn softmax_groups_and_fallbacks_match_reference() {
        let id = BlockId { layer: 1, image: 3 };
        let mut r = Rng(0x5eed_f50f_73a4);
        for simd in [false, use_avx2()] {
            let mut ws = CostWorkspace::new();
            for &(q, k) in &[(13usize, 21usize), (8, 8), (17, 92), (3, 5), (24, 16)] {
                let (mut logits, boxes, labels, tboxes) = random_problem(&mut r, q, k, 6, k - 1);
                for x in logits[k..2 * k].iter_mut() {
                    *x += 500.0; // query 1: would overflow without the max
                }
                if q > 9 {
                    for x in logits[9 * k..10 * k].iter_mut() {
                        *x -= 120.0; // query 9: every exp underflows without the max
                    }
                }
                let params = CostParams::detr();
                build_block_impl(
                    &mut ws, &logits, k, &boxes, &labels, &tboxes, &params, id, simd,
                )
                .unwrap();
                let want = reference(&logits, k, &boxes, &labels, &tboxes, &params);
                for (&a, b) in ws.cost.iter().zip(&want) {
                    let a = f64::from(a);
                    assert!(
                        (a - b).abs() < 2e-5 * (1.0 + b.abs()),
                        "{a} vs {b} (q {q}, k {k}, simd {simd})"
                    );
                }
                for (bad, at) in [
                    (f32::NAN, q - 1),
                    (f32::INFINITY, q / 2),
                    (f32::NEG_INFINITY, 0),
                ] {
                    let mut l = logits.clone();
                    l[at * k + k / 2] = bad;
                    let e = build_block_impl(
                        &mut ws, &l, k, &boxes, &labels, &tboxes, &params, id, simd,
                    )
                    .unwrap_err();
                    assert_eq!(
                        e.to_string(),
                        format!("pred_logits: non-finite value at layer 1, image 3, query {at}")
                    );
                }
            }
        }
    }

    #[test]
    fn params_validation() {
        assert!(ClassCost::parse("softmax", 0.25, 2.0).is_ok());
        assert!(ClassCost::parse("focal", 0.25, -1.0)
            .unwrap_err()
            .to_string()
            .starts_with("focal_gamma:"));
        assert!(ClassCost::parse("focal", f64::NAN, 2.0)
            .unwrap_err()
            .to_string()
            .starts_with("focal_alpha:"));
        assert!(ClassCost::parse("hinge", 0.25, 2.0)
            .unwrap_err()
            .to_string()
            .starts_with("class_cost:"));
        assert!(CostParams::new(1.0, f64::INFINITY, 2.0, ClassCost::Softmax)
            .unwrap_err()
            .to_string()
            .starts_with("cost_bbox:"));
        // finite in f64, inf in the f32 the costs are computed in
        assert!(CostParams::new(1.0, 5.0, 1e39, ClassCost::Softmax)
            .unwrap_err()
            .to_string()
            .starts_with("cost_giou: 1000000000000000000000000000000000000000 is beyond"));
        assert!(ClassCost::parse("focal", 1e300, 2.0)
            .unwrap_err()
            .to_string()
            .starts_with("focal_alpha:"));
        assert!(ClassCost::parse("focal", 0.25, 1e39).is_err());
    }
}
