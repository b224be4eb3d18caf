"""ka_rs.linear_sum_assignment against scipy.optimize.linear_sum_assignment."""

from __future__ import annotations

import math
import zlib

import ka_rs
import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from ka_rs import ops
from ka_rs.ops import InfeasibleAssignmentError, linear_sum_assignment


def total(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    return math.fsum(cost[rows, cols].tolist())


def check_valid(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    n, m = cost.shape
    assert rows.dtype == np.int64 and cols.dtype == np.int64
    assert rows.shape == cols.shape == (min(n, m),)
    assert np.all(np.diff(rows) > 0), "rows must be strictly increasing"
    assert len(set(cols.tolist())) == len(cols), "columns must be distinct"
    if len(rows):
        assert rows.min() >= 0 and rows.max() < n and cols.min() >= 0 and cols.max() < m


def assert_same_as_scipy(cost: np.ndarray, maximize: bool = False) -> str:
    """Compare with scipy; returns "ok" or "infeasible" (agreed by both)."""
    try:
        sr, sc = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    except ValueError as err:
        assert "infeasible" in str(err)
        with pytest.raises(InfeasibleAssignmentError, match="infeasible"):
            linear_sum_assignment(cost, maximize=maximize)
        return "infeasible"
    rows, cols = linear_sum_assignment(cost, maximize=maximize)
    check_valid(cost, rows, cols)
    forbidden = -np.inf if maximize else np.inf
    assert not np.any(cost[rows, cols] == forbidden)
    ours, theirs = total(cost, rows, cols), total(cost, sr, sc)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-300), (cost.shape, maximize)
    return "ok"


# ---------------------------------------------------------------------------------------------
# the >= 5,000 random matrices
# ---------------------------------------------------------------------------------------------


def random_shape(rng: np.random.Generator, max_side: int = 40) -> tuple[int, int]:
    return int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1))


def gen_uniform(rng, shape):
    return rng.random(shape)


def gen_normal_negative(rng, shape):
    return rng.normal(size=shape) * 10


def gen_small_integers(rng, shape):  # many ties
    return rng.integers(0, 4, size=shape).astype(np.float64)


def gen_large_integers(rng, shape):
    return rng.integers(-(10**6), 10**6, size=shape).astype(np.float64)


def gen_constant(rng, shape):  # every assignment is optimal
    return np.full(shape, float(rng.integers(-3, 4)))


def gen_magnitudes(rng, shape):  # 1e-6 ... 1e9 mixed in one matrix
    return 10.0 ** rng.uniform(-6, 9, size=shape)


def gen_scale(rng, shape):  # one magnitude per matrix
    return rng.random(shape) * 10.0 ** rng.integers(-6, 10)


def gen_rank_one(rng, shape):  # outer-product costs: massive degeneracy
    return np.outer(rng.integers(0, 5, shape[0]), rng.integers(0, 5, shape[1])).astype(float)


def gen_sparse_inf(rng, shape):  # +inf forbidden pairs, usually still feasible
    c = rng.random(shape)
    c[rng.random(shape) < rng.uniform(0.05, 0.5)] = np.inf
    return c


def gen_dense_inf(rng, shape):  # many forbidden pairs: often infeasible
    c = rng.integers(0, 10, size=shape).astype(float)
    c[rng.random(shape) < rng.uniform(0.6, 0.95)] = np.inf
    return c


def gen_inf_row_or_col(rng, shape):  # a fully forbidden row or column
    c = rng.random(shape)
    if rng.random() < 0.5:
        c[rng.integers(shape[0])] = np.inf
    else:
        c[:, rng.integers(shape[1])] = np.inf
    return c


GENERATORS = [
    gen_uniform,
    gen_normal_negative,
    gen_small_integers,
    gen_large_integers,
    gen_constant,
    gen_magnitudes,
    gen_scale,
    gen_rank_one,
    gen_sparse_inf,
    gen_dense_inf,
    gen_inf_row_or_col,
]
PER_GENERATOR = 480  # 11 generators x 480 = 5,280 matrices, plus the structured shapes below


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__[4:])
def test_random_matrices_match_scipy(gen):
    rng = np.random.default_rng(zlib.crc32(gen.__name__.encode()))
    outcomes = {"ok": 0, "infeasible": 0}
    for i in range(PER_GENERATOR):
        shape = random_shape(rng)
        if i % 8 == 0:  # tall/wide extremes and single rows / columns
            shape = [(1, shape[1]), (shape[0], 1), (1, 1), (shape[0], 60), (60, shape[1])][i % 5]
        cost = gen(rng, shape)
        maximize = bool(i % 5 == 4) and not np.isinf(cost).any()
        outcomes[assert_same_as_scipy(cost, maximize=maximize)] += 1
    if gen in (gen_dense_inf, gen_inf_row_or_col):
        assert outcomes["infeasible"] > 0
    if gen is not gen_inf_row_or_col:
        assert outcomes["ok"] > 0


def test_maximize_with_forbidden_pairs(rng):
    for _ in range(200):
        c = rng.normal(size=random_shape(rng, 20))
        c[rng.random(c.shape) < 0.3] = -np.inf
        assert_same_as_scipy(c, maximize=True)


def test_larger_matrices(rng):
    for shape in [(300, 7), (7, 300), (300, 50), (100, 100), (200, 199)]:
        assert_same_as_scipy(rng.random(shape))
        assert_same_as_scipy(rng.integers(0, 3, size=shape).astype(float))


def test_same_indices_as_scipy_on_ties(rng):
    """Tie-heavy integer matrices (some with forbidden pairs, tall and wide): the same pairs
    as scipy, not just the same total. Our solver follows scipy's scan order and tie rule;
    ties force many Dijkstra steps, so this exercises that rule, not only the first scan."""
    for _ in range(2000):
        shape = (int(rng.integers(1, 13)), int(rng.integers(1, 13)))
        cost = rng.integers(0, 4, size=shape).astype(np.float64)
        if rng.random() < 0.25:
            cost[rng.random(shape) < 0.2] = np.inf
        try:
            want = scipy.optimize.linear_sum_assignment(cost)
        except ValueError:
            with pytest.raises(InfeasibleAssignmentError):
                linear_sum_assignment(cost)
            continue
        rows, cols = linear_sum_assignment(cost)
        np.testing.assert_array_equal(rows, want[0])
        np.testing.assert_array_equal(cols, want[1], err_msg=str(cost))


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_empty(shape):
    rows, cols = linear_sum_assignment(np.zeros(shape))
    assert rows.shape == cols.shape == (0,)
    assert rows.dtype == cols.dtype == np.int64


def test_known_solution():
    cost = np.array([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    rows, cols = linear_sum_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assert total(cost.astype(float), rows, cols) == 11.0


def test_accepts_torch_lists_and_int_bool():
    cost = [[1.0, 2.0], [2.0, 1.0], [0.5, 3.0]]
    rows, cols = linear_sum_assignment(cost)
    assert isinstance(rows, np.ndarray) and rows.tolist() == [1, 2] and cols.tolist() == [1, 0]
    t_rows, t_cols = linear_sum_assignment(torch.tensor(cost, dtype=torch.float32))
    assert isinstance(t_rows, torch.Tensor) and t_rows.dtype == torch.int64
    assert t_rows.tolist() == [1, 2] and t_cols.tolist() == [1, 0]
    b = np.array([[True, False], [False, True]])
    assert linear_sum_assignment(b)[1].tolist() == [1, 0]
    assert linear_sum_assignment(np.eye(3, dtype=np.int32), maximize=True)[1].tolist() == [0, 1, 2]


def test_does_not_modify_input(rng):
    cost = rng.random((6, 9))
    before = cost.copy()
    linear_sum_assignment(cost, maximize=True)
    linear_sum_assignment(cost.T)
    np.testing.assert_array_equal(cost, before)


# ---------------------------------------------------------------------------------------------
# errors: same contract as scipy
# ---------------------------------------------------------------------------------------------


def test_invalid_entries_raise_naming_cost():
    for bad, maximize in [(np.nan, False), (-np.inf, False), (np.nan, True), (np.inf, True)]:
        c = np.ones((3, 4))
        c[1, 2] = bad
        with pytest.raises(ValueError, match="cost") as info:
            linear_sum_assignment(c, maximize=maximize)
        assert not isinstance(info.value, InfeasibleAssignmentError)
        with pytest.raises(ValueError):
            scipy.optimize.linear_sum_assignment(c, maximize=maximize)


def test_bad_shapes_raise_naming_cost():
    for bad in [np.zeros(3), np.zeros((2, 2, 2)), np.float64(1.0)]:
        with pytest.raises(ValueError, match="cost"):
            linear_sum_assignment(bad)
    with pytest.raises(ValueError, match="cost"):
        linear_sum_assignment(object())
    with pytest.raises(ValueError, match="^cost: cannot be read as an array"):
        linear_sum_assignment([[1.0, 2.0], [3.0]])  # ragged


@pytest.mark.parametrize(
    "bad",
    [
        np.array([["a", "b"]]),
        np.eye(2).astype(complex),
        np.array([[1, None]], dtype=object),
        np.eye(2).astype("M8[s]"),
        torch.eye(2, dtype=torch.complex64),
    ],
)
def test_non_numeric_cost_is_a_type_error_like_scipy(bad):
    # scipy: TypeError("Cannot cast array data from dtype('<U1') to dtype('float64') ...")
    with pytest.raises(TypeError, match="^cost: Cannot cast array data"):
        linear_sum_assignment(bad)


@pytest.mark.parametrize("bad", ["no", "", 1, 0, 1.0, None, [True], torch.tensor(True)])
def test_maximize_must_be_a_bool(bad):
    c = np.array([[1.0, 2.0], [3.0, 1.0]])
    with pytest.raises(TypeError, match="^maximize: expected a bool"):
        linear_sum_assignment(c, maximize=bad)
    with pytest.raises(TypeError, match="^maximize: expected a bool"):
        ka_rs._native.linear_sum_assignment(c, bad)


def test_maximize_accepts_python_and_numpy_bools():
    c = np.array([[1.0, 2.0], [3.0, 1.0]])
    for flag, cols in ((True, [1, 0]), (False, [0, 1]), (np.bool_(True), [1, 0])):
        assert linear_sum_assignment(c, maximize=flag)[1].tolist() == cols
        assert ka_rs._native.linear_sum_assignment(c, flag)[1].tolist() == cols
    assert ka_rs._native.linear_sum_assignment(c)[1].tolist() == [0, 1]


def test_float32_big_endian_and_strided_costs_are_read_exactly(rng):
    c = rng.random((7, 5))
    want = [a.tolist() for a in linear_sum_assignment(c)]
    native = ka_rs._native.linear_sum_assignment
    for variant in (
        c.astype(">f8"),
        np.asfortranarray(c),
        c[::-1][::-1],
        np.repeat(c, 2, axis=1)[:, ::2],  # stride 16 bytes
    ):
        assert [a.tolist() for a in native(variant, False)] == want
        assert [a.tolist() for a in linear_sum_assignment(variant)] == want
    c32 = c.astype(np.float32)
    want32 = [a.tolist() for a in linear_sum_assignment(c32.astype(np.float64))]
    assert [a.tolist() for a in native(c32, False)] == want32
    assert [a.tolist() for a in native(c32.astype(">f4"), False)] == want32
    # a float32 field of a structured array: a 12-byte stride is not a multiple of 4... it is;
    # a 5-byte one is not, and rust-numpy would misread it without a copy
    rec = np.zeros(c32.shape, dtype=[("v", "<f4"), ("pad", "u1")])
    rec["v"] = c32
    assert rec["v"].strides[1] == 5
    assert [a.tolist() for a in native(rec["v"], False)] == want32


def test_infeasible_is_a_value_error():
    c = np.array([[np.inf, np.inf], [1.0, 2.0]])
    with pytest.raises(InfeasibleAssignmentError, match="infeasible") as info:
        linear_sum_assignment(c)
    assert isinstance(info.value, ValueError)
    assert ops.InfeasibleAssignmentError is InfeasibleAssignmentError
    # all-forbidden but rectangular with enough free columns is fine
    c = np.array([[np.inf, 1.0, np.inf], [np.inf, np.inf, 2.0]])
    assert linear_sum_assignment(c)[1].tolist() == [1, 2]


# ---------------------------------------------------------------------------------------------
# hypothesis property tests
# ---------------------------------------------------------------------------------------------

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
matrices = hnp.arrays(
    np.float64,
    st.tuples(st.integers(0, 9), st.integers(0, 9)),
    elements=st.one_of(finite, st.integers(-3, 3).map(float)),
)


@settings(max_examples=200, deadline=None)
@given(cost=matrices, maximize=st.booleans())
def test_property_same_total_as_scipy(cost, maximize):
    assert_same_as_scipy(cost, maximize=maximize)


@settings(max_examples=150, deadline=None)
@given(cost=matrices, data=st.data())
def test_property_permutation_and_transpose_invariance(cost, data):
    n, m = cost.shape
    pr = np.array(data.draw(st.permutations(range(n)))) if n else np.zeros(0, int)
    pc = np.array(data.draw(st.permutations(range(m)))) if m else np.zeros(0, int)
    base = total(cost, *linear_sum_assignment(cost))
    permuted = cost[pr][:, pc]
    assert total(permuted, *linear_sum_assignment(permuted)) == pytest.approx(
        base, rel=1e-9, abs=1e-6
    )
    t = np.ascontiguousarray(cost.T)
    assert total(t, *linear_sum_assignment(t)) == pytest.approx(base, rel=1e-9, abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(cost=matrices, shift=finite)
def test_property_row_shift_and_negation(cost, shift):
    n, m = cost.shape
    base = total(cost, *linear_sum_assignment(cost))
    # maximising -C is minimising C
    assert -total(-cost, *linear_sum_assignment(-cost, maximize=True)) == pytest.approx(
        base, rel=1e-9, abs=1e-6
    )
    if 0 < n <= m:  # every row is assigned: shifting row 0 shifts the optimum by `shift`
        shifted = cost.copy()
        shifted[0] += shift
        got = total(shifted, *linear_sum_assignment(shifted))
        assert got == pytest.approx(base + shift, rel=1e-9, abs=1e-3)


@settings(max_examples=150, deadline=None)
@given(
    cost=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 7), st.integers(1, 7)),
        elements=st.integers(0, 5).map(float),
    ),
    mask=st.data(),
)
def test_property_forbidden_pairs_agree_with_scipy(cost, mask):
    forbid = mask.draw(hnp.arrays(np.bool_, cost.shape))
    cost = cost.copy()
    cost[forbid] = np.inf
    assert_same_as_scipy(cost)
