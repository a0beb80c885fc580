"""Benchmark tables into the docs: what a benchmark script prints is written into its page,
``docs/benchmarks/<page>.md``, below the page's :data:`MARKER`, with the exact command, the date and the machine.
One number, one place: the docs and the README link to these pages instead of copying numbers.

    python benchmarks/cv.py            # prints its tables and rewrites docs/benchmarks/cv.md below the marker
    python benchmarks/cv.py --no-publish

Text above the marker (what the benchmark measures, how to read it) is kept as it is.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import sys
from pathlib import Path
from typing import Callable

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
MARKER = "<!-- Everything below is written by the benchmark script (benchmarks/publish.py); do not edit by hand. -->"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


def as_markdown(text: str) -> str:
    """Printed lines as Markdown: table rows stay together; every other line is a paragraph of its own."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        is_row = line.lstrip().startswith("|")
        if out and not (is_row and out[-1].startswith("|")):
            out.append("")
        out.append(line.strip() if is_row else line)
    return "\n".join(out) + "\n"


def write_page(page: str, printed: str, argv: list[str]) -> Path:
    path = DOCS / f"{page}.md"
    head = path.read_text(encoding="utf-8").split(MARKER)[0].rstrip() if path.is_file() else f"# {page}"
    command = " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *argv[1:]])
    block = (f"{MARKER}\n\n`{command}` on {datetime.date.today().isoformat()} ({machine()}):\n\n"
             f"{as_markdown(printed)}")
    path.write_text(f"{head}\n\n{block}", encoding="utf-8")
    return path


def run(main: Callable[[], None], page: str | Callable[[list[str]], str]) -> None:
    """Run a benchmark's ``main``, printing as usual, then write what it printed into its page (``page``: the
    name, or a function of the command-line arguments giving it). ``--no-publish`` and ``--json`` only print."""
    argv = list(sys.argv)
    publish = "--no-publish" not in argv and "--json" not in argv
    sys.argv = [a for a in argv if a != "--no-publish"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        main()
    if publish:
        name = page(sys.argv[1:]) if callable(page) else page
        print(f"written to {write_page(name, buffer.getvalue(), sys.argv)}")
