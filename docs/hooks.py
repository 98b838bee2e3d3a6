"""MkDocs hook: publish the rendered tutorial notebooks (``tutorials/*.ipynb``) as pages.

The notebooks live next to their jupytext scripts in ``tutorials/``, outside ``docs/``;
this adds them to the site as ``tutorials/NN_name.ipynb`` before the mkdocs-jupyter
plugin turns them into pages.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]


@event_priority(100)  # before mkdocs-jupyter's on_files
def on_files(files, config):
    for notebook in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb")):
        files.append(File(f"tutorials/{notebook.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


#: a Sphinx cross-reference role left in a docstring, as mkdocstrings renders it (":class:<code>X</code>")
_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|mod|attr|data|obj|exc|const|ref):(<code>)?`?(~?)([\w.]+)`?(</code>)?")


def _role(match: re.Match) -> str:
    name = match.group(3)
    shown = name.rsplit(".", 1)[-1] if match.group(2) else name
    return f"<code>{shown}</code>"


def on_page_content(html, page, config, files):
    """Docstrings use Sphinx roles (``:class:`X```), which the numpy docstring renderer leaves as
    text: show each as the name in code font (``~a.b.C`` as ``C``)."""
    return _ROLE.sub(_role, html)


def _cli_help() -> str:
    """Markdown with the ``--help`` text of ``dgdcell`` and of each subcommand."""
    import os

    from dgdcell.cli import build_parser

    os.environ.setdefault("COLUMNS", "100")
    parser = build_parser()
    parser.prog = "dgdcell"
    sections = [("dgdcell", parser.format_help())]
    for action in parser._subparsers._group_actions:  # the subcommands
        for name, sub in action.choices.items():
            sections.append((f"dgdcell {name}", sub.format_help()))
    return "\n\n".join(f"## `{title}`\n\n```text\n{text.rstrip()}\n```" for title, text in sections)


def on_page_markdown(markdown, page, config, files):
    if "{{ cli_help }}" in markdown:
        markdown = markdown.replace("{{ cli_help }}", _cli_help())
    return markdown
