"""``.. command-help::``: the ``--help`` text of ``skmerge`` and of each subcommand.

The help is written for a terminal (aligned columns, not reStructuredText), so each text
goes into a literal block exactly as ``skmerge COMMAND --help`` prints it. Subcommands
are read from :func:`skmerge.cli.build_parser`, so a new one appears without an edit here.
"""

import argparse
import os
from contextlib import contextmanager

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

HELP_WIDTH = "100"


@contextmanager
def _terminal_width(columns):
    """argparse wraps help to $COLUMNS; the page should not depend on who builds it."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = columns
    try:
        yield
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def _commands(parser):
    """(name, subparser) of every subcommand, in the order ``--help`` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _literal(title, text, underline):
    lines = [title, underline * len(title), "", "::", ""]
    lines += ["    " + line if line.strip() else "" for line in text.splitlines()]
    return lines + [""]


class CommandHelp(SphinxDirective):
    has_content = False

    def run(self):
        from skmerge.cli import build_parser

        with _terminal_width(HELP_WIDTH):
            parser = build_parser()
            lines = _literal("skmerge", parser.format_help(), "-")
            for name, command in _commands(parser):
                lines += _literal(f"skmerge {name}", command.format_help(), "-")
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source="skmerge --help"), container)
        return container.children


def setup(app):
    app.add_directive("command-help", CommandHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
