"""The student build: solutions/ -> notebooks/ (markers, outputs, widget state, staleness)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import nbformat
import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit import student
from labkit.student import BEGIN, END, PLACEHOLDER, StudentBuildError

from _helpers import chapter, create_files, write_book

# --- strip_solutions ----------------------------------------------------------------------


def test_block_replaced_at_the_marker_indentation():
    src = (
        "import math\n"
        "\n"
        "def gemm_flops(M, N, K):\n"
        "    \"\"\"FLOPs of a GEMM.\"\"\"\n"
        "    ### BEGIN SOLUTION\n"
        "    flops = 2 * M * N * K\n"
        "    return flops\n"
        "    ### END SOLUTION\n"
        "\n"
        "print('defined')\n"
    )
    assert student.strip_solutions(src) == (
        "import math\n"
        "\n"
        "def gemm_flops(M, N, K):\n"
        "    \"\"\"FLOPs of a GEMM.\"\"\"\n"
        f"    {PLACEHOLDER}\n"
        "\n"
        "print('defined')\n"
    )


def test_several_blocks_and_deeper_indentation():
    src = (
        "class Opt:\n"
        "    def step(self):\n"
        "        ### BEGIN SOLUTION\n"
        "        self.t += 1\n"
        "        ### END SOLUTION\n"
        "\n"
        "def f(x):\n"
        "\t### BEGIN SOLUTION\n"
        "\treturn x\n"
        "\t### END SOLUTION"
    )
    out = student.strip_solutions(src)
    assert out == (
        "class Opt:\n"
        "    def step(self):\n"
        f"        {PLACEHOLDER}\n"
        "\n"
        "def f(x):\n"
        f"\t{PLACEHOLDER}"
    )
    compile(out, "<cell>", "exec")  # still valid Python
    assert "self.t" not in out and "return x" not in out


def test_source_without_markers_is_unchanged():
    src = "x = 1\n# ### BEGIN SOLUTION is only a marker on a line of its own\nprint(x)"
    assert student.strip_solutions(src) == src


@pytest.mark.parametrize("src,fragment", [
    (f"{BEGIN}\n{BEGIN}\nx = 1\n{END}\n{END}\n", "line 2: '### BEGIN SOLUTION' inside another solution block"),
    (f"def f():\n    {BEGIN}\n    return 1\n", "'### BEGIN SOLUTION' is never closed"),
    (f"x = 1\n{END}\n", "line 2: '### END SOLUTION' without a '### BEGIN SOLUTION'"),
    (f"{BEGIN}\nx = 1\n{END}\n{END}\n", "line 4: '### END SOLUTION' without"),
])
def test_malformed_markers_raise(src, fragment):
    with pytest.raises(StudentBuildError) as e:
        student.strip_solutions(src, "solutions/01-alpha.ipynb: cell 4")
    assert str(e.value).startswith("solutions/01-alpha.ipynb: cell 4: ")
    assert fragment in str(e.value)


_line = st.text(alphabet="abcxyz =+()1:#'", max_size=20).filter(lambda s: "SOLUTION" not in s)


@given(before=st.lists(_line, max_size=4), body=st.lists(_line, max_size=4), after=st.lists(_line, max_size=4),
       indent=st.sampled_from(["", "    ", "        ", "\t"]))
def test_strip_property(before, body, after, indent):
    src = "".join(line + "\n" for line in [*before, indent + BEGIN, *(indent + b for b in body), indent + END, *after])
    out = student.strip_solutions(src)
    assert out == "".join(line + "\n" for line in [*before, indent + PLACEHOLDER, *after])
    assert student.strip_solutions(out) == out  # idempotent


# --- student_notebook -----------------------------------------------------------------------

EXERCISE = f"def double(x):\n    {BEGIN}\n    return 2 * x\n    {END}\n"


def solution_notebook(exercise: str = EXERCISE) -> dict:
    """A tiny solution notebook as it would sit on disk after someone ran and saved it."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"x": {"big": "state"}}}}
    md = nbformat.v4.new_markdown_cell(f"# Alpha\nIn markdown the marker stays:\n{BEGIN}\ntext\n{END}\n")
    code = nbformat.v4.new_code_cell(exercise, execution_count=3)
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    code.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    code.metadata["tags"] = ["keep-me"]
    check = nbformat.v4.new_code_cell("import labkit\nlabkit.check('alpha.double', double)", execution_count=4)
    check.outputs = [nbformat.v4.new_output("display_data", data={
        "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2, "version_minor": 0}})]
    nb.cells = [md, code, check]
    return json.loads(nbformat.writes(nb))  # on-disk form: sources as lists of lines


def test_student_notebook_strips_solutions_and_run_state():
    nb = solution_notebook()
    out = student.student_notebook(nb, "solutions/01-alpha.ipynb")
    assert out is not nb and "widgets" in nb["metadata"]  # the input is left alone
    assert "widgets" not in out["metadata"]
    assert out["metadata"]["kernelspec"]["name"] == "python3"
    md, code, check = out["cells"]
    assert md == nb["cells"][0]  # markdown untouched, markers included
    assert code["source"] == f"def double(x):\n    {PLACEHOLDER}\n"
    assert code["outputs"] == [] and code["execution_count"] is None
    assert "execution" not in code["metadata"] and code["metadata"]["tags"] == ["keep-me"]
    assert check["outputs"] == [] and check["execution_count"] is None
    assert "".join(check["source"]) == "import labkit\nlabkit.check('alpha.double', double)"
    nbformat.validate(nbformat.from_dict(out))


def test_student_notebook_is_idempotent():
    once = student.student_notebook(solution_notebook())
    assert student.student_notebook(once) == once
    assert student.dumps(student.student_notebook(json.loads(student.dumps(once)))) == student.dumps(once)


def test_malformed_marker_names_the_notebook_and_cell():
    nb = solution_notebook(f"def double(x):\n    {BEGIN}\n    return 2 * x\n")
    with pytest.raises(StudentBuildError, match=r"^solutions/01-alpha\.ipynb: cell 1: .*never closed"):
        student.student_notebook(nb, "solutions/01-alpha.ipynb")


def test_dumps_matches_nbformat():
    """The module promises Jupyter's own saves produce no diff: nbformat writes sources as lists of lines."""
    nb = student.student_notebook(solution_notebook())
    saved = io.StringIO()
    nbformat.write(nbformat.from_dict(nb), saved)  # what Jupyter writes to disk
    assert student.dumps(nb) == saved.getvalue()


# --- build / stale / write on a tiny repository --------------------------------------------


PARTS = ((1, "First things"), (2, "Later things"))
CHAPTERS = [
    chapter("01-alpha", title="Alpha, the first", status="draft"),
    chapter("02-beta", part=2, title="Beta, in progress", tests=[], device="gpu", minutes=45),
    chapter("03-gamma", part=2, title="Gamma, some day", tests=[], minutes=20),
]


def _write_nb(path: Path, nb: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")


@pytest.fixture
def repo(tmp_path) -> Path:
    """book.toml + solutions/ (+ the draft chapter's other files) + an up-to-date notebooks/."""
    write_book(tmp_path, CHAPTERS, parts=PARTS, title="Tiny course")
    create_files(tmp_path, CHAPTERS[0], skip=("solution", "notebook"))
    _write_nb(tmp_path / "solutions/01-alpha.ipynb", solution_notebook())
    _write_nb(tmp_path / "solutions/02-beta.ipynb",
              solution_notebook(f"def half(x):\n    {BEGIN}\n    return x / 2\n    {END}\n"))
    _write_nb(tmp_path / "notebooks/01-alpha.ipynb", {})  # exists (the book requires it), content stale
    student.write(tmp_path)
    return tmp_path


def test_build_lists_start_page_and_every_solution(repo):
    files = student.build(repo)
    assert sorted(p.name for p in files) == ["00-start.ipynb", "01-alpha.ipynb", "02-beta.ipynb"]
    alpha = json.loads(files[repo / "notebooks/01-alpha.ipynb"])
    assert "".join(alpha["cells"][1]["source"]) == f"def double(x):\n    {PLACEHOLDER}\n"
    for text in files.values():
        assert text.endswith("\n")
        nbformat.validate(nbformat.reads(text, as_version=4))


def test_fresh_build_is_not_stale_and_rewriting_changes_nothing(repo):
    assert student.stale(repo) == []
    before = {p: p.read_bytes() for p in (repo / "notebooks").iterdir()}
    assert student.write(repo) == []
    assert {p: p.read_bytes() for p in (repo / "notebooks").iterdir()} == before


def test_stale_detects_changed_missing_and_extra_and_write_fixes_them(repo):
    nbs = repo / "notebooks"
    _write_nb(repo / "solutions/01-alpha.ipynb",
              solution_notebook(f"def double(x):\n    # changed\n    {BEGIN}\n    return x + x\n    {END}\n"))
    (nbs / "02-beta.ipynb").unlink()
    (nbs / "00-start.ipynb").unlink()
    _write_nb(nbs / "99-orphan.ipynb", {})
    assert sorted(student.stale(repo)) == [
        "00-start.ipynb: missing",
        "01-alpha.ipynb: differs from the student build of solutions/",
        "02-beta.ipynb: missing",
        "99-orphan.ipynb: has no solution in solutions/",
    ]
    changed = student.write(repo)
    assert sorted(p.name for p in changed) == ["00-start.ipynb", "01-alpha.ipynb", "02-beta.ipynb", "99-orphan.ipynb"]
    assert not (nbs / "99-orphan.ipynb").exists()
    assert student.stale(repo) == []
    assert "# changed" in (nbs / "01-alpha.ipynb").read_text()


def test_hand_edit_of_a_student_notebook_is_stale(repo):
    path = repo / "notebooks/01-alpha.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"][1]["source"] = "def double(x):\n    return 2 * x\n"  # someone solved it in notebooks/
    path.write_text(student.dumps(nb))
    assert student.stale(repo) == ["01-alpha.ipynb: differs from the student build of solutions/"]


def test_build_reports_the_bad_cell(repo):
    _write_nb(repo / "solutions/02-beta.ipynb", solution_notebook(f"x = 1\n{END}\n"))
    with pytest.raises(StudentBuildError, match=r"solutions/02-beta\.ipynb: cell 1: line 2: '### END SOLUTION' without"):
        student.build(repo)
    with pytest.raises(StudentBuildError):
        student.stale(repo)


def test_start_page_lists_every_chapter_by_part(repo):
    nb = json.loads((repo / "notebooks/00-start.ipynb").read_text())
    nbformat.validate(nbformat.from_dict(nb))
    text = "".join(nb["cells"][0]["source"])
    assert text.startswith("# Tiny course")
    assert "## Part 1. First things" in text and "## Part 2. Later things" in text
    assert text.index("Part 1.") < text.index("Alpha, the first") < text.index("Part 2.") < text.index("Beta, in progress")
    assert "| 01 | [Alpha, the first](01-alpha.ipynb) | cpu | 30 | draft |" in text
    assert "| 02 | Beta, in progress | gpu | 45 | planned |" in text  # planned: no link yet
    assert "| 03 | Gamma, some day | cpu | 20 | planned |" in text
    assert nb["cells"][1]["cell_type"] == "code" and "import labkit" in "".join(nb["cells"][1]["source"])


def test_write_creates_the_notebook_of_a_new_draft_chapter(repo):
    """An author adds solutions/02-beta.ipynb, marks the chapter draft, runs `labkit student`:
    the build must create notebooks/02-beta.ipynb, not refuse because it does not exist yet."""
    (repo / "notebooks/02-beta.ipynb").unlink()
    alpha, beta, gamma = CHAPTERS
    beta = {**beta, "status": "draft", "tests": alpha["tests"], "modules": alpha["modules"]}  # files that exist
    write_book(repo, [alpha, beta, gamma], parts=PARTS, title="Tiny course")
    assert "02-beta.ipynb: missing" in student.stale(repo)
    assert sorted(p.name for p in student.write(repo)) == ["00-start.ipynb", "02-beta.ipynb"]  # beta now linked
    assert student.stale(repo) == []
