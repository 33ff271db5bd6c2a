"""README.md states the two set-up commands and a chapter table that agrees with book.toml."""

import re

from labkit import book


def test_readme_has_the_two_commands(root):
    text = (root / "README.md").read_text(encoding="utf-8")
    assert "make lab" in text and "make test" in text
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci, ".ci/run must run the README's test command"


def test_readme_chapter_table_matches_book(root):
    text = (root / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (\d\d-[a-z0-9-]+) \|.*$", text, re.M)}
    b = book.load(root / "book.toml")
    assert sorted(rows) == [c.id for c in b.chapters], "README's chapter table lists other chapters than book.toml"
    for c in b.chapters:
        cells = [x.strip() for x in rows[c.id].strip("|").split("|")]
        assert cells[1] == c.title, f"README: {c.id}: title {cells[1]!r} != book.toml {c.title!r}"
        assert cells[3] == c.status, f"README: {c.id}: status {cells[3]!r} != book.toml {c.status!r}"
        assert cells[4] == c.device, f"README: {c.id}: device {cells[4]!r} != book.toml {c.device!r}"


def test_readme_library_example_runs(root, capsys):
    text = (root / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no ```python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "roofline.attainable:" in out and "cases passed" in out
