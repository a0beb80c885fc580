"""mkdocs hook: the command-line reference is generated from the argparse parsers themselves.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, every sub-command's ``--help`` text, so the
reference cannot drift from the flags (which are in turn generated from the settings' declarations).
"""

from __future__ import annotations

import argparse

PLACEHOLDER = "<!-- cli-reference -->"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    import os

    os.environ["COLUMNS"] = "110"  # argparse wraps at the terminal width: the same width on every machine
    return parser.format_help().rstrip()


def cli_reference() -> str:
    from toolkit.cli.main import build_parser

    parser = build_parser()
    parts = ["## toolkit", "", "```text", _help(parser), "```"]
    for name, sub in _subparsers(parser).items():
        parts += ["", f"## toolkit {name}", "", "```text", _help(sub), "```"]
        for inner, leaf in _subparsers(sub).items():
            parts += ["", f"### toolkit {name} {inner}", "", "```text", _help(leaf), "```"]
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER in markdown:
        return markdown.replace(PLACEHOLDER, cli_reference())
    return markdown
