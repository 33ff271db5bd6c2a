"""Graded exercises: `check(name, fn)` tests a student's function against labkit's reference.

Each chapter registers its exercises in `labkit/exercises/<slug>.py` (the chapter id
without its "NN-" prefix, '-' as '_'); an exercise is named "<slug>.<exercise>", e.g.
"roofline.gemm_flops". `check` runs the student's function on the exercise's edge cases
and randomized cases (seeded, so a failure is reproducible), compares with the reference,
and prints a compact verdict:

    roofline.gemm_flops: 21/21 cases passed
    roofline.gemm_flops: case 3 of 21 failed
      input:    M=64, N=1, K=7
      expected: 896
      got:      448
      tolerance: rtol=0, atol=0

A wrong answer raises `ExerciseFailed` (so a notebook run stops there); a function that
still raises NotImplementedError is reported as "not attempted yet" without raising.
"""

from __future__ import annotations

import importlib
import math
import numbers
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from labkit.book import module_name, slug

_REGISTRY: dict[str, "Exercise"] = {}


class ExerciseFailed(AssertionError):
    """A student's answer disagreed with the reference."""


class _CaseTimeout(BaseException):
    """A BaseException, so a student's own `except Exception` cannot swallow it."""


@dataclass(frozen=True)
class Exercise:
    """One graded exercise.

    cases(rng) yields keyword-argument dicts; the student's function is called as fn(**case).
    compare(got, expected, case) -> message or None replaces the default numeric comparison.
    require(fn, case) -> message or None checks an extra property of the student's function.
    """

    name: str
    reference: Callable[..., Any]
    cases: Callable[[random.Random], Iterable[dict]]
    rtol: float = 1e-6
    atol: float = 0.0
    compare: Callable[[Any, Any, dict], str | None] | None = None
    require: Callable[[Callable, dict], str | None] | None = None
    timeout: float = 10.0
    hint: str = ""


@dataclass
class Result:
    """What check() found; also returned so tests can inspect it."""

    name: str
    status: str  # "passed" | "failed" | "not attempted"
    passed: int = 0
    total: int = 0
    message: str = ""
    case: dict | None = field(default=None, repr=False)

    def __bool__(self) -> bool:
        return self.status == "passed"


def _canonical(name: str) -> str:
    chapter, _, exercise = name.partition(".")
    return f"{slug(chapter)}.{exercise}"


def register(ex: Exercise) -> Exercise:
    """Add an exercise to the registry (a chapter module calls this at import)."""
    if not isinstance(ex, Exercise):
        raise TypeError(f"register: expected an Exercise, got {type(ex).__name__}")
    if ex.name.count(".") != 1:
        raise ValueError(f"register: name must look like '<chapter>.<exercise>', got {ex.name!r}")
    _REGISTRY[_canonical(ex.name)] = ex
    return ex


def exercises_for(chapter: str) -> list[str]:
    """Names of the exercises a chapter registers ('roofline' or '01-roofline')."""
    module = "labkit.exercises." + module_name(chapter)
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:  # no module: exercises may still be registered by hand
        if e.name != module:
            raise
    return sorted(ex.name for key, ex in _REGISTRY.items() if key.split(".")[0] == slug(chapter))


def lookup(name: str) -> Exercise:
    """The registered exercise called `name`, importing its chapter module on first use."""
    if not isinstance(name, str) or name.count(".") != 1:
        raise ValueError(f"check: name must look like '<chapter>.<exercise>', got {name!r}")
    chapter = name.split(".")[0]
    known = exercises_for(chapter)
    if _canonical(name) not in _REGISTRY:
        listing = ", ".join(known) if known else "none (no exercises registered for that chapter)"
        raise ValueError(f"check: unknown exercise {name!r}; chapter {chapter!r} has: {listing}")
    return _REGISTRY[_canonical(name)]


# --- comparing and showing values -------------------------------------------------------


def _show(x: Any, limit: int = 6) -> str:
    if isinstance(x, torch.Tensor):
        flat = x.detach().flatten()
        vals = ", ".join(f"{v:.6g}" if x.is_floating_point() else str(v) for v in flat[:limit].tolist())
        more = ", ..." if flat.numel() > limit else ""
        return f"tensor(shape={tuple(x.shape)}, dtype={x.dtype}, [{vals}{more}])"
    if isinstance(x, float):
        return f"{x:.8g}"
    if isinstance(x, (list, tuple)) and len(x) > limit:
        opening, closing = ("[", "]") if isinstance(x, list) else ("(", ")")
        return opening + ", ".join(_show(v) for v in x[:limit]) + ", ..." + closing
    text = repr(x)
    return text if len(text) < 200 else text[:197] + "..."


def _show_case(case: dict) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in case.items())


def default_compare(got: Any, expected: Any, rtol: float, atol: float, path: str = "") -> str | None:
    """None when got matches expected within tolerance, else a short reason."""
    where = f" at {path}" if path else ""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor{where}, got {type(got).__name__}"
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)} != expected {tuple(expected.shape)}{where}"
        if got.dtype.is_floating_point and not expected.dtype.is_floating_point:
            return f"dtype {got.dtype} != expected {expected.dtype}{where}"
        try:
            torch.testing.assert_close(got.detach().cpu().to(expected.dtype), expected.detach().cpu(),
                                       rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as e:
            return f"values differ{where}: " + str(e).strip().splitlines()[-1] if str(e) else "values differ"
        return None
    if isinstance(expected, (bool,)) or expected is None or isinstance(expected, str):
        return None if got == expected else f"{_show(got)} != expected {_show(expected)}{where}"
    if isinstance(expected, (int, float)):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if hasattr(got, "item") and getattr(got, "shape", None) == ():  # numpy scalars and 0-d arrays
            got = got.item()
        if not isinstance(got, numbers.Real) or isinstance(got, bool):
            return f"expected a number{where}, got {type(got).__name__}"
        if math.isnan(expected) and math.isnan(got):
            return None
        if math.isclose(got, expected, rel_tol=rtol, abs_tol=atol) or got == expected:
            return None
        return f"{_show(got)} != expected {_show(expected)}{where}"
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return f"expected a dict with keys {sorted(expected)}{where}, got {_show(got)}"
        for k in expected:
            msg = default_compare(got[k], expected[k], rtol, atol, f"{path}[{k!r}]")
            if msg:
                return msg
        return None
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"expected a sequence of length {len(expected)}{where}, got {_show(got)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = default_compare(g, e, rtol, atol, f"{path}[{i}]")
            if msg:
                return msg
        return None
    return None if got == expected else f"{_show(got)} != expected {_show(expected)}{where}"


# --- running one case under a time limit ------------------------------------------------


def _call_with_timeout(fn: Callable, case: dict, seconds: float) -> Any:
    """fn(**case), interrupted after `seconds` (SIGALRM in the main thread, a watcher thread otherwise)."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise _CaseTimeout()

        previous = signal.signal(signal.SIGALRM, on_alarm)
        outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # an outer timer (pytest-timeout) is re-armed below
        started = time.monotonic()
        try:
            return fn(**case)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn(**case)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _CaseTimeout()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _copy_case(case: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def check(name: str, fn: Callable, *, seed: int = 0, quiet: bool = False) -> Result:
    """Grade `fn` on exercise `name`; print the verdict; raise ExerciseFailed on a wrong answer."""
    ex = lookup(name)
    if not callable(fn):
        raise TypeError(f"check: fn must be callable, got {type(fn).__name__}")
    cases = list(ex.cases(random.Random(seed)))
    total = len(cases)

    def finish(result: Result) -> Result:
        if not quiet:
            print(result.message)
        if result.status == "failed":
            raise ExerciseFailed(result.message)
        return result

    for i, case in enumerate(cases, 1):
        expected = ex.reference(**_copy_case(case))
        try:
            got = _call_with_timeout(fn, _copy_case(case), ex.timeout)
        except NotImplementedError:
            return finish(Result(name, "not attempted", 0, total,
                                 f"{name}: not attempted yet (the function raises NotImplementedError)"))
        except _CaseTimeout:
            reason = f"stopped after {ex.timeout:g} s (too slow, or an endless loop?)"
        except Exception as e:  # the student's code crashed: show the input that crashed it
            reason = f"raised {type(e).__name__}: {e}"
        else:
            compare = ex.compare or (lambda g, e, c: default_compare(g, e, ex.rtol, ex.atol))
            reason = compare(got, expected, case)
            if reason is not None:
                reason += f"\n  expected: {_show(expected)}\n  got:      {_show(got)}"
                if ex.compare is None:
                    reason += f"\n  tolerance: rtol={ex.rtol:g}, atol={ex.atol:g}"
            elif ex.require is not None:  # right values; now a property of the function itself
                reason = ex.require(fn, _copy_case(case))
            if reason is None:
                continue
        lines = [f"{name}: case {i} of {total} failed", f"  input:    {_show_case(case)}", f"  {reason}"]
        if ex.hint:
            lines.append(f"  hint: {ex.hint}")
        return finish(Result(name, "failed", i - 1, total, "\n".join(lines), case))
    return finish(Result(name, "passed", total, total, f"{name}: {total}/{total} cases passed"))


__all__ = ["Exercise", "ExerciseFailed", "Result", "check", "default_compare", "exercises_for",
           "lookup", "register"]
