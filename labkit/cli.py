"""The `labkit` command.

    labkit list [--markdown]     parts, chapters, status and device (--markdown: the README table)
    labkit check                 book.toml is valid and notebooks/ is up to date
    labkit student [--check]     build notebooks/ from solutions/ (or only check it)
    labkit validate [CHAPTER...] [--solutions-only]
                                 run the chapters' notebooks under nbval (all non-planned by default)
    labkit bench CHAPTER|--all [--quick] [--no-save]
                                 run a chapter's benchmarks and record them under data/bench/
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from labkit import book as book_mod
from labkit import bench, student


def markdown_table(b: book_mod.Book) -> str:
    """The README's chapter table."""
    rows = ["| id | title | part | status | device |", "|---|---|---|---|---|"]
    for c in b.chapters:
        rows.append(f"| {c.id} | {c.title} | {c.part}. {b.part_of(c).title} | {c.status} | {c.device} |")
    return "\n".join(rows)


def cmd_list(args) -> int:
    b = book_mod.load()
    if args.markdown:
        print(markdown_table(b))
        return 0
    print(f"{b.title}: {len(b.chapters)} chapters in {len(b.parts)} parts\n")
    for part in b.parts:
        print(f"Part {part.number}. {part.title}")
        for c in b.chapters:
            if c.part == part.number:
                print(f"  {c.id:<22} {c.title:<58} {c.status:<9} {c.device:<4} {c.minutes:>3} min")
    counts = {s: sum(c.status == s for c in b.chapters) for s in book_mod.STATUSES}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def cmd_student(args) -> int:
    if args.check:
        problems = student.stale()
        for p in problems:
            print(f"notebooks/{p}")
        if problems:
            print("notebooks/ is stale: run `labkit student` and commit the result")
            return 1
        print("notebooks/ matches the student build of solutions/")
        return 0
    for path in student.write():
        print(f"wrote {path}")
    return 0


def cmd_check(args) -> int:
    b = book_mod.load()
    print(f"book.toml: {len(b.chapters)} chapters, {len(b.active())} with notebooks")
    return cmd_student(argparse.Namespace(check=True))


def cmd_validate(args) -> int:
    b = book_mod.load()
    chapters = [b.chapter(c) for c in args.chapters] if args.chapters else b.active()
    planned = [c.id for c in chapters if c.status == "planned"]
    if planned:
        print(f"planned chapters have no notebooks yet: {', '.join(planned)}")
        return 2
    kinds = ("solution",) if args.solutions_only else ("solution", "notebook")
    paths = [str(b.root / getattr(c, kind)) for c in chapters for kind in kinds]
    if not args.chapters and not args.solutions_only:
        paths.append(str(b.root / "notebooks" / student.START))
    cmd = [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q", *paths]
    print(" ".join(cmd))
    return subprocess.call(cmd, cwd=b.root)


def cmd_bench(args) -> int:
    b = book_mod.load()
    if args.all == (args.chapter is not None):
        print("labkit bench: name one CHAPTER or pass --all", file=sys.stderr)
        return 2
    chapters = [c for c in b.active() if bench.has_benchmarks(c.id)] if args.all else [b.chapter(args.chapter)]
    for chapter in chapters:
        results = bench.run_chapter(chapter.id, quick=args.quick, save=not args.no_save)
        print(bench.summary(chapter.id, {"meta": bench.environment(), "results": results}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit", description="LLM Systems Lab course tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="parts, chapters, status, device")
    p.add_argument("--markdown", action="store_true", help="print the README's chapter table")
    p.set_defaults(fn=cmd_list)
    sub.add_parser("check", help="validate book.toml and notebooks/").set_defaults(fn=cmd_check)
    p = sub.add_parser("student", help="build notebooks/ from solutions/")
    p.add_argument("--check", action="store_true", help="only check that notebooks/ is up to date")
    p.set_defaults(fn=cmd_student)
    p = sub.add_parser("validate", help="run chapter notebooks under nbval")
    p.add_argument("chapters", nargs="*", help="chapter ids, slugs or numbers (default: all with notebooks)")
    p.add_argument("--solutions-only", action="store_true", help="skip the student editions (e.g. on a GPU runner)")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("bench", help="run and record a chapter's benchmarks")
    p.add_argument("chapter", nargs="?", help="chapter id, slug or number")
    p.add_argument("--all", action="store_true", help="every chapter with notebooks and benchmarks")
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--no-save", action="store_true", help="print only, do not write data/bench/")
    p.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (book_mod.BookError, student.StudentBuildError) as e:
        print(f"labkit: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
