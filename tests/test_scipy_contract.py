"""scipy's own test module for ``linear_sum_assignment``, run against ka_rs's.

``scipy/optimize/tests/test_linear_assignment.py`` ships in the installed scipy wheel. Its test
functions are imported into this module, so pytest collects and runs every one of them (with
their parametrisations) as tests of this file; an autouse fixture swaps the module's
``linear_sum_assignment`` for ka_rs's (through a counting wrapper) while each test runs, and
checks afterwards that the test really called ka_rs. Nothing is skipped: if the installed scipy
lacks the module, :func:`test_scipy_test_module_is_installed` fails and says so.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Collection, Iterator
from types import ModuleType
from typing import Any

import ka_rs
import pytest

SCIPY_TESTS = "scipy.optimize.tests.test_linear_assignment"

try:
    _scipy_tests: ModuleType | None = importlib.import_module(SCIPY_TESTS)
    _import_error: BaseException | None = None
except ImportError as err:  # scipy without its test files (or without scipy)
    _scipy_tests, _import_error = None, err


def _scipy_test_names(module: ModuleType) -> list[str]:
    """Names pytest would collect from the scipy module: test functions and Test classes."""
    return [
        name
        for name, obj in vars(module).items()
        if (name.startswith("test") and inspect.isfunction(obj))
        or (name.startswith("Test") and inspect.isclass(obj))
    ]


def _listed_params(obj: Any) -> Any:
    """``obj`` itself, or for a test function parametrised with a one-shot iterator (scipy
    passes an ``itertools.product``, which pytest deprecates) a copy of it parametrised with
    the same values as a list. The copy shares the scipy module's globals, so the
    ``linear_sum_assignment`` it calls is the one the fixture below patches."""
    marks = list(getattr(obj, "pytestmark", [])) if inspect.isfunction(obj) else []

    def one_shot(mark: Any) -> bool:
        if mark.name != "parametrize":
            return False
        values = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("argvalues", ())
        return not isinstance(values, Collection)

    if not any(one_shot(m) for m in marks):
        return obj

    def listed(mark: Any) -> Any:
        if not one_shot(mark):
            return mark
        args, kwargs = list(mark.args), dict(mark.kwargs)
        if len(args) > 1:
            args[1] = list(args[1])
        else:
            kwargs["argvalues"] = list(kwargs["argvalues"])
        return pytest.mark.parametrize(*args, **kwargs).mark

    copy = types.FunctionType(
        obj.__code__, obj.__globals__, obj.__name__, obj.__defaults__, obj.__closure__
    )
    copy.__dict__.update(obj.__dict__)
    copy.__kwdefaults__ = obj.__kwdefaults__
    copy.__qualname__, copy.__doc__ = obj.__qualname__, obj.__doc__
    copy.pytestmark = [listed(m) for m in marks]
    return copy


if _scipy_tests is not None:
    _NAMES = _scipy_test_names(_scipy_tests)
    # pytest collects these from this module's namespace, marks (parametrize) included
    globals().update({name: _listed_params(getattr(_scipy_tests, name)) for name in _NAMES})
else:
    _NAMES = []


def test_scipy_test_module_is_installed():
    assert _scipy_tests is not None, (
        f"cannot import {SCIPY_TESTS} ({_import_error!r}): the installed scipy does not ship "
        "its test files, so scipy's linear_sum_assignment contract was NOT checked against "
        "ka_rs. Install a scipy wheel that includes scipy/optimize/tests."
    )
    assert _NAMES, f"{SCIPY_TESTS} defines no tests"
    # every scipy test is collected here, none hidden by a skip or xfail mark
    for name in _NAMES:
        ours, theirs = globals()[name], getattr(_scipy_tests, name)
        assert ours is theirs or ours.__code__ is theirs.__code__, name
        marks = [m.name for m in getattr(ours, "pytestmark", [])]
        assert not {"skip", "skipif", "xfail"} & set(marks), (name, marks)


@pytest.fixture(autouse=True)
def _use_ka_rs(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """While a scipy test runs, its module's ``linear_sum_assignment`` is ka_rs's."""
    if _scipy_tests is None or request.function.__module__ != SCIPY_TESTS:
        yield
        return
    calls = 0

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return ka_rs.linear_sum_assignment(*args, **kwargs)

    monkeypatch.setattr(_scipy_tests, "linear_sum_assignment", counted)
    yield
    assert calls > 0, f"{request.node.name} never called linear_sum_assignment"
