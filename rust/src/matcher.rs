//! Hungarian matching of many prediction sets (decoder layers) × many images in one call.
//!
//! Every (layer, image) pair is an independent problem: build that image's own Q×T_b cost
//! block ([`crate::cost`]) and solve it exactly ([`crate::lsap`]). Targets are ragged
//! (`target_sizes`), never padded. Problems run in parallel on the process-local pool only
//! when the total work is above [`crate::pool::PARALLEL_MIN_WORK`] and the machine has a spare
//! core ([`crate::pool::spare_core`]).
//!
//! Output (flat, like the Python side wants it): for the blocks in order layer-major then
//! image, `pred_idx` / `target_idx` hold min(Q, T_b) pairs per block sorted by `pred_idx`,
//! with `target_idx` local to the image; `counts[l, b]` is the number of pairs of block (l, b).

use crate::alloc;
use crate::cost::{self, BlockId, CostParams, CostWorkspace};
use crate::error::{KaError, KaResult};
use crate::lsap::LsapWorkspace;
use crate::pool;
use ndarray::{ArrayView1, ArrayView2, ArrayView3, ArrayView4};
use std::cell::RefCell;

/// Flat result of [`match_layers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchOutput {
    /// query index of each pair (blocks concatenated, l-major then b; sorted within a block)
    pub pred_idx: Vec<i64>,
    /// target index (local to its image) of each pair
    pub target_idx: Vec<i64>,
    /// pairs per block, row-major (layers, images)
    pub counts: Vec<i64>,
    pub layers: usize,
    pub images: usize,
}

#[derive(Default)]
struct ProblemWorkspace {
    cost: CostWorkspace,
    lsap: LsapWorkspace,
    transposed: Vec<f32>,
    pairs: Vec<(usize, usize)>,
}

thread_local! {
    static WS: RefCell<ProblemWorkspace> = RefCell::new(ProblemWorkspace::default());
}

/// Inputs of one problem, borrowed from the batch.
struct Problem<'a> {
    logits: &'a [f32],
    k: usize,
    boxes: &'a [f32],
    labels: &'a [usize],
    tboxes: &'a [f32],
    id: BlockId,
}

fn solve_problem(
    ws: &mut ProblemWorkspace,
    p: &Problem<'_>,
    params: &CostParams,
) -> KaResult<Vec<(i64, i64)>> {
    let q = p.boxes.len() / 4;
    let t = p.labels.len();
    if t == 0 || q == 0 {
        // nothing to match, but bad predictions are still reported
        cost::check_predictions(p.logits, p.k, p.boxes, p.id)?;
        return Ok(Vec::new());
    }
    cost::build_block(
        &mut ws.cost,
        p.logits,
        p.k,
        p.boxes,
        p.labels,
        p.tboxes,
        params,
        p.id,
    )?;
    let block = &ws.cost.cost;
    if !all_finite(block) {
        return Err(KaError::invalid(
            "cost_class/cost_bbox/cost_giou",
            format!(
                "the weighted cost is not finite at layer {}, image {} (weights too large?)",
                p.id.layer, p.id.image
            ),
        ));
    }
    ws.pairs.clear();
    alloc::try_reserve_to(&mut ws.pairs, t.min(q), "pred_boxes/target_boxes", PAIRS)?;
    if t <= q {
        // rows = targets: the solver's preferred orientation
        let col4row = ws.lsap.solve_wide(block, t, q)?;
        ws.pairs
            .extend(col4row.iter().enumerate().map(|(ti, &qi)| (qi, ti)));
        ws.pairs.sort_unstable();
    } else {
        ws.transposed.clear();
        // q * t fits: the T×Q block of the same size was just allocated
        alloc::try_resize(
            &mut ws.transposed,
            q * t,
            0.0,
            "pred_boxes/target_boxes",
            TRANSPOSED,
        )?;
        for ti in 0..t {
            for qi in 0..q {
                ws.transposed[qi * t + ti] = block[ti * q + qi];
            }
        }
        let col4row = ws.lsap.solve_wide(&ws.transposed, q, t)?;
        ws.pairs
            .extend(col4row.iter().enumerate().map(|(qi, &ti)| (qi, ti)));
    }
    alloc::try_collect(
        ws.pairs.iter().map(|&(qi, ti)| (qi as i64, ti as i64)),
        ws.pairs.len(),
        "pred_boxes/target_boxes",
        PAIRS,
    )
}

const TRANSPOSED: &str = "a transposed cost block";
const PAIRS: &str = "the matched pairs";

/// True when every entry is finite. `x * 0` is NaN exactly for non-finite `x`; eight
/// independent lanes let the loop vectorise (a single running sum is a serial chain
/// of adds, since the compiler may not reassociate it).
fn all_finite(xs: &[f32]) -> bool {
    let mut acc = [0.0f32; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * 0.0;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| x * 0.0).sum();
    acc.iter().sum::<f32>() + tail == 0.0
}

/// The image that target `i` (an index into the concatenated targets) belongs to, given the
/// per-image start offsets (B + 1 of them, the last = ΣT). Error paths only.
fn image_of(offsets: &[usize], i: usize) -> usize {
    // images with no targets share their offset with the next one: take the last such
    offsets.partition_point(|&o| o <= i).saturating_sub(1)
}

/// Match `L` prediction sets × `B` images in one call.
///
/// - `pred_logits` (L, B, Q, K) f32 — K = C + 1 for the softmax class cost (last = no-object),
///   K = C for focal;
/// - `pred_boxes` (L, B, Q, 4) f32, normalised `cxcywh`;
/// - `target_labels` (ΣT,) i64 in [0, C); `target_boxes` (ΣT, 4) f32 `cxcywh`;
/// - `target_sizes` (B,) i64: T_b per image, summing to ΣT.
///
/// Errors ([`KaError::InvalidArgument`]) name the offending argument; never panics on input.
pub fn match_layers(
    pred_logits: ArrayView4<f32>,
    pred_boxes: ArrayView4<f32>,
    target_labels: ArrayView1<i64>,
    target_boxes: ArrayView2<f32>,
    target_sizes: ArrayView1<i64>,
    params: &CostParams,
) -> KaResult<MatchOutput> {
    // the per-set shape checks of match_layer_list cover the stacked form too
    let logits: Vec<_> = pred_logits.outer_iter().collect();
    let boxes: Vec<_> = pred_boxes.outer_iter().collect();
    match_layer_list(
        &logits,
        &boxes,
        target_labels,
        target_boxes,
        target_sizes,
        params,
    )
}

/// [`match_layers`] with the prediction sets as separate arrays (each (B, Q, K) and
/// (B, Q, 4), all of one shape), so that decoder layers held in separate tensors are matched
/// in one call without first being copied into one (L, B, Q, K) array.
pub fn match_layer_list(
    pred_logits: &[ArrayView3<f32>],
    pred_boxes: &[ArrayView3<f32>],
    target_labels: ArrayView1<i64>,
    target_boxes: ArrayView2<f32>,
    target_sizes: ArrayView1<i64>,
    params: &CostParams,
) -> KaResult<MatchOutput> {
    match_layers_impl(
        pred_logits,
        pred_boxes,
        target_labels,
        target_boxes,
        target_sizes,
        params,
        pool::spare_core,
    )
}

/// [`match_layer_list`] with the "is a core spare?" check injectable (tests force parallelism).
fn match_layers_impl(
    pred_logits: &[ArrayView3<f32>],
    pred_boxes: &[ArrayView3<f32>],
    target_labels: ArrayView1<i64>,
    target_boxes: ArrayView2<f32>,
    target_sizes: ArrayView1<i64>,
    params: &CostParams,
    spare_core: fn() -> bool,
) -> KaResult<MatchOutput> {
    let nl = pred_logits.len();
    if pred_boxes.len() != nl {
        return Err(KaError::invalid(
            "pred_boxes",
            format!(
                "got {} prediction sets but pred_logits has {nl}",
                pred_boxes.len()
            ),
        ));
    }
    let Some(first) = pred_logits.first() else {
        return Ok(MatchOutput {
            pred_idx: Vec::new(),
            target_idx: Vec::new(),
            counts: Vec::new(),
            layers: 0,
            images: target_sizes.len(),
        });
    };
    let (nb, nq, k) = first.dim();
    for (l, (lg, bx)) in pred_logits.iter().zip(pred_boxes).enumerate() {
        if lg.dim() != (nb, nq, k) {
            let d = lg.dim();
            return Err(KaError::invalid(
                "pred_logits",
                format!(
                    "prediction set {l} has shape ({}, {}, {}), set 0 has ({nb}, {nq}, {k})",
                    d.0, d.1, d.2
                ),
            ));
        }
        let d = bx.dim();
        if d != (nb, nq, 4) {
            return Err(KaError::invalid(
                "pred_boxes",
                format!(
                    "expected shape (B, Q, 4) = ({nb}, {nq}, 4) to match pred_logits, \
                     got ({}, {}, {}) in prediction set {l}",
                    d.0, d.1, d.2
                ),
            ));
        }
    }
    if target_sizes.len() != nb {
        return Err(KaError::invalid(
            "target_sizes",
            format!(
                "expected one size per image ({nb},), got ({},)",
                target_sizes.len()
            ),
        ));
    }
    // Every buffer below is sized by the input (a zero-stride input can have any shape):
    // allocated fallibly, before the loops that read the input element by element.
    let mut offsets = alloc::try_with_capacity(
        nb.saturating_add(1),
        "target_sizes",
        "the per-image target offsets",
    )?;
    offsets.push(0usize);
    for (b, &s) in target_sizes.iter().enumerate() {
        if s < 0 {
            return Err(KaError::invalid(
                "target_sizes",
                format!("image {b} has a negative size {s}"),
            ));
        }
        let next = usize::try_from(s)
            .ok()
            .and_then(|s| offsets[b].checked_add(s))
            .ok_or_else(|| {
                KaError::invalid(
                    "target_sizes",
                    format!("the sizes overflow at image {b} (size {s})"),
                )
            })?;
        offsets.push(next);
    }
    let total = offsets[nb];
    if target_labels.len() != total {
        return Err(KaError::invalid(
            "target_labels",
            format!(
                "expected {total} labels (the sum of target_sizes), got {}",
                target_labels.len()
            ),
        ));
    }
    if target_boxes.dim() != (total, 4) {
        return Err(KaError::invalid(
            "target_boxes",
            format!(
                "expected shape ({total}, 4) (the sum of target_sizes), got ({}, {})",
                target_boxes.nrows(),
                target_boxes.ncols()
            ),
        ));
    }
    let ncls = params.class_cost.num_classes(k);
    let mut labels = alloc::try_with_capacity(total, "target_labels", "the label indices")?;
    for (i, &lab) in target_labels.iter().enumerate() {
        if lab < 0 || lab as u64 >= ncls as u64 {
            let why = match params.class_cost {
                cost::ClassCost::Softmax => format!(
                    "softmax class cost with K={k} logits: labels must be in [0, {ncls}) \
                     (the last logit is no-object)"
                ),
                cost::ClassCost::Focal { .. } => {
                    format!("focal class cost with K={k} logits: labels must be in [0, {k})")
                }
            };
            return Err(KaError::invalid(
                "target_labels",
                format!(
                    "image {}: label {lab} is out of range; {why}",
                    image_of(&offsets, i)
                ),
            ));
        }
        labels.push(lab as usize);
    }
    let tboxes = alloc::try_standard_layout(target_boxes, "target_boxes")?;
    let tboxes = tboxes
        .as_slice()
        .ok_or_else(|| KaError::invalid("target_boxes", "could not be made contiguous"))?;
    for (i, b) in tboxes.chunks_exact(4).enumerate() {
        if !b.iter().all(|x| x.is_finite()) {
            return Err(KaError::invalid(
                "target_boxes",
                format!(
                    "image {}: box {} has a non-finite coordinate",
                    image_of(&offsets, i),
                    i - offsets[image_of(&offsets, i)]
                ),
            ));
        }
        if b[2] < 0.0 || b[3] < 0.0 {
            return Err(KaError::invalid(
                "target_boxes",
                format!(
                    "image {}: box {} has a negative width or height (boxes must be cxcywh)",
                    image_of(&offsets, i),
                    i - offsets[image_of(&offsets, i)]
                ),
            ));
        }
    }
    // contiguous views (copies only of non-contiguous inputs)
    let logits = pred_logits
        .iter()
        .map(|a| alloc::try_standard_layout(a.view(), "pred_logits"))
        .collect::<KaResult<Vec<_>>>()?;
    let boxes = pred_boxes
        .iter()
        .map(|a| alloc::try_standard_layout(a.view(), "pred_boxes"))
        .collect::<KaResult<Vec<_>>>()?;
    let logits: Vec<&[f32]> = logits
        .iter()
        .map(|a| a.as_slice())
        .collect::<Option<_>>()
        .ok_or_else(|| KaError::invalid("pred_logits", "could not be made contiguous"))?;
    let boxes: Vec<&[f32]> = boxes
        .iter()
        .map(|a| a.as_slice())
        .collect::<Option<_>>()
        .ok_or_else(|| KaError::invalid("pred_boxes", "could not be made contiguous"))?;

    let nprob = alloc::checked_len::<KaResult<Vec<(i64, i64)>>>(
        &[nl, nb],
        "pred_logits",
        "the per-block results",
    )?;
    let work: usize = (0..nb)
        .map(|b| {
            let t = offsets[b + 1] - offsets[b];
            nq.saturating_mul(k.saturating_add(t.saturating_mul(8)))
        })
        .fold(0usize, usize::saturating_add)
        .saturating_mul(nl);
    let parallel = pool::worth_parallel(work) && spare_core();
    let results = pool::try_map_indices(
        nprob,
        parallel,
        || (),
        |_, pi| {
            let (l, b) = (pi / nb, pi % nb);
            let (t0, t1) = (offsets[b], offsets[b + 1]);
            let problem = Problem {
                logits: &logits[l][b * nq * k..(b + 1) * nq * k],
                k,
                boxes: &boxes[l][b * nq * 4..(b + 1) * nq * 4],
                labels: &labels[t0..t1],
                tboxes: &tboxes[t0 * 4..t1 * 4],
                id: BlockId { layer: l, image: b },
            };
            WS.with(|ws| match ws.try_borrow_mut() {
                Ok(mut ws) => solve_problem(&mut ws, &problem, params),
                Err(_) => solve_problem(&mut ProblemWorkspace::default(), &problem, params),
            })
        },
        "pred_logits",
        "the per-block results",
    )?;
    let m: usize = (0..nb)
        .map(|b| nq.min(offsets[b + 1] - offsets[b]))
        .fold(0usize, usize::saturating_add)
        .saturating_mul(nl);
    const OUT: &str = "the matched indices";
    let mut out = MatchOutput {
        pred_idx: alloc::try_with_capacity(m, "pred_logits", OUT)?,
        target_idx: alloc::try_with_capacity(m, "pred_logits", OUT)?,
        counts: alloc::try_with_capacity(nprob, "pred_logits", OUT)?,
        layers: nl,
        images: nb,
    };
    for r in results {
        let pairs = r?;
        out.counts.push(pairs.len() as i64);
        for (qi, ti) in pairs {
            out.pred_idx.push(qi);
            out.target_idx.push(ti);
        }
    }
    Ok(out)
}

/// Convenience for one prediction set: `pred_logits` (B, Q, K), `pred_boxes` (B, Q, 4).
pub fn match_batch(
    pred_logits: ndarray::ArrayView3<f32>,
    pred_boxes: ndarray::ArrayView3<f32>,
    target_labels: ArrayView1<i64>,
    target_boxes: ArrayView2<f32>,
    target_sizes: ArrayView1<i64>,
    params: &CostParams,
) -> KaResult<MatchOutput> {
    match_layers(
        pred_logits.insert_axis(ndarray::Axis(0)),
        pred_boxes.insert_axis(ndarray::Axis(0)),
        target_labels,
        target_boxes,
        target_sizes,
        params,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::ClassCost;
    use crate::lsap::linear_sum_assignment;
    use ndarray::{Array1, Array2, Array3, Array4};

    struct Rng(u64);
    impl Rng {
        fn unif(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32) / (1u64 << 24) as f32
        }
        fn below(&mut self, n: usize) -> usize {
            (self.unif() * n as f32) as usize % n.max(1)
        }
    }

    struct Batch {
        logits: Array4<f32>,
        boxes: Array4<f32>,
        labels: Array1<i64>,
        tboxes: Array2<f32>,
        sizes: Array1<i64>,
    }

    fn random_batch(
        r: &mut Rng,
        l: usize,
        b: usize,
        q: usize,
        k: usize,
        ncls: usize,
        tmax: usize,
    ) -> Batch {
        let logits = Array4::from_shape_fn((l, b, q, k), |_| (r.unif() - 0.5) * 8.0);
        let boxes =
            Array4::from_shape_fn(
                (l, b, q, 4),
                |(_, _, _, c)| {
                    if c < 2 {
                        r.unif()
                    } else {
                        r.unif() * 0.4
                    }
                },
            );
        let sizes: Vec<i64> = (0..b).map(|_| r.below(tmax + 1) as i64).collect();
        let total: usize = sizes.iter().map(|&s| s as usize).sum();
        let labels = Array1::from_shape_fn(total, |_| r.below(ncls) as i64);
        let tboxes =
            Array2::from_shape_fn(
                (total, 4),
                |(_, c)| {
                    if c < 2 {
                        r.unif()
                    } else {
                        r.unif() * 0.4
                    }
                },
            );
        Batch {
            logits,
            boxes,
            labels,
            tboxes,
            sizes: Array1::from(sizes),
        }
    }

    /// Reference: per block, cost from cost::build_block, solved by the public LSAP on the
    /// Q×T matrix (scipy's orientation); compare totals.
    #[test]
    fn totals_match_direct_solve_and_layout_is_right() {
        let mut r = Rng(0x5eed_0000_1111_2222);
        for params in [CostParams::detr(), CostParams::deformable()] {
            for &(l, b, q, tmax) in &[
                (2usize, 3usize, 20usize, 6usize),
                (1, 4, 5, 9),
                (3, 2, 50, 50),
            ] {
                let k = 12;
                let ncls = params.class_cost.num_classes(k);
                let bt = random_batch(&mut r, l, b, q, k, ncls, tmax);
                let out = match_layers(
                    bt.logits.view(),
                    bt.boxes.view(),
                    bt.labels.view(),
                    bt.tboxes.view(),
                    bt.sizes.view(),
                    &params,
                )
                .unwrap();
                assert_eq!(out.counts.len(), l * b);
                let mut pos = 0usize;
                let mut ws = CostWorkspace::new();
                for li in 0..l {
                    let mut t0 = 0usize;
                    for bi in 0..b {
                        let t = bt.sizes[bi] as usize;
                        let n = out.counts[li * b + bi] as usize;
                        assert_eq!(n, q.min(t));
                        let pi = &out.pred_idx[pos..pos + n];
                        let ti = &out.target_idx[pos..pos + n];
                        assert!(pi.windows(2).all(|w| w[0] < w[1]), "sorted by pred_idx");
                        let mut seen = vec![false; t];
                        for &x in ti {
                            assert!(!seen[x as usize]);
                            seen[x as usize] = true;
                        }
                        // reference total
                        let lg = bt.logits.slice(ndarray::s![li, bi, .., ..]).to_owned();
                        let bx = bt.boxes.slice(ndarray::s![li, bi, .., ..]).to_owned();
                        let labs: Vec<usize> = bt
                            .labels
                            .iter()
                            .skip(t0)
                            .take(t)
                            .map(|&x| x as usize)
                            .collect();
                        let tb = bt.tboxes.slice(ndarray::s![t0..t0 + t, ..]).to_owned();
                        cost::build_block(
                            &mut ws,
                            lg.as_slice().unwrap(),
                            k,
                            bx.as_slice().unwrap(),
                            &labs,
                            tb.as_slice().unwrap(),
                            &params,
                            BlockId {
                                layer: li,
                                image: bi,
                            },
                        )
                        .unwrap();
                        let c_tq = Array2::from_shape_vec((t, q), ws.cost.clone())
                            .unwrap()
                            .mapv(f64::from);
                        let c_qt = c_tq.t().to_owned();
                        let (rows, cols) = linear_sum_assignment(c_qt.view(), false).unwrap();
                        let want: f64 = rows.iter().zip(&cols).map(|(&a, &c)| c_qt[[a, c]]).sum();
                        let got: f64 = pi
                            .iter()
                            .zip(ti)
                            .map(|(&a, &c)| c_qt[[a as usize, c as usize]])
                            .sum();
                        assert!((want - got).abs() <= 1e-9 * want.abs().max(1.0));
                        // no ties in random data: indices agree too
                        assert_eq!(rows.iter().map(|&x| x as i64).collect::<Vec<_>>(), pi);
                        pos += n;
                        t0 += t;
                    }
                }
                assert_eq!(pos, out.pred_idx.len());
            }
        }
    }

    #[test]
    fn parallel_equals_sequential() {
        // big enough to cross the parallel threshold
        let mut r = Rng(77);
        let p = CostParams::detr();
        let bt = random_batch(&mut r, 2, 16, 100, 92, 91, 30);
        let out = match_layers_impl(
            &bt.logits.outer_iter().collect::<Vec<_>>(),
            &bt.boxes.outer_iter().collect::<Vec<_>>(),
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
            || true, // parallel even on a busy machine
        )
        .unwrap();
        // one image at a time (always sequential) must give the same blocks
        let mut pos = 0;
        for li in 0..2 {
            let mut t0 = 0usize;
            for bi in 0..16 {
                let t = bt.sizes[bi] as usize;
                let single = match_batch(
                    bt.logits.slice(ndarray::s![li, bi..bi + 1, .., ..]),
                    bt.boxes.slice(ndarray::s![li, bi..bi + 1, .., ..]),
                    bt.labels.slice(ndarray::s![t0..t0 + t]),
                    bt.tboxes.slice(ndarray::s![t0..t0 + t, ..]),
                    ndarray::arr1(&[t as i64]).view(),
                    &p,
                )
                .unwrap();
                let n = single.pred_idx.len();
                assert_eq!(&out.pred_idx[pos..pos + n], &single.pred_idx[..]);
                assert_eq!(&out.target_idx[pos..pos + n], &single.target_idx[..]);
                pos += n;
                t0 += t;
            }
        }
    }

    #[test]
    fn more_targets_than_queries_and_empty_images() {
        let mut r = Rng(3);
        let p = CostParams::detr();
        let logits = Array4::from_shape_fn((1, 3, 4, 5), |_| r.unif());
        let boxes = Array4::from_shape_fn((1, 3, 4, 4), |_| r.unif() * 0.3 + 0.1);
        let sizes = ndarray::arr1(&[7i64, 0, 2]);
        let labels = Array1::from_shape_fn(9, |i| (i % 4) as i64);
        let tboxes = Array2::from_shape_fn((9, 4), |_| r.unif() * 0.3 + 0.1);
        let out = match_layers(
            logits.view(),
            boxes.view(),
            labels.view(),
            tboxes.view(),
            sizes.view(),
            &p,
        )
        .unwrap();
        assert_eq!(out.counts, vec![4, 0, 2]);
        assert_eq!(&out.pred_idx[..4], &[0, 1, 2, 3]);
        assert!(out.target_idx[..4].iter().all(|&t| (0..7).contains(&t)));
        // zero queries
        let out = match_layers(
            Array4::<f32>::zeros((2, 3, 0, 5)).view(),
            Array4::<f32>::zeros((2, 3, 0, 4)).view(),
            labels.view(),
            tboxes.view(),
            sizes.view(),
            &p,
        )
        .unwrap();
        assert_eq!(out.counts, vec![0; 6]);
        // zero layers / zero images
        let out = match_layers(
            Array4::<f32>::zeros((0, 0, 4, 5)).view(),
            Array4::<f32>::zeros((0, 0, 4, 4)).view(),
            Array1::<i64>::zeros(0).view(),
            Array2::<f32>::zeros((0, 4)).view(),
            Array1::<i64>::zeros(0).view(),
            &p,
        )
        .unwrap();
        assert!(out.counts.is_empty() && out.pred_idx.is_empty());
    }

    #[test]
    fn separate_layer_arrays_equal_one_stacked_array() {
        let mut r = Rng(5);
        let p = CostParams::detr();
        let bt = random_batch(&mut r, 3, 4, 30, 10, 9, 12);
        let stacked = match_layers(
            bt.logits.view(),
            bt.boxes.view(),
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
        )
        .unwrap();
        // separate arrays, one of them non-contiguous (a transposed copy viewed back)
        let mut lg: Vec<Array3<f32>> = bt.logits.outer_iter().map(|a| a.to_owned()).collect();
        let bx: Vec<Array3<f32>> = bt.boxes.outer_iter().map(|a| a.to_owned()).collect();
        let t = lg[1].t().as_standard_layout().into_owned();
        lg[1] = t.reversed_axes(); // same values, Fortran order
        assert!(!lg[1].is_standard_layout());
        let lg_views: Vec<_> = lg.iter().map(|a| a.view()).collect();
        let bx_views: Vec<_> = bx.iter().map(|a| a.view()).collect();
        let list = match_layer_list(
            &lg_views,
            &bx_views,
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
        )
        .unwrap();
        assert_eq!(list, stacked);
        // sets of different shapes are refused, naming the set
        let small = Array3::<f32>::zeros((4, 29, 10));
        let mut views = lg_views.clone();
        views[2] = small.view();
        let e = match_layer_list(
            &views,
            &bx_views,
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("pred_logits: prediction set 2 has shape"),
            "{e}"
        );
        let e = match_layer_list(
            &lg_views,
            &bx_views[..2],
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("pred_boxes: got 2 prediction sets"), "{e}");
    }

    #[test]
    fn oversized_and_overflowing_inputs_are_errors_not_aborts() {
        let p = CostParams::detr();
        // Q = T = 4e5 in one image: the 4e5 x 4e5 f32 block (640 GB) cannot be allocated.
        // Under `vm.overcommit_memory = 1` the kernel would hand the pages out anyway (and
        // kill the process filling them): only the other checks run there.
        let overcommit_always = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .is_ok_and(|s| s.trim() == "1");
        if !overcommit_always {
            let n = 400_000;
            let logit = Array1::from(vec![0.5f32, -0.5]);
            let logits = logit.broadcast((1, n, 2)).unwrap();
            let bx = Array1::from(vec![0.5f32, 0.5, 0.2, 0.2]);
            let boxes = bx.broadcast((1, n, 4)).unwrap();
            let labels = Array1::<i64>::zeros(n);
            let tboxes = bx.broadcast((n, 4)).unwrap();
            let sizes = Array1::from(vec![n as i64]);
            let e = match_layer_list(&[logits], &[boxes], labels.view(), tboxes, sizes.view(), &p)
                .unwrap_err();
            assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
            assert!(
                e.to_string().starts_with(
                    "pred_boxes/target_boxes: the 400000x400000 cost block of layer 0, image 0"
                ),
                "{e}"
            );
        }
        // target sizes whose sum overflows (they would wrap to the label count)
        let sizes = Array1::from(vec![i64::MAX, i64::MAX, 2]);
        let lg = Array3::<f32>::zeros((3, 2, 3));
        let bb = Array3::from_elem((3, 2, 4), 0.25f32);
        let e = match_layer_list(
            &[lg.view()],
            &[bb.view()],
            Array1::<i64>::zeros(0).view(),
            Array2::<f32>::zeros((0, 4)).view(),
            sizes.view(),
            &p,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("target_sizes: the sizes overflow"),
            "{e}"
        );
        // a broadcast batch of 2^56 images with no queries: refused before any work (its
        // offsets alone would take 2^59 bytes, beyond any address space)
        let nb = 1 << 56;
        let sizes = Array1::from(vec![0i64]);
        let sizes = sizes.broadcast(nb).unwrap();
        let empty = Array3::<f32>::zeros((1, 0, 3));
        let lg = empty.broadcast((nb, 0, 3)).unwrap();
        let eb = Array3::<f32>::zeros((1, 0, 4));
        let bb = eb.broadcast((nb, 0, 4)).unwrap();
        let e = match_layer_list(
            &[lg],
            &[bb],
            Array1::<i64>::zeros(0).view(),
            Array2::<f32>::zeros((0, 4)).view(),
            sizes,
            &p,
        )
        .unwrap_err();
        assert!(matches!(e, KaError::OutOfMemory { .. }), "{e}");
    }

    #[test]
    fn broadcast_and_strided_inputs_match_contiguous_copies() {
        let mut r = Rng(5);
        let p = CostParams::detr();
        let bt = random_batch(&mut r, 1, 3, 7, 5, 4, 4);
        let logits = bt.logits.index_axis(ndarray::Axis(0), 0);
        let boxes = bt.boxes.index_axis(ndarray::Axis(0), 0);
        // one image's predictions broadcast over the batch
        let lg = logits.slice(ndarray::s![0..1, .., ..]);
        let lg = lg.broadcast((3, 7, 5)).unwrap();
        let bx = boxes.slice(ndarray::s![0..1, .., ..]);
        let bx = bx.broadcast((3, 7, 4)).unwrap();
        let tb_t = bt.tboxes.t().to_owned();
        let tb = tb_t.t(); // a Fortran-order view
        let got =
            match_layer_list(&[lg], &[bx], bt.labels.view(), tb, bt.sizes.view(), &p).unwrap();
        let want = match_layer_list(
            &[lg.to_owned().view()],
            &[bx.to_owned().view()],
            bt.labels.view(),
            bt.tboxes.view(),
            bt.sizes.view(),
            &p,
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn invalid_inputs_name_the_argument() {
        let mut r = Rng(11);
        let p = CostParams::detr();
        let bt = random_batch(&mut r, 1, 2, 6, 4, 3, 3);
        let call = |lg: &Array4<f32>,
                    bx: &Array4<f32>,
                    la: &Array1<i64>,
                    tb: &Array2<f32>,
                    sz: &Array1<i64>,
                    p: &CostParams| {
            match_layers(lg.view(), bx.view(), la.view(), tb.view(), sz.view(), p)
                .unwrap_err()
                .to_string()
        };
        let bad_boxes = Array4::<f32>::zeros((1, 2, 5, 4));
        assert!(
            call(&bt.logits, &bad_boxes, &bt.labels, &bt.tboxes, &bt.sizes, &p)
                .starts_with("pred_boxes:")
        );
        let bad_sizes = Array1::from(vec![1i64]);
        assert!(
            call(&bt.logits, &bt.boxes, &bt.labels, &bt.tboxes, &bad_sizes, &p)
                .starts_with("target_sizes:")
        );
        let neg = Array1::from(vec![-1i64, 1]);
        assert!(
            call(&bt.logits, &bt.boxes, &bt.labels, &bt.tboxes, &neg, &p)
                .starts_with("target_sizes:")
        );
        let wrong_sum = Array1::from(vec![bt.sizes[0] + 1, bt.sizes[1]]);
        assert!(
            call(&bt.logits, &bt.boxes, &bt.labels, &bt.tboxes, &wrong_sum, &p)
                .starts_with("target_labels:")
        );
        // label == K-1 (no-object) is out of range for softmax but fine for focal
        let sizes = Array1::from(vec![1i64, 0]);
        let lab = Array1::from(vec![3i64]);
        let tb = Array2::from_elem((1, 4), 0.2f32);
        let e = call(&bt.logits, &bt.boxes, &lab, &tb, &sizes, &p);
        assert!(
            e.starts_with("target_labels: image 0: label 3 is out of range"),
            "{e}"
        );
        let e = call(
            &bt.logits,
            &bt.boxes,
            &lab,
            &tb,
            &Array1::from(vec![0i64, 1]),
            &p,
        );
        assert!(
            e.starts_with("target_labels: image 1: label 3 is out of range"),
            "{e}"
        );
        assert!(match_layers(
            bt.logits.view(),
            bt.boxes.view(),
            lab.view(),
            tb.view(),
            sizes.view(),
            &CostParams::deformable()
        )
        .is_ok());
        let lab = Array1::from(vec![-1i64]);
        assert!(call(&bt.logits, &bt.boxes, &lab, &tb, &sizes, &p).starts_with("target_labels:"));
        let lab = Array1::from(vec![0i64]);
        let mut tb2 = tb.clone();
        tb2[[0, 2]] = f32::NAN;
        assert!(call(&bt.logits, &bt.boxes, &lab, &tb2, &sizes, &p).starts_with("target_boxes:"));
        tb2[[0, 2]] = -0.5;
        assert!(call(&bt.logits, &bt.boxes, &lab, &tb2, &sizes, &p).starts_with("target_boxes:"));
        let tb3 = Array2::from_elem((1, 3), 0.2f32);
        assert!(match_layers(
            bt.logits.view(),
            bt.boxes.view(),
            lab.view(),
            tb3.view(),
            sizes.view(),
            &p
        )
        .unwrap_err()
        .to_string()
        .starts_with("target_boxes:"));
        // NaN logits in an image without targets are still reported
        let mut lg = bt.logits.clone();
        lg[[0, 1, 2, 0]] = f32::NAN;
        let e = call(&lg, &bt.boxes, &lab, &tb, &sizes, &p);
        assert_eq!(
            e,
            "pred_logits: non-finite value at layer 0, image 1, query 2"
        );
        let mut bx = bt.boxes.clone();
        bx[[0, 0, 1, 0]] = f32::INFINITY;
        assert!(call(&bt.logits, &bx, &lab, &tb, &sizes, &p).starts_with("pred_boxes:"));
        // huge weights overflow
        let huge = CostParams::new(1.0, 1e38, 1e38, ClassCost::Softmax).unwrap();
        let mut tb4 = tb.clone();
        tb4[[0, 0]] = 5.0;
        let e = call(&bt.logits, &bt.boxes, &lab, &tb4, &sizes, &huge);
        assert!(e.contains("not finite"), "{e}");
    }
}
