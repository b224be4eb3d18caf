//! PyO3 bindings (`ka_rs._native`): validation, zero-copy numpy views, GIL released for the
//! work. The Python wrappers in `ka_rs.ops` / `ka_rs.matcher` / `ka_rs.labels` call these.
//!
//! Errors: [`KaError::InvalidArgument`] → `ValueError("<arg>: <problem>")`,
//! [`KaError::Infeasible`] → `InfeasibleAssignmentError` (a `ValueError` subclass),
//! [`KaError::OutOfMemory`] → `MemoryError("<arg>: <buffer>: out of memory ...")`; a scalar
//! argument of the wrong type (a `bool` given as a weight, a `str` given as `maximize`) →
//! `TypeError("<arg>: ...")`. Nothing here panics or aborts on user input.
//!
//! Arrays: numpy arrays of the expected element type with any strides (non-contiguous,
//! negative, zero for broadcast) are read in place. Arrays rust-numpy cannot view exactly
//! (non-native byte order, unaligned data, strides that are not a multiple of the item size,
//! as in a field of a structured array) are first copied by numpy into a native, aligned,
//! C-contiguous array of the same type: never misread.

use crate::boxes::{self, BoxFormat};
use crate::cost::{ClassCost, CostParams};
use crate::error::KaError;
use crate::lsap;
use crate::matcher;
use numpy::{
    IntoPyArray, PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyMemoryError, PyTypeError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    ka_rs,
    InfeasibleAssignmentError,
    PyValueError,
    "The cost matrix is infeasible: no complete assignment avoids the forbidden (+inf) pairs."
);

fn to_py(e: KaError) -> PyErr {
    match e {
        KaError::Infeasible(_) => InfeasibleAssignmentError::new_err(e.to_string()),
        KaError::InvalidArgument { .. } => PyValueError::new_err(e.to_string()),
        KaError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
    }
}

fn invalid(arg: &str, msg: impl Into<String>) -> PyErr {
    to_py(KaError::invalid(arg, msg))
}

fn type_error(arg: &str, msg: impl std::fmt::Display) -> PyErr {
    PyTypeError::new_err(format!("{arg}: {msg}"))
}

/// `type(obj).__name__` and a short `repr(obj)`, for messages.
fn what_is(obj: &Bound<'_, PyAny>) -> String {
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    let mut r = obj
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "?".into());
    if r.len() > 40 {
        let cut = (0..=40).rev().find(|&i| r.is_char_boundary(i)).unwrap_or(0);
        r.truncate(cut);
        r.push_str("...");
    }
    format!("{ty} {r}")
}

/// An optional argument as the caller gave it: `Given(None)` when left out (its default
/// applies), `Given(Some(obj))` for anything passed, `None` included, so that an explicit
/// `maximize=None` is checked (and refused) like any other value.
struct Given<'py>(Option<Bound<'py, PyAny>>);

impl<'a, 'py> FromPyObject<'a, 'py> for Given<'py> {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> Result<Self, Self::Error> {
        Ok(Given(Some(obj.to_owned())))
    }
}

impl<'py> Given<'py> {
    /// The value checked by `check`, or `default` when the argument was left out.
    fn or<T>(
        &self,
        default: T,
        check: impl FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
    ) -> PyResult<T> {
        match &self.0 {
            Some(obj) => check(obj),
            None => Ok(default),
        }
    }
}

/// True for `True` / `False` and numpy's bool scalars.
fn is_bool(obj: &Bound<'_, PyAny>) -> bool {
    obj.extract::<bool>().is_ok()
}

/// A real bool (`bool` or `numpy.bool_`); anything else, truthy or not, is a `TypeError`
/// naming `arg` (a string such as `"no"` must not silently mean `True`).
fn flag(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<bool> {
    obj.extract::<bool>().map_err(|_| {
        type_error(
            arg,
            format!("expected a bool (True or False), got {}", what_is(obj)),
        )
    })
}

/// A real number (int, float or a numpy scalar) as f64; a bool is not a number here
/// (`cost_class=True` is a mistake, not a weight of 1). `TypeError` naming `arg`.
fn real(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<f64> {
    if is_bool(obj) {
        return Err(type_error(
            arg,
            format!("expected a number, got a bool ({})", what_is(obj)),
        ));
    }
    obj.extract::<f64>()
        .map_err(|_| type_error(arg, format!("expected a number, got {}", what_is(obj))))
}

/// `None` or a [`real`].
fn opt_real(obj: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<f64>> {
    match obj {
        Some(o) if !o.is_none() => real(o, arg).map(Some),
        _ => Ok(None),
    }
}

/// An integer (int or numpy integer, not a bool or a float): `TypeError` naming `arg`, or
/// `ValueError` when it does not fit in 64 bits.
fn integer(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<i64> {
    if is_bool(obj) {
        return Err(type_error(
            arg,
            format!("expected an integer, got a bool ({})", what_is(obj)),
        ));
    }
    obj.extract::<i64>().map_err(|e| {
        if e.is_instance_of::<pyo3::exceptions::PyOverflowError>(obj.py()) {
            invalid(arg, format!("{} does not fit in 64 bits", what_is(obj)))
        } else {
            type_error(arg, format!("expected an integer, got {}", what_is(obj)))
        }
    })
}

/// A `str` argument: `TypeError` naming `arg` for anything else.
fn text(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<String> {
    obj.extract::<String>()
        .map_err(|_| type_error(arg, format!("expected a str, got {}", what_is(obj))))
}

/// True when rust-numpy's view of `a` would read exactly numpy's elements: native byte
/// order, aligned data, every stride a multiple of the item size. (rust-numpy divides strides
/// by the item size, so a 5-byte stride of a float32 field in a structured array would be
/// read as a 4-byte one, and ndarray requires aligned element pointers.)
fn exact_view(a: &Bound<'_, PyUntypedArray>) -> bool {
    let dtype = a.dtype();
    let item = dtype.itemsize().max(1) as isize;
    dtype.is_native_byteorder() != Some(false)
        && a.is_aligned()
        && a.strides().iter().all(|s| s % item == 0)
}

/// A native-byte-order, aligned, C-contiguous copy of the numpy array `obj` (numpy's
/// `astype(dtype.newbyteorder("="), order="C")`), or `None` when `obj` is not a numpy array
/// that needs one. Numpy raises `MemoryError` itself when the copy does not fit.
fn exact_copy<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let Ok(a) = obj.cast::<PyUntypedArray>() else {
        return Ok(None);
    };
    if exact_view(a) {
        return Ok(None);
    }
    let native = a.dtype().call_method1("newbyteorder", ("=",))?;
    let kwargs = pyo3::types::PyDict::new(obj.py());
    kwargs.set_item("order", "C")?;
    Ok(Some(obj.call_method("astype", (native,), Some(&kwargs))?))
}

/// `obj` as a numpy array of element type T and dimension D that rust-numpy views exactly
/// (see [`exact_view`]), or `None`.
fn view<'py, T, D>(obj: &Bound<'py, PyAny>) -> Option<numpy::PyReadonlyArray<'py, T, D>>
where
    T: numpy::Element,
    D: numpy::ndarray::Dimension,
{
    obj.extract::<numpy::PyReadonlyArray<'py, T, D>>()
        .ok()
        .filter(|a| exact_view(a.as_untyped()))
}

/// [`view`], or a view of numpy's exact copy when `obj` is a byte-swapped, unaligned or
/// oddly strided array (of the right type or not: `None` then).
fn exact<'py, T, D>(obj: &Bound<'py, PyAny>) -> PyResult<Option<numpy::PyReadonlyArray<'py, T, D>>>
where
    T: numpy::Element,
    D: numpy::ndarray::Dimension,
{
    if let Some(a) = view(obj) {
        return Ok(Some(a));
    }
    Ok(exact_copy(obj)?.and_then(|copy| view(&copy)))
}

/// dtype name and shape of a numpy array, or an error naming `arg` for a non-array.
fn describe(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<(String, Vec<usize>)> {
    let a = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        invalid(arg, format!("expected a numpy array, got {ty}"))
    })?;
    let dtype = a
        .dtype()
        .str()
        .map(|s| s.to_string())
        .unwrap_or_else(|_| "?".into());
    Ok((dtype, a.shape().to_vec()))
}

fn shape_str(s: &[usize]) -> String {
    let inner: Vec<String> = s.iter().map(|d| d.to_string()).collect();
    if inner.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    }
}

/// Extract a numpy array of element type T and dimension D, with errors naming `arg`.
fn typed<'py, T, D>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    want: &str,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>>
where
    T: numpy::Element,
    D: numpy::ndarray::Dimension,
{
    if let Some(a) = exact(obj)? {
        return Ok(a);
    }
    // describe the argument only on failure: it costs a few Python attribute lookups
    let (dtype, shape) = describe(obj, arg)?;
    Err(invalid(
        arg,
        format!(
            "expected {want}, got dtype {dtype} with shape {}",
            shape_str(&shape)
        ),
    ))
}

/// A 2-D float32 or float64 array.
enum F2<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

fn float2<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<F2<'py>> {
    // the usual case first (one extraction attempt per type), a numpy copy only when needed
    let as_f2 = |o: &Bound<'py, PyAny>| match view::<f32, _>(o) {
        Some(a) => Some(F2::F32(a)),
        None => view::<f64, _>(o).map(F2::F64),
    };
    if let Some(a) = as_f2(obj) {
        return Ok(a);
    }
    if let Some(a) = exact_copy(obj)?.and_then(|copy| as_f2(&copy)) {
        return Ok(a);
    }
    let (dtype, shape) = describe(obj, arg)?;
    Err(invalid(
        arg,
        format!(
            "expected a 2-D float32 or float64 array, got dtype {dtype} with shape {}",
            shape_str(&shape)
        ),
    ))
}

/// Convert (N, 4) boxes between "xyxy", "cxcywh" and "xywh"; same dtype out.
#[pyfunction]
#[pyo3(signature = (boxes, in_fmt, out_fmt))]
fn box_convert<'py>(
    py: Python<'py>,
    boxes: &Bound<'py, PyAny>,
    in_fmt: &Bound<'py, PyAny>,
    out_fmt: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let from = BoxFormat::parse(&text(in_fmt, "in_fmt")?, "in_fmt").map_err(to_py)?;
    let to = BoxFormat::parse(&text(out_fmt, "out_fmt")?, "out_fmt").map_err(to_py)?;
    match float2(boxes, "boxes")? {
        F2::F32(a) => {
            let v = a.as_array();
            let out = py.detach(|| boxes::convert(v, from, to)).map_err(to_py)?;
            Ok(out.into_pyarray(py).into_any())
        }
        F2::F64(a) => {
            let v = a.as_array();
            let out = py.detach(|| boxes::convert(v, from, to)).map_err(to_py)?;
            Ok(out.into_pyarray(py).into_any())
        }
    }
}

fn pairwise_py<'py>(
    py: Python<'py>,
    boxes1: &Bound<'py, PyAny>,
    boxes2: &Bound<'py, PyAny>,
    generalized: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let a = float2(boxes1, "boxes1")?;
    let b = float2(boxes2, "boxes2")?;
    match (a, b) {
        (F2::F32(a), F2::F32(b)) => {
            let (va, vb) = (a.as_array(), b.as_array());
            let out = py
                .detach(|| {
                    if generalized {
                        boxes::generalized_box_iou(va, vb)
                    } else {
                        boxes::box_iou(va, vb)
                    }
                })
                .map_err(to_py)?;
            Ok(out.into_pyarray(py).into_any())
        }
        (F2::F64(a), F2::F64(b)) => {
            let (va, vb) = (a.as_array(), b.as_array());
            let out = py
                .detach(|| {
                    if generalized {
                        boxes::generalized_box_iou(va, vb)
                    } else {
                        boxes::box_iou(va, vb)
                    }
                })
                .map_err(to_py)?;
            Ok(out.into_pyarray(py).into_any())
        }
        (F2::F32(_), F2::F64(_)) => Err(invalid(
            "boxes2",
            "dtype float64 does not match boxes1's float32",
        )),
        (F2::F64(_), F2::F32(_)) => Err(invalid(
            "boxes2",
            "dtype float32 does not match boxes1's float64",
        )),
    }
}

/// Pairwise IoU (N, M) of xyxy boxes (N, 4) and (M, 4); same dtype in and out.
#[pyfunction]
#[pyo3(signature = (boxes1, boxes2))]
fn box_iou<'py>(
    py: Python<'py>,
    boxes1: &Bound<'py, PyAny>,
    boxes2: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    pairwise_py(py, boxes1, boxes2, false)
}

/// Pairwise generalised IoU (N, M) of xyxy boxes; same dtype in and out.
#[pyfunction]
#[pyo3(signature = (boxes1, boxes2))]
fn generalized_box_iou<'py>(
    py: Python<'py>,
    boxes1: &Bound<'py, PyAny>,
    boxes2: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    pairwise_py(py, boxes1, boxes2, true)
}

/// Two int64 index arrays (rows / cols).
type IndexPair<'py> = (Bound<'py, PyArray1<i64>>, Bound<'py, PyArray1<i64>>);

fn usize_to_i64(v: Vec<usize>) -> Vec<i64> {
    v.into_iter().map(|x| x as i64).collect()
}

/// Class-aware NMS on xyxy boxes: kept indices (int64), sorted by decreasing score.
#[pyfunction]
#[pyo3(signature = (boxes, scores, labels, iou_threshold))]
fn batched_nms<'py>(
    py: Python<'py>,
    boxes: &Bound<'py, PyAny>,
    scores: &Bound<'py, PyAny>,
    labels: &Bound<'py, PyAny>,
    iou_threshold: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let iou_threshold = real(iou_threshold, "iou_threshold")?;
    let labels: PyReadonlyArray1<'py, i64> = typed(labels, "labels", "a 1-D int64 array")?;
    let lv = labels.as_array();
    let keep = match float2(boxes, "boxes")? {
        F2::F32(b) => {
            let s: PyReadonlyArray1<'py, f32> = typed(
                scores,
                "scores",
                "a 1-D float32 array (same dtype as boxes)",
            )?;
            let (bv, sv) = (b.as_array(), s.as_array());
            py.detach(|| boxes::batched_nms(bv, sv, lv, iou_threshold))
        }
        F2::F64(b) => {
            let s: PyReadonlyArray1<'py, f64> = typed(
                scores,
                "scores",
                "a 1-D float64 array (same dtype as boxes)",
            )?;
            let (bv, sv) = (b.as_array(), s.as_array());
            py.detach(|| boxes::batched_nms(bv, sv, lv, iou_threshold))
        }
    }
    .map_err(to_py)?;
    Ok(PyArray1::from_vec(py, usize_to_i64(keep)))
}

/// Linear sum assignment with scipy's contract: `(rows, cols)` int64, rows ascending.
/// `cost` is a 2-D float64 (or float32, widened exactly) array; `+inf` = forbidden pair.
/// `maximize` must be a bool.
#[pyfunction]
#[pyo3(signature = (cost, maximize=Given(None)), text_signature = "(cost, maximize=False)")]
fn linear_sum_assignment<'py>(
    py: Python<'py>,
    cost: &Bound<'py, PyAny>,
    maximize: Given<'py>,
) -> PyResult<IndexPair<'py>> {
    let maximize = maximize.or(false, |m| flag(m, "maximize"))?;
    let (rows, cols) = match float2(cost, "cost")? {
        F2::F64(c) => {
            let v = c.as_array();
            py.detach(|| lsap::linear_sum_assignment(v, maximize))
        }
        F2::F32(c) => {
            let v = c.as_array();
            py.detach(|| lsap::linear_sum_assignment(v, maximize))
        }
    }
    .map_err(to_py)?;
    Ok((
        PyArray1::from_vec(py, usize_to_i64(rows)),
        PyArray1::from_vec(py, usize_to_i64(cols)),
    ))
}

/// Float32 arrays of one dimension from a Python list (or tuple), errors naming `arg[i]`.
fn typed_list<'py, D: numpy::ndarray::Dimension>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
    want: &str,
) -> PyResult<Vec<numpy::PyReadonlyArray<'py, f32, D>>> {
    let items = obj
        .try_iter()
        .map_err(|_| invalid(arg, format!("expected a list of {want}")))?;
    items
        .enumerate()
        .map(|(i, item)| typed(&item?, &format!("{arg}[{i}]"), want))
        .collect()
}

/// Hungarian matching of L prediction sets × B images in one call (see `matcher.rs`).
///
/// `pred_logits` / `pred_boxes` are lists of L float32 arrays (B, Q, K) / (B, Q, 4), all of
/// one shape, so separate decoder-layer tensors need no stacking copy. Returns
/// `(indices, counts)`: `counts` (a list of L·B ints, l-major then b) gives the pairs per
/// block, and `indices` (int64, 2M) holds every block's query indices (sorted within a
/// block) followed by every block's target indices (local to the image), so the caller can
/// split both halves with one `split(counts + counts)`.
#[pyfunction]
#[pyo3(signature = (
    pred_logits, pred_boxes, target_labels, target_boxes, target_sizes,
    cost_class=Given(None), cost_bbox=Given(None), cost_giou=Given(None),
    class_cost=Given(None), focal_alpha=Given(None), focal_gamma=Given(None)
), text_signature = "(pred_logits, pred_boxes, target_labels, target_boxes, target_sizes, \
    cost_class=1.0, cost_bbox=5.0, cost_giou=2.0, class_cost='softmax', focal_alpha=0.25, \
    focal_gamma=2.0)")]
#[allow(clippy::too_many_arguments)]
fn match_layers<'py>(
    py: Python<'py>,
    pred_logits: &Bound<'py, PyAny>,
    pred_boxes: &Bound<'py, PyAny>,
    target_labels: &Bound<'py, PyAny>,
    target_boxes: &Bound<'py, PyAny>,
    target_sizes: &Bound<'py, PyAny>,
    cost_class: Given<'py>,
    cost_bbox: Given<'py>,
    cost_giou: Given<'py>,
    class_cost: Given<'py>,
    focal_alpha: Given<'py>,
    focal_gamma: Given<'py>,
) -> PyResult<(Bound<'py, PyArray1<i64>>, Vec<i64>)> {
    let cost_class = cost_class.or(1.0, |o| real(o, "cost_class"))?;
    let cost_bbox = cost_bbox.or(5.0, |o| real(o, "cost_bbox"))?;
    let cost_giou = cost_giou.or(2.0, |o| real(o, "cost_giou"))?;
    let focal_alpha = focal_alpha.or(0.25, |o| real(o, "focal_alpha"))?;
    let focal_gamma = focal_gamma.or(2.0, |o| real(o, "focal_gamma"))?;
    let class_cost = class_cost.or("softmax".to_owned(), |o| text(o, "class_cost"))?;
    let kind = ClassCost::parse(&class_cost, focal_alpha, focal_gamma).map_err(to_py)?;
    let params = CostParams::new(cost_class, cost_bbox, cost_giou, kind).map_err(to_py)?;
    let logits =
        typed_list::<numpy::Ix3>(pred_logits, "pred_logits", "3-D float32 arrays (B, Q, K)")?;
    let boxes = typed_list::<numpy::Ix3>(pred_boxes, "pred_boxes", "3-D float32 arrays (B, Q, 4)")?;
    let labels: PyReadonlyArray1<'py, i64> =
        typed(target_labels, "target_labels", "a 1-D int64 array (sumT,)")?;
    let tboxes: PyReadonlyArray2<'py, f32> = typed(
        target_boxes,
        "target_boxes",
        "a 2-D float32 array (sumT, 4)",
    )?;
    let sizes: PyReadonlyArray1<'py, i64> =
        typed(target_sizes, "target_sizes", "a 1-D int64 array (B,)")?;
    let lv: Vec<_> = logits.iter().map(|a| a.as_array()).collect();
    let bv: Vec<_> = boxes.iter().map(|a| a.as_array()).collect();
    let (labv, tbv, sv) = (labels.as_array(), tboxes.as_array(), sizes.as_array());
    let out = py
        .detach(|| matcher::match_layer_list(&lv, &bv, labv, tbv, sv, &params))
        .map_err(to_py)?;
    let mut indices = out.pred_idx;
    let total = indices.len().saturating_add(out.target_idx.len());
    crate::alloc::try_reserve_to(&mut indices, total, "pred_logits", "the matched indices")
        .map_err(to_py)?;
    indices.extend_from_slice(&out.target_idx);
    Ok((PyArray1::from_vec(py, indices), out.counts))
}

#[pymodule(name = "_native", module = "ka_rs")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add(
        "InfeasibleAssignmentError",
        m.py().get_type::<InfeasibleAssignmentError>(),
    )?;
    m.add_function(wrap_pyfunction!(box_convert, m)?)?;
    m.add_function(wrap_pyfunction!(box_iou, m)?)?;
    m.add_function(wrap_pyfunction!(generalized_box_iou, m)?)?;
    m.add_function(wrap_pyfunction!(batched_nms, m)?)?;
    m.add_function(wrap_pyfunction!(linear_sum_assignment, m)?)?;
    m.add_function(wrap_pyfunction!(match_layers, m)?)?;
    register_targets(m)?; // KA pseudo-targets (targets.rs)
    Ok(())
}

// ---- KA pseudo-targets (targets.rs) ----
// Owned by the "targets" engineer: the `build_pseudo_targets` binding, registered by
// `register_targets` (one line in the module init above).

/// Items of a Python list/sequence argument, with errors naming `arg`.
fn targets_items<'py>(obj: &Bound<'py, PyAny>, arg: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if obj.is_instance_of::<pyo3::types::PyString>() {
        return Err(invalid(arg, "expected a list, got a str"));
    }
    obj.try_iter()
        .map_err(|_| invalid(arg, "expected a list"))?
        .collect::<PyResult<Vec<_>>>()
}

/// `(labels, boxes, soft_logits, scores, teacher, counts)` as returned to Python.
type PseudoTargetArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, numpy::PyArray2<f32>>,
    Bound<'py, numpy::PyArray2<f32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
);

/// Build KA pseudo-targets for a batch and all teachers in one call (see `targets.rs`).
///
/// `teacher_logits[k]` f32 (B, Q_k, K_k), `teacher_boxes[k]` f32 (B, Q_k, 4) cxcywh,
/// `local_to_union[k]` i64 (C_k,), `teacher_kinds[k]` "softmax" (K_k = C_k + 1) or "sigmoid"
/// (K_k = C_k). Returns `(labels i64 (M,), boxes f32 (M, 4), soft_logits f32 (M, U + 1),
/// scores f32 (M,), teacher i64 (M,), counts i64 (B,))`, images in order, each image's rows by
/// decreasing score.
#[pyfunction]
#[pyo3(signature = (
    teacher_logits, teacher_boxes, local_to_union, num_union_classes, teacher_kinds,
    threshold, top_n, fill_logit, nms_iou = None
))]
#[allow(clippy::too_many_arguments)]
fn build_pseudo_targets<'py>(
    py: Python<'py>,
    teacher_logits: &Bound<'py, PyAny>,
    teacher_boxes: &Bound<'py, PyAny>,
    local_to_union: &Bound<'py, PyAny>,
    num_union_classes: &Bound<'py, PyAny>,
    teacher_kinds: &Bound<'py, PyAny>,
    threshold: &Bound<'py, PyAny>,
    top_n: &Bound<'py, PyAny>,
    fill_logit: &Bound<'py, PyAny>,
    nms_iou: Option<&Bound<'py, PyAny>>,
) -> PyResult<PseudoTargetArrays<'py>> {
    use crate::targets::{self, PseudoTargetConfig, TeacherKind, TeacherOutputs};
    use numpy::PyReadonlyArray3;

    let num_union_classes = integer(num_union_classes, "num_union_classes")?;
    let threshold = real(threshold, "threshold")?;
    let top_n = integer(top_n, "top_n")?;
    let fill_logit = real(fill_logit, "fill_logit")?;
    let nms_iou = opt_real(nms_iou, "nms_iou")?;

    let config = PseudoTargetConfig::new(num_union_classes, threshold, top_n, fill_logit, nms_iou)
        .map_err(to_py)?;
    let logits = targets_items(teacher_logits, "teacher_logits")?;
    let n = logits.len();
    let boxes = targets_items(teacher_boxes, "teacher_boxes")?;
    let maps = targets_items(local_to_union, "local_to_union")?;
    let kinds = targets_items(teacher_kinds, "teacher_kinds")?;
    for (arg, len) in [
        ("teacher_boxes", boxes.len()),
        ("local_to_union", maps.len()),
        ("teacher_kinds", kinds.len()),
    ] {
        if len != n {
            return Err(invalid(
                arg,
                format!("has {len} entries but teacher_logits has {n} (one per teacher)"),
            ));
        }
    }
    let mut logit_arrays: Vec<PyReadonlyArray3<'py, f32>> = Vec::with_capacity(n);
    let mut box_arrays: Vec<PyReadonlyArray3<'py, f32>> = Vec::with_capacity(n);
    let mut map_arrays: Vec<PyReadonlyArray1<'py, i64>> = Vec::with_capacity(n);
    let mut kind_values = Vec::with_capacity(n);
    for k in 0..n {
        logit_arrays.push(typed(
            &logits[k],
            &format!("teacher_logits[{k}]"),
            "a float32 array of shape (B, Q, K)",
        )?);
        box_arrays.push(typed(
            &boxes[k],
            &format!("teacher_boxes[{k}]"),
            "a float32 array of shape (B, Q, 4)",
        )?);
        map_arrays.push(typed(
            &maps[k],
            &format!("local_to_union[{k}]"),
            "an int64 array of shape (C,)",
        )?);
        let arg = format!("teacher_kinds[{k}]");
        let kind: String = kinds[k].extract().map_err(|_| {
            type_error(
                &arg,
                format!(
                    "expected \"softmax\" or \"sigmoid\", got {}",
                    what_is(&kinds[k])
                ),
            )
        })?;
        kind_values.push(TeacherKind::parse(&kind, &arg).map_err(to_py)?);
    }
    let views: Vec<TeacherOutputs<'_>> = (0..n)
        .map(|k| TeacherOutputs {
            logits: logit_arrays[k].as_array(),
            boxes: box_arrays[k].as_array(),
            local_to_union: map_arrays[k].as_array(),
            kind: kind_values[k],
        })
        .collect();
    let out = py
        .detach(|| targets::build_pseudo_targets(&views, &config))
        .map_err(to_py)?;
    let m = out.len();
    let width = config.soft_width();
    let boxes_flat: Vec<f32> = crate::alloc::try_collect(
        out.boxes.into_iter().flatten(),
        m.saturating_mul(4),
        "teacher_boxes",
        "the pseudo-target boxes",
    )
    .map_err(to_py)?;
    let boxes_arr = numpy::ndarray::Array2::from_shape_vec((m, 4), boxes_flat)
        .map_err(|e| invalid("teacher_boxes", format!("internal shape error: {e}")))?;
    let soft = numpy::ndarray::Array2::from_shape_vec((m, width), out.soft_logits)
        .map_err(|e| invalid("teacher_logits", format!("internal shape error: {e}")))?;
    Ok((
        PyArray1::from_vec(py, out.labels),
        boxes_arr.into_pyarray(py),
        soft.into_pyarray(py),
        PyArray1::from_vec(py, out.scores),
        PyArray1::from_vec(py, out.teacher),
        PyArray1::from_vec(py, out.counts),
    ))
}

/// Register the pseudo-target bindings on the `_native` module.
fn register_targets(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_pseudo_targets, m)?)?;
    Ok(())
}
