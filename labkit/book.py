"""The course manifest: load and validate book.toml into dataclasses.

Every problem is reported with the place it is in, e.g.
`book.toml: chapter 05-muon: solution 'solutions/05-muon.ipynb' does not exist`.
Planned chapters may name files that do not exist yet; draft and complete ones may not.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from labkit import runtime

STATUSES = ("planned", "draft", "complete")
DEVICES = ("cpu", "gpu")
_ID = re.compile(r"^(\d{2})-[a-z0-9]+(?:-[a-z0-9]+)*$")
_MODULE = re.compile(r"^labkit(?:\.[a-z_][a-z0-9_]*)+$")
_CHAPTER_FIELDS = {
    "id": str, "title": str, "part": int, "sources": list, "modules": list, "solution": str,
    "notebook": str, "tests": list, "device": str, "minutes": int, "status": str,
}


class BookError(ValueError):
    """book.toml is malformed or disagrees with the files on disk."""


class UnknownChapter(BookError, KeyError):
    """No chapter has that id, slug or number."""

    def __str__(self) -> str:
        return str(self.args[0])


def slug(chapter: str) -> str:
    """A chapter's slug: '01-roofline' -> 'roofline'; 'lion_tiger' -> 'lion-tiger'."""
    if chapter[:2].isdigit() and "-" in chapter:
        chapter = chapter.split("-", 1)[1]
    return chapter.replace("_", "-")


def module_name(chapter: str) -> str:
    """The per-chapter module name: '04-lion-tiger' -> 'lion_tiger' (labkit/exercises/lion_tiger.py, ...)."""
    return slug(chapter).replace("-", "_")


@dataclass(frozen=True)
class Part:
    number: int
    title: str


@dataclass(frozen=True)
class Chapter:
    id: str
    title: str
    part: int
    sources: tuple[str, ...]
    modules: tuple[str, ...]
    solution: str
    notebook: str
    tests: tuple[str, ...]
    device: str
    minutes: int
    status: str

    @property
    def number(self) -> int:
        return int(self.id[:2])

    @property
    def slug(self) -> str:
        return slug(self.id)


@dataclass(frozen=True)
class Book:
    title: str
    parts: tuple[Part, ...]
    chapters: tuple[Chapter, ...]
    root: Path

    def chapter(self, ident: str) -> Chapter:
        """A chapter by id ('01-roofline'), slug ('roofline') or number ('1', '01')."""
        for c in self.chapters:
            if ident in (c.id, c.slug) or (ident.isdigit() and int(ident) == c.number):
                return c
        raise UnknownChapter(f"no chapter {ident!r}; chapters are {', '.join(c.id for c in self.chapters)}")

    def part_of(self, chapter: Chapter) -> Part:
        return next(p for p in self.parts if p.number == chapter.part)

    def active(self) -> list[Chapter]:
        """Chapters that exist as notebooks (draft or complete)."""
        return [c for c in self.chapters if c.status != "planned"]


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _chapter(raw: dict, index: int, parts: dict[int, Part], root: Path, where: str,
             require_notebooks: bool) -> Chapter:
    cid = raw.get("id")
    here = f"{where}: chapter {cid}" if isinstance(cid, str) else f"{where}: chapter #{index + 1}"

    def fail(msg: str):
        raise BookError(f"{here}: {msg}")

    for key, typ in _CHAPTER_FIELDS.items():
        if key not in raw:
            fail(f"missing field '{key}'")
        value = raw[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            fail(f"{key} must be a {typ.__name__}, got {type(value).__name__} {value!r}")
    unknown = set(raw) - set(_CHAPTER_FIELDS)
    if unknown:
        fail(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_CHAPTER_FIELDS)}")
    if not _ID.match(cid):
        fail(f"id must look like 'NN-slug' (lower-case, dashes), got {cid!r}")
    if raw["part"] not in parts:
        fail(f"part {raw['part']} is not one of the parts {sorted(parts)}")
    if raw["status"] not in STATUSES:
        fail(f"status must be one of {STATUSES}, got {raw['status']!r}")
    if raw["device"] not in DEVICES:
        fail(f"device must be one of {DEVICES}, got {raw['device']!r}")
    if raw["minutes"] <= 0:
        fail(f"minutes must be positive, got {raw['minutes']}")
    for key in ("sources", "modules", "tests"):
        if not all(isinstance(x, str) and x for x in raw[key]):
            fail(f"{key} must be a list of non-empty strings, got {raw[key]!r}")
    if not raw["sources"]:
        fail("sources must name at least one source article")
    if not raw["modules"]:
        fail("modules must name at least one labkit module")
    for m in raw["modules"]:
        if not _MODULE.match(m):
            fail(f"modules: {m!r} is not a labkit module path like 'labkit.perf.roofline'")
    for key, folder in (("solution", "solutions"), ("notebook", "notebooks")):
        expected = f"{folder}/{cid}.ipynb"
        if raw[key] != expected:
            fail(f"{key} must be '{expected}', got '{raw[key]}'")
    if raw["status"] != "planned":
        if not raw["tests"]:
            fail(f"tests must name at least one test file for a {raw['status']} chapter")
        for key in ("solution", "notebook") if require_notebooks else ("solution",):
            if not (root / raw[key]).exists():
                fail(f"{key} '{raw[key]}' does not exist")
        for t in raw["tests"]:
            if not (root / t).exists():
                fail(f"tests: '{t}' does not exist")
        for m in raw["modules"]:
            if _module_file(root, m) is None:
                fail(f"modules: '{m}' has no file under {root.name}/")
    return Chapter(
        id=cid, title=raw["title"], part=raw["part"], sources=tuple(raw["sources"]),
        modules=tuple(raw["modules"]), solution=raw["solution"], notebook=raw["notebook"],
        tests=tuple(raw["tests"]), device=raw["device"], minutes=raw["minutes"], status=raw["status"],
    )


def parse(text: str, root: Path, where: str = "book.toml", *, require_notebooks: bool = True) -> Book:
    """Validate a manifest's text against the files under `root`.

    require_notebooks=False lets the student build run before it has written notebooks/.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BookError(f"{where}: not valid TOML: {e}") from None
    title = data.get("book", {}).get("title")
    if not isinstance(title, str) or not title:
        raise BookError(f"{where}: [book] needs a title")
    parts: dict[int, Part] = {}
    for i, p in enumerate(data.get("parts", [])):
        number, ptitle = p.get("number"), p.get("title")
        if not isinstance(number, int) or isinstance(number, bool) or not isinstance(ptitle, str):
            raise BookError(f"{where}: part #{i + 1}: needs an int 'number' and a str 'title', got {p!r}")
        if number in parts:
            raise BookError(f"{where}: part {number}: listed twice")
        parts[number] = Part(number, ptitle)
    if not parts:
        raise BookError(f"{where}: no [[parts]]")
    chapters = [_chapter(raw, i, parts, root, where, require_notebooks) for i, raw in enumerate(data.get("chapters", []))]
    if not chapters:
        raise BookError(f"{where}: no [[chapters]]")
    seen: set[str] = set()
    for i, c in enumerate(chapters, 1):
        if c.id in seen:
            raise BookError(f"{where}: chapter {c.id}: id listed twice")
        seen.add(c.id)
        if c.number != i:
            raise BookError(f"{where}: chapter {c.id}: expected number {i:02d} at position {i} (chapters in order)")
    parts_in_order = [c.part for c in chapters]
    if parts_in_order != sorted(parts_in_order):
        raise BookError(f"{where}: chapters must be grouped by part in order, got parts {parts_in_order}")
    empty = sorted(set(parts) - set(parts_in_order))
    if empty:
        raise BookError(f"{where}: part(s) {empty} have no chapters")
    return Book(title, tuple(parts[n] for n in sorted(parts)), tuple(chapters), root)


def load(path: Path | str | None = None, *, require_notebooks: bool = True) -> Book:
    """Load book.toml (default: the repository's) and validate it."""
    path = Path(path) if path is not None else runtime.repo_root() / "book.toml"
    if not path.exists():
        raise BookError(f"{path}: not found")
    return parse(path.read_text(encoding="utf-8"), path.parent, path.name, require_notebooks=require_notebooks)
