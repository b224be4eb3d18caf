"""LabelSpace: union order, local→union maps, background index, validation."""

from __future__ import annotations

import dataclasses

import ka_rs
import numpy as np
import pytest
from ka_rs.labels import LabelSpace


def test_disjoint_union_is_concatenation_in_teacher_order():
    space = LabelSpace.from_teachers({"a": ["cat", "dog"], "b": ["car", "bus", "train"]})
    assert space.teachers == ("a", "b")
    assert space.names == ("cat", "dog", "car", "bus", "train")
    assert space.num_classes == 5
    assert space.background_index == 5
    assert space.num_teachers == 2
    assert not space.is_overlapping
    np.testing.assert_array_equal(space.local_to_union("a"), [0, 1])
    np.testing.assert_array_equal(space.local_to_union("b"), [2, 3, 4])
    assert space.local_to_union("b").dtype == np.int64
    assert space.classes("b") == ("car", "bus", "train")
    assert [space.index(n) for n in space.names] == list(range(5))


def test_overlapping_names_get_one_union_index():
    space = LabelSpace.from_teachers(
        {"a": ["person", "dog", "cat"], "b": ["horse", "dog"], "c": ["cat", "sheep", "person"]}
    )
    # teacher a's classes first, then each *new* name in teacher order
    assert space.names == ("person", "dog", "cat", "horse", "sheep")
    assert space.background_index == 5
    assert space.is_overlapping
    np.testing.assert_array_equal(space.local_to_union("a"), [0, 1, 2])
    np.testing.assert_array_equal(space.local_to_union("b"), [3, 1])
    np.testing.assert_array_equal(space.local_to_union("c"), [2, 4, 0])
    assert space.teachers_of("dog") == ("a", "b")
    assert space.teachers_of("sheep") == ("c",)
    # every local class maps to the union entry with the same name
    for t in space.teachers:
        for local, u in enumerate(space.local_to_union(t)):
            assert space.names[u] == space.classes(t)[local]


def test_teacher_lookup_by_index_and_copies():
    space = LabelSpace.from_teachers({"a": ["x"], "b": ["y", "x"]})
    assert space.classes(1) == ("y", "x")
    assert space.teacher_index("b") == 1
    np.testing.assert_array_equal(space.local_to_union(1), [1, 0])
    m = space.local_to_union("b")
    m[0] = 99  # a copy: the label space is unchanged
    np.testing.assert_array_equal(space.local_to_union("b"), [1, 0])


def test_frozen_hashable_and_roundtrip():
    space = LabelSpace.from_teachers({"a": ["x", "y"], "b": ["y", "z"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        space.names = ("q",)  # type: ignore[misc]
    again = LabelSpace.from_teachers(space.to_dict())
    assert again == space
    assert again.names == space.names
    assert hash(again) == hash(space)
    assert len({space, again}) == 1
    assert space.to_dict() == {"a": ["x", "y"], "b": ["y", "z"]}
    assert LabelSpace.from_teachers({"b": ["y", "z"], "a": ["x", "y"]}) != space
    assert "LabelSpace" in repr(space)


def test_lazy_export():
    assert ka_rs.LabelSpace is LabelSpace
    assert ka_rs.PseudoTargets is not None
    assert callable(ka_rs.build_pseudo_targets)
    assert {"LabelSpace", "PseudoTargets", "build_pseudo_targets"} <= set(ka_rs.__all__)


@pytest.mark.parametrize(
    ("teachers", "match"),
    [
        ({}, "at least one teacher"),
        ({"a": []}, "'a' has no classes"),
        ({"a": ["x"], "b": []}, "'b' has no classes"),
        ({"a": ["x", "y", "x"]}, "'a' lists class 'x' twice"),
        ({"a": "xyz"}, "expected a list of class names"),
        ({"a": ["x", 3]}, "non-empty strings"),
        ({"a": ["x", ""]}, "non-empty strings"),
        ({"": ["x"]}, "teacher names"),
    ],
)
def test_bad_teachers_raise_naming_argument(teachers, match):
    with pytest.raises(ValueError, match=match) as e:
        LabelSpace.from_teachers(teachers)
    assert str(e.value).startswith("teachers:")


def test_bad_lookups():
    space = LabelSpace.from_teachers({"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match=r"^teachers: expected a mapping"):
        LabelSpace.from_teachers([("a", ["x"])])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^teacher: unknown teacher 'c'"):
        space.classes("c")
    with pytest.raises(ValueError, match=r"^teacher: index 2 out of range"):
        space.local_to_union(2)
    with pytest.raises(ValueError, match=r"^name: unknown class 'z'"):
        space.index("z")
    with pytest.raises(ValueError, match=r"^name:"):
        space.teachers_of("z")
    with pytest.raises(ValueError, match=r"^teacher_classes: teacher 'a' appears more than once"):
        LabelSpace((("a", ("x",)), ("a", ("y",))))
