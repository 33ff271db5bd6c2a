"""labkit.check: verdicts, messages, timeouts, hooks (exercises registered by the tests themselves)."""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import labkit
from labkit import exercises
from labkit.exercises import Exercise, ExerciseFailed, check, default_compare, register


@pytest.fixture(autouse=True)
def clean_registry():
    saved = dict(exercises._REGISTRY)
    yield
    exercises._REGISTRY.clear()
    exercises._REGISTRY.update(saved)


def _add(a, b):
    return a + b


def _add_cases(rng):
    yield dict(a=0, b=0)
    yield dict(a=-1, b=1)
    for _ in range(8):
        yield dict(a=rng.randint(-100, 100), b=rng.randint(-100, 100))


def add_exercise(**kw) -> Exercise:
    fields = dict(name="testchap.add", reference=_add, cases=_add_cases, hint="add the two numbers")
    fields.update(kw)
    return register(Exercise(**fields))


# --- verdicts ---------------------------------------------------------------------------


def test_right_answer_passes(capsys):
    add_exercise()
    result = check("testchap.add", lambda a, b: b + a)
    assert capsys.readouterr().out.strip() == "testchap.add: 10/10 cases passed"
    assert result and result.status == "passed" and (result.passed, result.total) == (10, 10)


def test_check_is_exported_from_labkit(capsys):
    add_exercise()
    assert labkit.check is check and labkit.ExerciseFailed is ExerciseFailed
    assert labkit.check("testchap.add", _add)


def test_wrong_answer_raises_with_input_expected_got_and_tolerance(capsys):
    add_exercise(rtol=1e-3, atol=0.5)
    with pytest.raises(ExerciseFailed) as e:
        check("testchap.add", lambda a, b: a - b)
    msg = str(e.value)
    # case 1 (0, 0) passes; case 2 (-1, 1) is the first to fail
    assert msg.splitlines()[0] == "testchap.add: case 2 of 10 failed"
    assert "input:    a=-1, b=1" in msg
    assert "expected: 0" in msg and "got:      -2" in msg
    assert "tolerance: rtol=0.001, atol=0.5" in msg
    assert "hint: add the two numbers" in msg
    assert capsys.readouterr().out.strip() == msg  # printed as well as raised
    assert isinstance(e.value, AssertionError)


def test_first_failing_random_case_is_the_one_shown():
    add_exercise()
    seen = []

    def add(a, b):
        seen.append(dict(a=a, b=b))
        return a + b + (len(seen) == 5)  # wrong on the 5th case only

    with pytest.raises(ExerciseFailed) as e:
        check("testchap.add", add, quiet=True)
    case = seen[4]
    assert len(seen) == 5
    assert "case 5 of 10 failed" in str(e.value)
    assert f"input:    a={case['a']}, b={case['b']}" in str(e.value)
    assert f"expected: {case['a'] + case['b']}" in str(e.value)


def test_not_attempted_does_not_raise(capsys):
    add_exercise()

    def add(a, b):
        raise NotImplementedError("your turn: write this, then run the check below")

    result = check("testchap.add", add)
    out = capsys.readouterr().out
    assert "testchap.add: not attempted yet" in out
    assert result.status == "not attempted" and not result


def test_quiet_prints_nothing(capsys):
    add_exercise()
    check("testchap.add", _add, quiet=True)
    assert capsys.readouterr().out == ""


def test_crash_shows_the_exception_and_the_input():
    add_exercise()

    def add(a, b):
        if a < 0:
            raise ZeroDivisionError("boom on negatives")
        return a + b

    with pytest.raises(ExerciseFailed) as e:
        check("testchap.add", add, quiet=True)
    msg = str(e.value)
    assert "case 2 of 10 failed" in msg
    assert "input:    a=-1, b=1" in msg
    assert "raised ZeroDivisionError: boom on negatives" in msg


def test_slow_function_is_stopped_after_the_timeout():
    add_exercise(timeout=0.2)
    steps = []  # the slow function's progress: interrupted before its loop ends, not after it

    def add(a, b):
        try:
            for _ in range(3000):  # 30 s in all
                time.sleep(0.01)
                steps.append("sleep")
        except BaseException as e:  # the timeout arrives as an exception inside the function
            steps.append(type(e).__name__)
            raise
        steps.append("finished")  # (returns None: a wrong answer, should the timeout ever fail)

    with pytest.raises(ExerciseFailed) as e:
        check("testchap.add", add, quiet=True)
    assert "finished" not in steps and steps[-1] == exercises._CaseTimeout.__name__
    msg = str(e.value)
    assert "case 1 of 10 failed" in msg and "input:    a=0, b=0" in msg
    assert "stopped after 0.2 s" in msg


def test_endless_loop_is_stopped():
    add_exercise(timeout=0.2)

    def add(a, b):
        while True:
            a += 1

    with pytest.raises(ExerciseFailed, match="stopped after 0.2 s"):
        check("testchap.add", add, quiet=True)


def test_timeout_outside_the_main_thread():
    add_exercise(timeout=0.2)
    box = {}
    release = threading.Event()  # the slow function runs until the test lets it go

    def slow(a, b):
        release.wait(30)
        return a + b

    def worker():
        try:
            check("testchap.add", slow, quiet=True)
        except ExerciseFailed as e:
            box["msg"] = str(e)
            box["released"] = release.is_set()  # check gave up while slow was still running

    t = threading.Thread(target=worker)
    t.start()
    t.join(20)
    release.set()
    assert "stopped after 0.2 s" in box["msg"] and box["released"] is False


def test_check_outside_the_main_thread_grades_normally():
    add_exercise()
    box = {}
    t = threading.Thread(target=lambda: box.update(r=check("testchap.add", _add, quiet=True)))
    t.start()
    t.join(20)
    assert box["r"].status == "passed"


def test_check_keeps_an_outer_alarm_timer():
    """pytest-timeout (timeout=600 in pyproject) arms SIGALRM; check must not silently cancel it."""
    add_exercise()
    fired = []
    handler = lambda *a: fired.append(1)  # noqa: E731
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        check("testchap.add", _add, quiet=True)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        still_ours = signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert 0 < remaining <= 100.0  # still armed, and not pushed later than it was set
    assert still_ours and fired == []


def test_cases_are_seeded():
    add_exercise()
    seen = []

    def add(a, b):
        seen.append((a, b))
        return a + b

    check("testchap.add", add, quiet=True)
    check("testchap.add", add, quiet=True)
    check("testchap.add", add, seed=1, quiet=True)
    assert seen[:10] == seen[10:20] != seen[20:]


def test_the_student_cannot_corrupt_the_reference_input():
    def ref(x):
        return x.sum()

    def cases(rng):
        yield dict(x=torch.ones(4))

    register(Exercise(name="testchap.total", reference=ref, cases=cases))

    def total(x):
        s = x.sum()
        x.zero_()
        return s

    assert check("testchap.total", total, quiet=True)


# --- names --------------------------------------------------------------------------------


def test_unknown_exercise_lists_the_chapters_exercises():
    """A chapter whose exercises are registered (here by the test, without a module file)."""
    add_exercise()
    register(Exercise(name="testchap.mul", reference=lambda a, b: a * b, cases=_add_cases))
    with pytest.raises(ValueError) as e:
        check("testchap.sub", _add)
    assert "unknown exercise 'testchap.sub'" in str(e.value)
    assert "testchap.add, testchap.mul" in str(e.value)


def test_unknown_exercise_in_a_chapter_module(monkeypatch):
    """The chapter module labkit.exercises.<slug> is imported and its exercises are listed."""
    module = types.ModuleType("labkit.exercises.fake_chap")
    monkeypatch.setitem(sys.modules, "labkit.exercises.fake_chap", module)
    register(Exercise(name="fake_chap.one", reference=_add, cases=_add_cases))
    register(Exercise(name="fake-chap.two", reference=_add, cases=_add_cases))
    assert exercises.exercises_for("07-fake-chap") == ["fake-chap.two", "fake_chap.one"]
    with pytest.raises(ValueError, match=r"chapter 'fake_chap' has: fake-chap.two, fake_chap.one"):
        check("fake_chap.three", _add)
    assert check("07-fake-chap.one", _add, quiet=True)  # chapter id, slug with '-' or '_' all work
    assert check("fake-chap.one", _add, quiet=True)


def test_unknown_chapter():
    with pytest.raises(ValueError, match="chapter 'nochapterhere' has: none"):
        check("nochapterhere.x", _add)


@pytest.mark.parametrize("name", ["noexercise", "a.b.c", 3])
def test_malformed_names(name):
    with pytest.raises(ValueError, match="'<chapter>.<exercise>'"):
        check(name, _add)


def test_register_validates():
    with pytest.raises(TypeError, match="expected an Exercise"):
        register(dict(name="testchap.x"))
    with pytest.raises(ValueError, match="testchapx"):
        register(Exercise(name="testchapx", reference=_add, cases=_add_cases))


def test_fn_must_be_callable():
    add_exercise()
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        check("testchap.add", 3)


# --- tensors, structures, hooks -----------------------------------------------------------


def _softmax_cases(rng):
    g = torch.Generator().manual_seed(rng.randint(0, 2**31))
    yield dict(x=torch.zeros(3))
    for n in (1, 5, 17):
        yield dict(x=torch.randn(2, n, generator=g))


def softmax_exercise(**kw):
    register(Exercise(name="testchap.softmax", reference=lambda x: torch.softmax(x, -1),
                      cases=_softmax_cases, **kw))


def test_tensors_within_tolerance_pass():
    softmax_exercise(rtol=1e-4, atol=1e-6)

    def softmax(x):
        e = (x.double() - x.double().max(-1, keepdim=True).values).exp()
        return (e / e.sum(-1, keepdim=True)).float() * (1 + 1e-6)

    assert check("testchap.softmax", softmax, quiet=True).passed == 4


def test_tensors_outside_tolerance_fail_with_a_readable_message():
    softmax_exercise(rtol=1e-4, atol=1e-6)
    with pytest.raises(ExerciseFailed) as e:
        check("testchap.softmax", lambda x: x.exp() / x.exp().sum(-1, keepdim=True) * 1.01, quiet=True)
    msg = str(e.value)
    assert "case 1 of 4 failed" in msg and "input:    x=tensor(shape=(3,), dtype=torch.float32" in msg
    assert "values differ" in msg and "tolerance: rtol=0.0001, atol=1e-06" in msg
    assert "expected: tensor(shape=(3,)" in msg and "got:      tensor(shape=(3,)" in msg


def test_tensor_shape_and_type_mismatch():
    softmax_exercise()
    with pytest.raises(ExerciseFailed, match=r"shape \(1, 3\) != expected \(3,\)"):
        check("testchap.softmax", lambda x: torch.softmax(x, -1)[None], quiet=True)
    with pytest.raises(ExerciseFailed, match="expected a tensor, got list"):
        check("testchap.softmax", lambda x: torch.softmax(x, -1).tolist(), quiet=True)


def test_default_compare_structures():
    t = torch.arange(3.0)
    assert default_compare((1, 2.0, t), (1, 2.0, t.clone()), 1e-6, 0) is None
    assert default_compare({"a": 1, "b": [t]}, {"a": 1, "b": [t]}, 1e-6, 0) is None
    assert "at [1]" in default_compare([1, 3], [1, 2], 1e-6, 0)
    assert "at ['b'][0]" in default_compare({"a": 1, "b": [t + 1]}, {"a": 1, "b": [t]}, 1e-6, 0)
    assert "keys ['a', 'b']" in default_compare({"a": 1}, {"a": 1, "b": 2}, 1e-6, 0)
    assert "length 2" in default_compare([1], [1, 2], 1e-6, 0)
    assert default_compare(float("nan"), float("nan"), 1e-6, 0) is None
    assert default_compare(torch.tensor(6), 6, 1e-6, 0) is None  # one-element tensor for a number
    assert "expected a number, got bool" == default_compare(True, 1, 1e-6, 0)
    assert "expected a number, got str" == default_compare("6", 6, 1e-6, 0)
    assert default_compare("mha", "mha", 0, 0) is None and default_compare(None, None, 0, 0) is None
    assert "dtype torch.float32 != expected torch.int64" in default_compare(torch.ones(2), torch.ones(2, dtype=torch.long), 0, 0)


def test_numpy_scalars_count_as_numbers():
    """A student who computes with numpy (np.prod, np.log2, ...) returns np.int64 / np.float32."""
    assert default_compare(np.int64(6), 6, 1e-6, 0) is None
    assert default_compare(np.float32(0.5), 0.5, 1e-6, 0) is None


@given(x=st.floats(-1e6, 1e6, allow_nan=False), rel=st.floats(-0.9e-6, 0.9e-6))
def test_default_compare_within_rtol_property(x, rel):
    assert default_compare(x * (1 + rel), x, 1e-6, 0.0) is None


@given(x=st.floats(1e-3, 1e6), rel=st.floats(1.1e-6, 1.0))
def test_default_compare_beyond_rtol_property(x, rel):
    assert default_compare(x * (1 + rel), x, 1e-6, 0.0) is not None


def test_long_values_are_shortened_in_messages():
    assert exercises._show(list(range(10))) == "[0, 1, 2, 3, 4, 5, ...]"
    assert exercises._show(tuple(range(10))) == "(0, 1, 2, 3, 4, 5, ...)"
    assert len(exercises._show("x" * 1000)) == 200
    assert exercises._show(torch.arange(10)).endswith("[0, 1, 2, 3, 4, 5, ...])")


def test_compare_hook_replaces_the_default():
    calls = []

    def same_set(got, expected, case):
        calls.append(case)
        return None if sorted(got) == sorted(expected) else f"wrong elements: {sorted(got)}"

    register(Exercise(name="testchap.uniq", reference=lambda xs: sorted(set(xs)),
                      cases=lambda rng: iter([dict(xs=[3, 1, 3, 2]), dict(xs=[5, 5])]), compare=same_set))
    assert check("testchap.uniq", lambda xs: list(set(xs))[::-1], quiet=True).passed == 2
    assert calls == [dict(xs=[3, 1, 3, 2]), dict(xs=[5, 5])]
    with pytest.raises(ExerciseFailed) as e:
        check("testchap.uniq", lambda xs: xs, quiet=True)
    msg = str(e.value)
    assert "wrong elements: [1, 2, 3, 3]" in msg and "input:    xs=[3, 1, 3, 2]" in msg
    assert "tolerance" not in msg  # a custom comparison has no rtol/atol to show


def test_require_hook_checks_a_property_of_the_function():
    def no_builtin_sum(fn, case):
        return "do not call the reference" if fn is _add else None

    add_exercise(require=no_builtin_sum)
    assert check("testchap.add", lambda a, b: a + b, quiet=True)
    with pytest.raises(ExerciseFailed, match="do not call the reference") as e:
        check("testchap.add", _add, quiet=True)
    assert "case 1 of 10 failed" in str(e.value)


def test_require_sees_the_case():
    seen = []
    add_exercise(require=lambda fn, case: seen.append(case) or (f"a={case['a']} is negative" if case["a"] < 0 else None))
    with pytest.raises(ExerciseFailed, match="a=-1 is negative"):
        check("testchap.add", _add, quiet=True)
    assert seen[0] == dict(a=0, b=0)


def test_reference_values_are_shown_for_floats():
    register(Exercise(name="testchap.sqrt", reference=lambda x: math.sqrt(x), cases=lambda rng: iter([dict(x=2.0)]), rtol=1e-9))
    with pytest.raises(ExerciseFailed) as e:
        check("testchap.sqrt", lambda x: 1.4142, quiet=True)
    assert "expected: 1.4142136" in str(e.value) and "got:      1.4142" in str(e.value)
