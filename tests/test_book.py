"""book.toml: the manifest loader's validation (tiny manifests in tmp_path) and the real manifest."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from labkit import book, student
from labkit.book import BookError

from _helpers import ROOT, chapter, create_files, write_book

# The chapters of the course, in order (the list).
COURSE_IDS = [
    "01-roofline", "02-compile", "03-adamw", "04-lion-tiger", "05-muon", "06-galore-lisa",
    "07-clipping-spikes", "08-ghost-bn", "09-data-order", "10-scaling-laws", "11-checkpointing",
    "12-zero", "13-fsdp", "14-pipeline", "15-tensor-parallel", "16-flash-attention",
    "17-fused-kernels", "18-attention-variants", "19-deep-narrow", "20-dpo", "21-speculative",
    "22-medusa", "23-inflight-batching", "24-compound-serving", "25-spinquant",
    "26-on-device-rag", "27-webgpu", "28-vae-ib", "29-maxent",
]
TECHNIQUE_PACKAGES = ("perf", "optim", "train", "parallel", "kernels", "attention", "align", "infer",
                      "quant", "edge", "theory")


# --- tiny manifests (built with tests/_helpers.py) -------------------------------------


def load_error(root: Path, chapters: list[dict], **kw) -> str:
    path = write_book(root, chapters, **kw)
    with pytest.raises(BookError) as e:
        book.load(path)
    return str(e.value)


# --- good manifests ---------------------------------------------------------------------


def test_planned_chapters_validate_without_any_files(tmp_path):
    b = book.load(write_book(tmp_path, [chapter("01-alpha"), chapter("02-beta", tests=[])]))
    assert [c.id for c in b.chapters] == ["01-alpha", "02-beta"]
    assert b.active() == []
    assert not (tmp_path / "solutions").exists()


def test_draft_chapter_with_all_files_loads_into_dataclasses(tmp_path):
    c1 = chapter("01-alpha", status="draft", sources=["A", "B"], device="gpu", minutes=45)
    c2 = chapter("02-beta-gamma", part=2, status="complete")
    c3 = chapter("03-delta", part=2)
    for c in (c1, c2):
        create_files(tmp_path, c)
    b = book.load(write_book(tmp_path, [c1, c2, c3], parts=((1, "One"), (2, "Two"))))
    assert b.title == "Tiny book"
    assert b.root == tmp_path
    assert [(p.number, p.title) for p in b.parts] == [(1, "One"), (2, "Two")]
    alpha = b.chapters[0]
    assert alpha.sources == ("A", "B") and alpha.modules == ("labkit.tiny.alpha",)
    assert (alpha.device, alpha.minutes, alpha.status, alpha.number, alpha.slug) == ("gpu", 45, "draft", 1, "alpha")
    assert [c.id for c in b.active()] == ["01-alpha", "02-beta-gamma"]
    assert b.part_of(b.chapters[1]).title == "Two"


def test_chapter_lookup_by_id_slug_and_number(tmp_path):
    b = book.load(write_book(tmp_path, [chapter("01-alpha"), chapter("02-beta")]))
    assert b.chapter("02-beta") is b.chapter("beta") is b.chapter("2") is b.chapter("02")
    with pytest.raises(KeyError, match="no chapter 'zeta'.*01-alpha, 02-beta"):
        b.chapter("zeta")


def test_a_package_module_counts_as_existing(tmp_path):
    c = chapter("01-alpha", status="draft", modules=["labkit.tiny.pkg"])
    create_files(tmp_path, c, skip=("modules",))
    (tmp_path / "labkit/tiny/pkg").mkdir(parents=True)
    (tmp_path / "labkit/tiny/pkg/__init__.py").write_text("")
    assert book.load(write_book(tmp_path, [c])).chapters[0].modules == ("labkit.tiny.pkg",)


# --- broken manifests: each message names the chapter and the field ---------------------


def test_missing_solution_message_is_exact(tmp_path):
    chapters = [chapter(f"0{i}-c{i}") for i in range(1, 5)] + [chapter("05-muon", status="draft")]
    create_files(tmp_path, chapters[-1], skip=("solution",))
    msg = load_error(tmp_path, chapters)
    assert msg == "book.toml: chapter 05-muon: solution 'solutions/05-muon.ipynb' does not exist"


def test_missing_notebook_for_complete_chapter(tmp_path):
    c = chapter("01-alpha", status="complete")
    create_files(tmp_path, c, skip=("notebook",))
    assert load_error(tmp_path, [c]) == ("book.toml: chapter 01-alpha: notebook "
                                         "'notebooks/01-alpha.ipynb' does not exist")


@pytest.mark.parametrize("field", ["id", "title", "part", "sources", "modules", "solution", "notebook",
                                   "tests", "device", "minutes", "status"])
def test_missing_field(tmp_path, field):
    c = chapter("01-alpha")
    del c[field]
    msg = load_error(tmp_path, [c])
    where = "chapter #1" if field == "id" else "chapter 01-alpha"
    assert f"book.toml: {where}: missing field '{field}'" in msg


@pytest.mark.parametrize("field,value,typename", [
    ("minutes", "sixty", "str"), ("part", "1", "str"), ("part", True, "bool"), ("sources", "An article", "str"),
    ("title", 3, "int"), ("tests", "tests/test_x.py", "str"), ("minutes", 1.5, "float"),
])
def test_wrong_type(tmp_path, field, value, typename):
    msg = load_error(tmp_path, [chapter("01-alpha", **{field: value})])
    assert msg.startswith("book.toml: chapter 01-alpha: ")
    assert f"{field} must be a" in msg and typename in msg


@pytest.mark.parametrize("field,value,expect", [
    ("status", "done", "status must be one of ('planned', 'draft', 'complete'), got 'done'"),
    ("device", "tpu", "device must be one of ('cpu', 'gpu'), got 'tpu'"),
    ("part", 7, "part 7 is not one of the parts [1]"),
    ("minutes", 0, "minutes must be positive, got 0"),
    ("sources", [], "sources must name at least one source article"),
    ("modules", [], "modules must name at least one labkit module"),
    ("modules", ["torch.nn"], "modules: 'torch.nn' is not a labkit module path"),
    ("sources", ["ok", ""], "sources must be a list of non-empty strings"),
    ("solution", "solutions/alpha.ipynb", "solution must be 'solutions/01-alpha.ipynb', got 'solutions/alpha.ipynb'"),
    ("notebook", "nb/01-alpha.ipynb", "notebook must be 'notebooks/01-alpha.ipynb', got 'nb/01-alpha.ipynb'"),
    ("colour", "red", "unknown field(s) ['colour']"),
])
def test_bad_value(tmp_path, field, value, expect):
    msg = load_error(tmp_path, [chapter("01-alpha", **{field: value})])
    assert msg.startswith("book.toml: chapter 01-alpha: ")
    assert expect in msg


@pytest.mark.parametrize("cid", ["1-alpha", "01_alpha", "01-Alpha", "01-alpha-", "alpha"])
def test_bad_id(tmp_path, cid):
    msg = load_error(tmp_path, [chapter("01-alpha", id=cid)])
    assert f"chapter {cid}: id must look like 'NN-slug'" in msg


def test_duplicate_id(tmp_path):
    msg = load_error(tmp_path, [chapter("01-alpha"), chapter("01-alpha")])
    assert msg == "book.toml: chapter 01-alpha: id listed twice"


def test_out_of_order_numbering(tmp_path):
    msg = load_error(tmp_path, [chapter("01-alpha"), chapter("03-gamma"), chapter("02-beta")])
    assert msg == "book.toml: chapter 03-gamma: expected number 02 at position 2 (chapters in order)"


def test_chapters_grouped_by_part(tmp_path):
    parts = ((1, "One"), (2, "Two"))
    msg = load_error(tmp_path, [chapter("01-alpha", part=2), chapter("02-beta", part=1)], parts=parts)
    assert "grouped by part" in msg and "[2, 1]" in msg


def test_part_without_chapters(tmp_path):
    msg = load_error(tmp_path, [chapter("01-alpha")], parts=((1, "One"), (2, "Two")))
    assert "part(s) [2] have no chapters" in msg


def test_duplicate_and_malformed_parts(tmp_path):
    assert "part 1: listed twice" in load_error(tmp_path, [chapter("01-alpha")], parts=((1, "A"), (1, "B")))
    assert "part #1: needs an int 'number'" in load_error(tmp_path, [chapter("01-alpha")], parts=(("1", "A"),))
    assert "no [[parts]]" in load_error(tmp_path, [chapter("01-alpha")], parts=())


def test_missing_title_and_no_chapters(tmp_path):
    assert "[book] needs a title" in load_error(tmp_path, [chapter("01-alpha")], title="")
    assert "no [[chapters]]" in load_error(tmp_path, [])


def test_missing_test_file_for_draft_chapter(tmp_path):
    c = chapter("01-alpha", status="draft", tests=["tests/test_alpha.py", "tests/test_more.py"])
    create_files(tmp_path, c)
    (tmp_path / "tests/test_more.py").unlink()
    assert load_error(tmp_path, [c]) == "book.toml: chapter 01-alpha: tests: 'tests/test_more.py' does not exist"


def test_draft_chapter_needs_a_test_file(tmp_path):
    c = chapter("01-alpha", status="draft", tests=[])
    create_files(tmp_path, c)
    assert "chapter 01-alpha: tests must name at least one test file for a draft chapter" in load_error(tmp_path, [c])


def test_missing_module_for_draft_chapter(tmp_path):
    c = chapter("01-alpha", status="draft", modules=["labkit.tiny.alpha", "labkit.tiny.ghost"])
    create_files(tmp_path, c)
    (tmp_path / "labkit/tiny/ghost.py").unlink()
    msg = load_error(tmp_path, [c])
    assert msg.startswith("book.toml: chapter 01-alpha: modules: 'labkit.tiny.ghost' has no file")


def test_planned_chapter_with_missing_module_is_fine(tmp_path):
    b = book.load(write_book(tmp_path, [chapter("01-alpha", modules=["labkit.tiny.ghost"])]))
    assert b.chapters[0].modules == ("labkit.tiny.ghost",)


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "book.toml"
    path.write_text('[book]\ntitle = "Tiny\n')
    with pytest.raises(BookError, match=r"^book\.toml: not valid TOML: "):
        book.load(path)


def test_missing_manifest(tmp_path):
    with pytest.raises(BookError, match="not found"):
        book.load(tmp_path / "book.toml")


def test_errors_are_value_errors(tmp_path):
    assert issubclass(BookError, ValueError)


# --- the repository's book.toml ---------------------------------------------------------


def _real_text() -> str:
    return (ROOT / "book.toml").read_text(encoding="utf-8")


def test_real_book_structure():
    """29 chapters in 9 parts with the course's ids in order (files not consulted: all read as planned)."""
    text = re.sub(r'(?m)^status = "(draft|complete)"$', 'status = "planned"', _real_text())
    b = book.parse(text, ROOT)
    assert len(b.parts) == 9
    assert [p.number for p in b.parts] == list(range(1, 10))
    assert [c.id for c in b.chapters] == COURSE_IDS
    for c in b.chapters:
        assert c.sources and all(s.strip() for s in c.sources), c.id
        assert c.modules and all(m.startswith("labkit.") for m in c.modules), c.id
        assert c.title.strip(), c.id


def test_real_book_loads_with_its_files():
    """The real manifest validates against the files on disk (draft/complete chapters name existing files)."""
    b = book.load()
    assert len(b.chapters) == 29 and len(b.parts) == 9
    assert [c.id for c in b.chapters] == COURSE_IDS


def test_every_technique_module_belongs_to_a_chapter():
    listed = {m for c in tomllib.loads(_real_text())["chapters"] for m in c["modules"]}
    orphans = []
    for package in TECHNIQUE_PACKAGES:
        folder = ROOT / "labkit" / package
        for path in sorted(folder.rglob("*.py")) if folder.exists() else []:
            if path.name.startswith("_"):  # __init__ and private helpers (e.g. _checks.py)
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if module not in listed:
                orphans.append(module)
    assert orphans == [], f"technique modules no chapter lists in book.toml `modules`: {orphans}"


def test_notebooks_equal_the_student_build():
    assert student.stale() == []
