//! Fallible allocation for every buffer whose size comes from the caller's input.
//!
//! A failed allocation in Rust's infallible APIs (`vec![..; n]`, `Vec::with_capacity`,
//! `resize`, `collect`, ndarray's `as_standard_layout`) aborts the whole process — in Python,
//! the interpreter. Inputs decide buffer sizes here (an (N, M) IoU matrix, a Q×T cost block,
//! a copy of a non-contiguous or broadcast array, whose zero strides let a few bytes of
//! memory stand for an array of any shape), so every such buffer goes through this module:
//!
//! - a size whose byte count overflows (it cannot exist) is [`KaError::InvalidArgument`]
//!   (`ValueError` in Python), naming the argument(s) the size comes from;
//! - a size the allocator refuses is [`KaError::OutOfMemory`] (`MemoryError`).
//!
//! Each check is one multiplication and one allocator call per buffer: nothing in a hot loop.
//!
//! [`collapse_broadcast`] lets validation loops read a broadcast input's distinct elements
//! only, so a huge zero-stride input is rejected (or its huge result refused) at once instead
//! of being scanned element by element.

use crate::error::{KaError, KaResult};
use ndarray::{Array, ArrayView, Axis, CowArray, Dimension};
use std::alloc::Layout;

/// `(a, b, c)` for error messages.
fn shape_str(dims: &[usize]) -> String {
    let inner: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    if inner.len() == 1 {
        format!("({},)", inner[0])
    } else {
        format!("({})", inner.join(", "))
    }
}

/// The error for a buffer of `dims` elements of `T` whose size cannot be represented.
#[cold]
fn too_large<T>(dims: &[usize], arg: &str, what: &str) -> KaError {
    KaError::invalid(
        arg,
        format!(
            "{what} of shape {} cannot exist: {} bytes per element, the size overflows the \
             address space",
            shape_str(dims),
            std::mem::size_of::<T>()
        ),
    )
}

#[cold]
fn out_of_memory<T>(n: usize, arg: &str, what: &str) -> KaError {
    KaError::OutOfMemory {
        what: format!("{arg}: {what}"),
        bytes: n.saturating_mul(std::mem::size_of::<T>()),
    }
}

/// Number of elements of a buffer of shape `dims` holding `T`s, checked: the element count and
/// the byte count must fit (`isize::MAX` bytes). Errors name `arg` (the argument(s) the size
/// comes from) and `what` (the buffer, e.g. "the IoU matrix").
#[inline]
pub fn checked_len<T>(dims: &[usize], arg: &str, what: &str) -> KaResult<usize> {
    let n = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| too_large::<T>(dims, arg, what))?;
    Layout::array::<T>(n).map_err(|_| too_large::<T>(dims, arg, what))?;
    Ok(n)
}

/// Make sure `v` can hold `n` elements without reallocating (exact growth: these buffers are
/// sized once per call), or fail with an error naming `arg` / `what`.
#[inline]
pub fn try_reserve_to<T>(v: &mut Vec<T>, n: usize, arg: &str, what: &str) -> KaResult<()> {
    if n <= v.capacity() {
        return Ok(());
    }
    Layout::array::<T>(n).map_err(|_| too_large::<T>(&[n], arg, what))?;
    v.try_reserve_exact(n - v.len())
        .map_err(|_| out_of_memory::<T>(n, arg, what))
}

/// An empty `Vec` with room for `n` elements.
#[inline]
pub fn try_with_capacity<T>(n: usize, arg: &str, what: &str) -> KaResult<Vec<T>> {
    let mut v = Vec::new();
    try_reserve_to(&mut v, n, arg, what)?;
    Ok(v)
}

/// `v.resize(n, fill)` that fails instead of aborting.
#[inline]
pub fn try_resize<T: Clone>(
    v: &mut Vec<T>,
    n: usize,
    fill: T,
    arg: &str,
    what: &str,
) -> KaResult<()> {
    try_reserve_to(v, n, arg, what)?;
    v.resize(n, fill);
    Ok(())
}

/// A `Vec` of `n` copies of `fill`.
pub fn try_filled<T: Clone>(n: usize, fill: T, arg: &str, what: &str) -> KaResult<Vec<T>> {
    let mut v = try_with_capacity(n, arg, what)?;
    v.resize(n, fill);
    Ok(v)
}

/// The items of `iter` (at most `n` of them are expected) collected into a `Vec` reserved for
/// `n` up front; extra items would grow it normally.
pub fn try_collect<T>(
    iter: impl IntoIterator<Item = T>,
    n: usize,
    arg: &str,
    what: &str,
) -> KaResult<Vec<T>> {
    let mut v = try_with_capacity(n, arg, what)?;
    v.extend(iter);
    Ok(v)
}

/// Element types whose all-zero bit pattern is the value zero.
///
/// # Safety
///
/// Implementors must be plain data for which every byte being zero is a valid, initialised
/// value (so zeroed memory from the allocator is a valid buffer of them).
pub unsafe trait Zeroable: Copy {}

// SAFETY: IEEE 754 +0.0 is the all-zero bit pattern, and every bit pattern is a valid float.
unsafe impl Zeroable for f32 {}
// SAFETY: as for f32.
unsafe impl Zeroable for f64 {}
// SAFETY: integers: every bit pattern is valid, all zero bits is 0.
unsafe impl Zeroable for i64 {}
// SAFETY: as for i64.
unsafe impl Zeroable for usize {}
// SAFETY: as for i64.
unsafe impl Zeroable for u32 {}

/// A `Vec` of `n` zeros from the allocator's zeroed memory (`calloc`, like `vec![0.0; n]`:
/// large buffers come as fresh zero pages, with no pass over the memory), or an error.
pub fn try_zeroed<T: Zeroable>(n: usize, arg: &str, what: &str) -> KaResult<Vec<T>> {
    let layout = Layout::array::<T>(n).map_err(|_| too_large::<T>(&[n], arg, what))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: `layout` has a non-zero size (checked just above), as `alloc_zeroed` requires.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        return Err(out_of_memory::<T>(n, arg, what));
    }
    // SAFETY: `ptr` is non-null and was allocated by the global allocator with
    // `Layout::array::<T>(n)`, which is exactly the layout a `Vec<T>` of capacity `n` uses
    // (size `n * size_of::<T>()`, alignment `align_of::<T>()`), so the Vec may own and free it.
    // All `n` elements are initialised: the memory is zeroed and all-zero bytes are a valid
    // `T` (`T: Zeroable`). The length `n` does not exceed the capacity `n`.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// `a` as a standard-layout (C-contiguous) array: borrowed when it already is one, else a
/// copy (of non-contiguous or broadcast input) allocated fallibly.
pub fn try_standard_layout<'a, A: Clone, D: Dimension>(
    a: ArrayView<'a, A, D>,
    arg: &str,
) -> KaResult<CowArray<'a, A, D>> {
    if a.is_standard_layout() {
        return Ok(CowArray::from(a));
    }
    let what = "a contiguous copy of the input";
    let n = checked_len::<A>(a.shape(), arg, what)?;
    let v = try_collect(a.iter().cloned(), n, arg, what)?;
    let owned = Array::from_shape_vec(a.raw_dim(), v)
        .map_err(|e| KaError::invalid(arg, format!("internal shape error: {e}")))?;
    Ok(CowArray::from(owned))
}

/// `a` with every broadcast axis (stride 0, length > 1) cut to its first index: a view of the
/// distinct elements, for validation. Any invalid value of `a` is in the result, at the same
/// index along the other axes and at index 0 along the collapsed ones (which is where `a`
/// first holds it).
pub fn collapse_broadcast<A, D: Dimension>(a: ArrayView<'_, A, D>) -> ArrayView<'_, A, D> {
    let all = a.ndim();
    collapse_axes(a, all)
}

/// [`collapse_broadcast`] over every axis but the last, which keeps its length: for checks
/// that read whole rows (a box's four coordinates).
pub fn collapse_broadcast_rows<A, D: Dimension>(a: ArrayView<'_, A, D>) -> ArrayView<'_, A, D> {
    let outer = a.ndim().saturating_sub(1);
    collapse_axes(a, outer)
}

fn collapse_axes<A, D: Dimension>(mut a: ArrayView<'_, A, D>, axes: usize) -> ArrayView<'_, A, D> {
    for ax in 0..axes {
        if a.strides()[ax] == 0 && a.len_of(Axis(ax)) > 1 {
            a.collapse_axis(Axis(ax), 0);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, ShapeBuilder};

    #[test]
    fn checked_len_rejects_sizes_that_cannot_exist() {
        assert_eq!(checked_len::<f32>(&[3, 4], "a", "x").unwrap(), 12);
        assert_eq!(checked_len::<f32>(&[0, usize::MAX], "a", "x").unwrap(), 0);
        let e =
            checked_len::<f32>(&[1 << 40, 1 << 40], "boxes1/boxes2", "the IoU matrix").unwrap_err();
        assert!(matches!(e, KaError::InvalidArgument { .. }));
        assert!(e
            .to_string()
            .starts_with("boxes1/boxes2: the IoU matrix of shape"));
        // the element count fits but not the bytes
        assert!(checked_len::<f64>(&[1 << 61], "a", "x").is_err());
    }

    #[test]
    fn refused_allocations_are_errors_not_aborts() {
        // 2^60 bytes: representable, never available
        let e = try_zeroed::<f32>(1 << 58, "boxes1", "the result").unwrap_err();
        assert!(
            matches!(e, KaError::OutOfMemory { bytes, .. } if bytes == 1 << 60),
            "{e}"
        );
        assert!(e.to_string().contains("out of memory"));
        let mut v: Vec<f64> = Vec::new();
        assert!(matches!(
            try_resize(&mut v, 1 << 59, 0.0, "a", "x"),
            Err(KaError::OutOfMemory { .. })
        ));
        assert!(matches!(
            try_with_capacity::<u8>(usize::MAX, "a", "x"),
            Err(KaError::InvalidArgument { .. })
        ));
        assert!(try_filled(1 << 60, 0u8, "a", "x").is_err());
        assert!(try_collect(0..3, 1 << 60, "a", "x").is_err());
    }

    #[test]
    fn successful_allocations_hold_what_was_asked() {
        let z: Vec<f64> = try_zeroed(1000, "a", "x").unwrap();
        assert_eq!(z.len(), 1000);
        assert!(z.iter().all(|&x| x == 0.0));
        assert!(try_zeroed::<i64>(0, "a", "x").unwrap().is_empty());
        let mut v = vec![1u32; 3];
        try_resize(&mut v, 5, 7, "a", "x").unwrap();
        assert_eq!(v, [1, 1, 1, 7, 7]);
        try_resize(&mut v, 2, 0, "a", "x").unwrap();
        assert_eq!(v, [1, 1]);
        assert_eq!(try_filled(2, 9i64, "a", "x").unwrap(), [9, 9]);
        assert_eq!(try_collect(0..4, 2, "a", "x").unwrap(), [0, 1, 2, 3]);
    }

    #[test]
    fn standard_layout_copies_only_when_needed() {
        let a = Array2::from_shape_vec((2, 3), (0..6).collect::<Vec<i32>>()).unwrap();
        assert!(try_standard_layout(a.view(), "a").unwrap().is_view());
        let t = a.t();
        let c = try_standard_layout(t, "a").unwrap();
        assert!(!c.is_view());
        assert_eq!(c, a.t());
        assert!(c.is_standard_layout());
        // broadcast (zero-stride) input
        let row = ndarray::arr1(&[1.0f32, 2.0]);
        let b = row.broadcast((3, 2)).unwrap();
        let c = try_standard_layout(b, "a").unwrap();
        assert_eq!(c, ndarray::arr2(&[[1.0f32, 2.0], [1.0, 2.0], [1.0, 2.0]]));
    }

    #[test]
    fn broadcast_axes_collapse_to_one_index() {
        let row = ndarray::arr1(&[1.0f32, f32::NAN, 3.0, 4.0]);
        let b = row.broadcast((1 << 40, 4)).unwrap();
        let c = collapse_broadcast(b);
        assert_eq!(c.dim(), (1, 4));
        assert!(c[[0, 1]].is_nan());
        let data = [0.0f64; 4];
        let s = ArrayView::from_shape((3, 4).strides((0, 1)), &data).unwrap();
        assert_eq!(collapse_broadcast(s).dim(), (1, 4));
        let plain = Array2::<f64>::zeros((3, 4));
        assert_eq!(collapse_broadcast(plain.view()).dim(), (3, 4));
        // rows keep their length even when the last axis is broadcast too
        let one = ndarray::arr1(&[2.0f32]);
        let both = one.broadcast((5, 4)).unwrap();
        assert_eq!(collapse_broadcast(both).dim(), (1, 1));
        assert_eq!(collapse_broadcast_rows(both).dim(), (1, 4));
    }
}
