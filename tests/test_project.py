"""The project's shape: the layers import one way, no circles, small modules, a short README, docs that build,
and no words anywhere about how the project was made."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: it is in the dev extras (pip install -e '.[dev]')")
    return found


def test_imports_follow_the_layer_contract():
    done = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a module graph: its strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return circles


def test_the_circle_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_another_in_a_circle():
    import grimp

    graph = grimp.build_graph("toolkit")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert strongly_connected(edges) == []


def test_modules_are_small_and_the_top_level_is_the_packages():
    top = sorted(p.name for p in (REPO / "toolkit").glob("*.py"))
    assert len(top) <= 8, top
    long = {str(p.relative_to(REPO)): n for p in (REPO / "toolkit").rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert long == {}
    assert len((REPO / "toolkit" / "train" / "finetune.py").read_text().splitlines()) <= 300
    for package in ("core", "config", "backbones", "data", "predict", "train", "deploy", "api", "cli"):
        init = REPO / "toolkit" / package / "__init__.py"
        assert init.read_text().lstrip().startswith('"""'), f"{init} says what the package holds"


def test_readme_is_short_and_every_benchmark_page_is_written_by_its_script():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import publish
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    pages = sorted((REPO / "docs" / "benchmarks").glob("*.md"))
    assert len(pages) >= 10
    for page in pages:
        if page.name == "index.md":
            continue
        text = page.read_text(encoding="utf-8")
        assert publish.MARKER in text, page
        generated = text.split(publish.MARKER, 1)[1]
        assert re.search(r"`python benchmarks/\w+\.py[^`]*`", generated), f"{page}: no command above its table"
        script = re.search(r"`python (benchmarks/\w+\.py)", generated).group(1)
        assert (REPO / script).is_file(), f"{page} names {script}, which does not exist"


def test_a_benchmark_page_is_rewritten_below_its_marker_only(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import publish
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    monkeypatch.setattr(publish, "DOCS", tmp_path)
    (tmp_path / "x.md").write_text(f"# X\n\nhow to read it\n\n{publish.MARKER}\n\nold table\n")
    publish.write_page("x", "some line\n| a | b |\n|---|---|\n| 1 | 2 |\n", ["benchmarks/x.py", "--seeds", "3"])
    text = (tmp_path / "x.md").read_text()
    assert text.startswith("# X\n\nhow to read it\n\n" + publish.MARKER)
    assert "old table" not in text and "`python benchmarks/x.py --seeds 3`" in text
    assert "some line\n\n| a | b |\n|---|---|\n| 1 | 2 |\n" in text


def test_the_docs_site_builds_strictly(tmp_path):
    done = subprocess.run([_tool("mkdocs"), "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for flag in ("--head-epochs", "--augment.pca-sigma", "--tta", "--unknown", "--backbones"):
        assert flag in cli, f"the generated CLI reference lacks {flag}"
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("toolkit.api.training.finetune", "toolkit.api.run.Run.predict", "toolkit.api.audit.audit"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"


# Built from parts so that this file does not match itself.
MAKING = re.compile("|".join([r"\bsess" + r"ions? \d", r"\bscr" + r"atch (run|script)", r"\bissue" + r" #?\d",
                              r"\bwork" + r" period", r"\bthe iss" + r"ue asks", r"\bnot ship" + r"ped yet"]),
                    re.IGNORECASE)


def test_no_file_speaks_of_how_the_project_was_made():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = []
    for name in tracked:
        path = REPO / name
        if path.is_symlink() or not path.is_file() or path.suffix not in {".py", ".md", ".toml", ".cfg", ".txt", ".yml", ""}:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if MAKING.search(line):
                found.append(f"{name}:{n}: {line.strip()[:100]}")
    assert found == []
