"""README's "How it works" tree names every package and every module of the request path.

The tree is how a newcomer finds each job by folder name; a module added or
moved without updating it fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kvengine"


def _tree() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it works") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def _named(tree: str) -> set[str]:
    """The file or folder name at the start of each line of the tree."""
    firsts = (re.match(r"\s*(\S+)", line) for line in tree.splitlines())
    return {m.group(1) for m in firsts if m and m.group(1).endswith((".py", "/"))}


def test_every_top_level_module_and_package_is_in_the_tree() -> None:
    named = _named(_tree())
    for path in sorted(PACKAGE.iterdir()):
        if path.name.startswith("__") or path.name == "__pycache__":
            continue
        name = path.name + "/" if path.is_dir() else path.name
        if path.is_dir() or path.suffix == ".py":
            assert name in named, f"README's tree does not name kvengine/{name}"


def test_every_cache_and_engine_module_is_in_the_tree() -> None:
    named = _named(_tree())
    for folder in ("cache", "engine"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            if path.name != "__init__.py":
                assert path.name in named, f"README's tree does not name kvengine/{folder}/{path.name}"


def test_the_tree_names_nothing_that_does_not_exist() -> None:
    files = {p.name for p in PACKAGE.rglob("*.py")} | {p.name + "/" for p in PACKAGE.rglob("*") if p.is_dir()}
    for name in _named(_tree()) - {"kvengine/"}:
        assert name in files, f"README's tree names {name}, which is not in the package"
