"""Scaffolding shared by the core tests: tiny book.toml manifests and a fake benchmarks module.

Plain functions (not fixtures): the test modules import them with `from _helpers import ...`
(pytest puts tests/ on sys.path) and wrap them in fixtures where they need one.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- tiny manifests -----------------------------------------------------------------------


def _value(v) -> str:
    """A Python value as a TOML literal."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"_value: cannot write a {type(v).__name__} as TOML")


def chapter(cid: str, part: int = 1, status: str = "planned", **fields) -> dict:
    """One [[chapters]] entry with every field filled in from the id; `fields` override."""
    slug = cid[3:].replace("-", "_")
    c = dict(id=cid, title=f"Chapter {cid}", part=part, sources=["An article"],
             modules=[f"labkit.tiny.{slug}"], solution=f"solutions/{cid}.ipynb",
             notebook=f"notebooks/{cid}.ipynb", tests=[f"tests/test_{slug}.py"], device="cpu",
             minutes=30, status=status)
    c.update(fields)
    return c


def manifest(chapters: list[dict], parts=((1, "One"),), title="Tiny book") -> str:
    """The text of a book.toml with these parts and chapters."""
    lines = ["[book]", f"title = {_value(title)}", ""]
    for number, ptitle in parts:
        lines += ["[[parts]]", f"number = {_value(number)}", f"title = {_value(ptitle)}", ""]
    for c in chapters:
        lines.append("[[chapters]]")
        lines += [f"{k} = {_value(v)}" for k, v in c.items()]
        lines.append("")
    return "\n".join(lines)


def write_book(root: Path, chapters: list[dict], **kw) -> Path:
    """Write root/book.toml (`kw`: parts, title, as for `manifest`)."""
    path = root / "book.toml"
    path.write_text(manifest(chapters, **kw), encoding="utf-8")
    return path


def create_files(root: Path, c: dict, skip: tuple[str, ...] = ()) -> None:
    """The files a draft/complete chapter names (minus the keys in `skip`), as empty stubs."""
    paths = []
    if "solution" not in skip:
        paths.append(c["solution"])
    if "notebook" not in skip:
        paths.append(c["notebook"])
    if "tests" not in skip:
        paths += c["tests"]
    if "modules" not in skip:
        paths += [m.replace(".", "/") + ".py" for m in c["modules"]]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("{}\n" if p.endswith(".ipynb") else "")


# --- a fake labkit.benchmarks.<module> -------------------------------------------------------


def fake_benchmark_result(quick: bool) -> list[dict]:
    """What the fake module's run(quick) returns."""
    return [{"name": "fake kernel", "n": 8 if quick else 4096, "median_ms": 0.125}]


def install_fake_benchmarks(monkeypatch, module: str = "fake_bench") -> list[bool]:
    """Put a `labkit.benchmarks.<module>` with a recording `run(quick)` into sys.modules.

    Returns the list every call appends its `quick` argument to.
    """
    calls: list[bool] = []

    def run(quick: bool = False):
        calls.append(quick)
        return fake_benchmark_result(quick)

    fake = types.ModuleType(f"labkit.benchmarks.{module}")
    fake.run = run
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    return calls
