"""Student editions: build notebooks/ from solutions/.

In a solution notebook an answer sits between two marker lines inside a code cell:

    def gemm_flops(M, N, K):
        ### BEGIN SOLUTION
        return 2 * M * N * K
        ### END SOLUTION

The student build replaces the block (markers included) with one `raise NotImplementedError`
at the marker's indentation, and drops every output, execution count and saved widget state.
It also writes notebooks/00-start.ipynb, the course's start page, from book.toml.
`labkit student --check` fails when notebooks/ differs from what the build would write.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nbformat

from labkit import book as book_mod

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = 'raise NotImplementedError("your turn: write this, then run the check below")'
START = "00-start.ipynb"


class StudentBuildError(ValueError):
    """A solution notebook's markers are malformed."""


def strip_solutions(source: str, where: str = "cell") -> str:
    """The source with each BEGIN/END SOLUTION block replaced by a NotImplementedError."""
    out: list[str] = []
    inside = False
    for n, line in enumerate(source.splitlines(keepends=True), 1):
        marker = line.strip()
        if marker == BEGIN:
            if inside:
                raise StudentBuildError(f"{where}: line {n}: '{BEGIN}' inside another solution block")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.append(indent + PLACEHOLDER + ("\n" if line.endswith("\n") else ""))
        elif marker == END:
            if not inside:
                raise StudentBuildError(f"{where}: line {n}: '{END}' without a '{BEGIN}'")
            inside = False
            if not line.endswith("\n") and out and out[-1].endswith("\n"):
                out[-1] = out[-1][:-1]  # keep the cell's final newline as it was
        elif not inside:
            out.append(line)
    if inside:
        raise StudentBuildError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "".join(out)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def student_notebook(nb: dict, where: str = "notebook") -> dict:
    """The student edition of a solution notebook (a new dict)."""
    nb = copy.deepcopy(nb)
    nb.get("metadata", {}).pop("widgets", None)
    for i, cell in enumerate(nb.get("cells", [])):
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        cell["source"] = strip_solutions(_source(cell), f"{where}: cell {i}")
        cell["outputs"] = []
        cell["execution_count"] = None
    return nb


def dumps(nb: dict) -> str:
    """Serialize exactly as Jupyter saves (so opening and saving a notebook changes nothing)."""
    return nbformat.writes(nbformat.from_dict(nb)) + "\n"


def _markdown(text: str, cell_id: str) -> dict:
    return {"cell_type": "markdown", "id": cell_id, "metadata": {}, "source": text}


def start_page(b: book_mod.Book) -> dict:
    """notebooks/00-start.ipynb: what the course is and every chapter, by part."""
    lines = [
        f"# {b.title}\n",
        "Each chapter is a notebook: read, move the sliders, run the experiments, and solve the",
        "exercises (the cell after each exercise grades it with `labkit.check`). Chapters marked",
        "*planned* are on their way.\n",
    ]
    for part in b.parts:
        lines.append(f"\n## Part {part.number}. {part.title}\n")
        lines.append("| | chapter | device | minutes | status |\n|---|---|---|---|---|")
        for c in b.chapters:
            if c.part != part.number:
                continue
            name = f"[{c.title}]({c.id}.ipynb)" if c.status != "planned" else c.title
            lines.append(f"| {c.number:02d} | {name} | {c.device} | {c.minutes} | {c.status} |")
    code = {
        "cell_type": "code", "execution_count": None, "id": "where-am-i", "metadata": {}, "outputs": [],
        "source": "import labkit\n\nprint('labkit', labkit.__version__, '| device:', labkit.runtime.device(),"
                  " '| size profile:', labkit.runtime.profile())",
    }
    return {
        "cells": [_markdown("\n".join(lines) + "\n", "course"), code],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }


def build(root: Path | None = None) -> dict[Path, str]:
    """Every file of notebooks/ as the build would write it: {path: text}."""
    b = book_mod.load(root / "book.toml" if root else None, require_notebooks=False)
    root = b.root
    files = {root / "notebooks" / START: dumps(start_page(b))}
    for sol in sorted((root / "solutions").glob("*.ipynb")):
        nb = json.loads(sol.read_text(encoding="utf-8"))
        files[root / "notebooks" / sol.name] = dumps(student_notebook(nb, str(sol.relative_to(root))))
    return files


def stale(root: Path | None = None) -> list[str]:
    """What in notebooks/ differs from the build: missing, changed or extra files."""
    files = build(root)
    folder = next(iter(files)).parent
    problems = []
    for path, text in files.items():
        if not path.exists():
            problems.append(f"{path.name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path.name}: differs from the student build of solutions/")
    for extra in sorted(set(folder.glob("*.ipynb")) - set(files)):
        problems.append(f"{extra.name}: has no solution in solutions/")
    return problems


def write(root: Path | None = None) -> list[Path]:
    """Write the build to notebooks/, removing notebooks without a solution; returns changed paths."""
    files = build(root)
    folder = next(iter(files)).parent
    folder.mkdir(exist_ok=True)
    changed = []
    for path, text in files.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    for extra in sorted(set(folder.glob("*.ipynb")) - set(files)):
        extra.unlink()
        changed.append(extra)
    return changed
