"""The documentation stays complete: docstrings name every parameter, the keys table lists
every public function, and every page and API target the site refers to exists.

(The site itself is built by CI: ``pip install -e '.[docs]' && mkdocs build --strict``.)
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import dgdcell
from dgdcell import datasets, latent, pl, tl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Parameters a public docstring may leave unnamed, by function (none at present). Remove an
# entry once the docstring documents it; the test fails for any other undocumented parameter.
KNOWN_GAPS: dict[str, set[str]] = {}


def _dgd_methods():
    for name, member in inspect.getmembers(dgdcell.DGD):
        if not name.startswith("_") and callable(member):
            yield f"DGD.{name}", member


def _public_callables():
    yield "DGD", dgdcell.DGD
    yield from _dgd_methods()
    for mod in (pl, tl, datasets):
        names = getattr(mod, "__all__", None) or [
            n for n, f in inspect.getmembers(mod, inspect.isfunction) if f.__module__ == mod.__name__
        ]
        for name in names:
            if not name.startswith("_"):
                yield f"{mod.__name__.removeprefix('dgdcell.')}.{name}", getattr(mod, name)
    for name in latent.__all__:
        obj = getattr(latent, name)
        if inspect.isclass(obj):
            yield f"latent.{name}", obj
            for meth, fn in vars(obj).items():
                if not meth.startswith("_") and callable(fn):
                    yield f"latent.{name}.{meth}", getattr(obj, meth)


PUBLIC = dict(_public_callables())


def _undocumented(name: str, obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return []
    missing = []
    for p in params.values():
        if p.name in ("self", "cls") or p.kind in (p.VAR_POSITIONAL,):
            continue
        label = p.name if p.kind is not p.VAR_KEYWORD else f"**{p.name}"
        if not re.search(rf"(?<![\w]){re.escape(label)}(?![\w])", doc):
            missing.append(p.name if p.kind is not p.VAR_KEYWORD else label)
    return missing


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_callable_documents_its_parameters(name):
    obj = PUBLIC[name]
    assert (inspect.getdoc(obj) or "").strip(), f"{name} has no docstring"
    missing = set(_undocumented(name, obj)) - KNOWN_GAPS.get(name, set())
    assert not missing, f"{name}: the docstring does not mention {sorted(missing)}"


def test_known_gaps_are_still_gaps():
    """An entry of KNOWN_GAPS that has been documented must be removed from it."""
    fixed = {name: sorted(gaps - set(_undocumented(name, PUBLIC[name]))) for name, gaps in KNOWN_GAPS.items()}
    fixed = {k: v for k, v in fixed.items() if v}
    assert not fixed, f"now documented, remove from KNOWN_GAPS in tests/test_docs.py: {fixed}"


def test_keys_table_lists_every_public_function():
    text = (DOCS / "keys.md").read_text()
    wanted = [name for name, _ in _dgd_methods()]
    wanted += [f"dgdcell.pl.{n}" for n in pl.__all__] + ["dgdcell.tl.dgd"]
    wanted += [f"{n}()" for n in datasets.__all__]
    missing = [w for w in wanted if w not in text]
    assert not missing, f"docs/keys.md does not mention {missing}"


def _nav_paths(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _nav_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _nav_paths(v)


def test_every_page_in_the_nav_exists():
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # mkdocs.yml may carry !!python tags; ignore them
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    paths = list(_nav_paths(config["nav"]))
    assert paths
    for rel in paths:
        where = ROOT / rel if rel.startswith("tutorials/") else DOCS / rel
        assert where.is_file(), f"mkdocs.yml nav names {rel}, which does not exist ({where})"


def test_every_api_target_imports():
    targets = re.findall(r"^::: ([\w.]+)", "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md")), re.M)
    assert len(targets) >= 10
    for target in targets:
        module, _, attr = target.rpartition(".")
        try:
            obj = importlib.import_module(target)
        except ModuleNotFoundError:
            obj = getattr(importlib.import_module(module), attr, None)
        assert obj is not None, f"docs/api: ::: {target} does not resolve"
