"""tools/check_shape.py (the shape lint of `make lint`) on small packages whose problems are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "check_shape.py"


@pytest.fixture(scope="module")
def shape() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_shape", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_shape"] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def _function(name: str, num_lines: int) -> str:
    """A function of exactly `num_lines` lines, `def` line included."""
    return f"def {name}():\n" + "    x = 1\n" * (num_lines - 2) + "    return x\n"


def test_lengths_at_and_past_the_limits(shape: ModuleType, tmp_path: Path) -> None:
    at_limit = _function("fits", 60) + "\n" * (400 - 60)  # 400 lines, one 60-line function
    too_long = "class C:\n" + "".join("    " + line + "\n" for line in _function("method", 61).splitlines())
    package = _package(tmp_path, {"ok.py": at_limit, "big.py": too_long + "\n" * 340})
    assert shape.check(package) == [
        f"{package / 'big.py'}: 402 lines (limit 400)",
        f"{package / 'big.py'}:2: function method is 61 lines (limit 60)",
    ]


def test_cycles_through_type_checking_and_function_imports(shape: ModuleType, tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
            "b.py": "def f():\n    from . import a\n",
            "c.py": "import pkg.a\n",  # imports into the cycle, is not part of it
        },
    )
    findings = shape.check(package)
    assert findings == [
        f"import cycle: pkg.a -> pkg.b ({package / 'a.py'}:3); pkg.b -> pkg.a ({package / 'b.py'}:2)"
    ]


def test_a_package_importing_its_own_modules_is_no_cycle(shape: ModuleType, tmp_path: Path) -> None:
    package = _package(
        tmp_path,
        {
            "sub/__init__.py": "from pkg.sub.x import X\n",
            "sub/x.py": "from pkg.sub.y import Y\nX = 1\n",
            "sub/y.py": "Y = 2\n",
            "other.py": "from pkg.sub.y import Y\n",
        },
    )
    assert shape.check(package) == []
    # A module outside the package that the package's __init__ imports, and that imports the package
    # back through a submodule, is a cycle: importing pkg.sub.y runs pkg/sub/__init__.py first.
    (package / "sub" / "x.py").write_text("from pkg.other import Z\nX = 1\n")
    (package / "other.py").write_text("from pkg.sub.y import Y\nZ = 3\n")
    (cycle,) = shape.check(package)
    assert cycle.startswith("import cycle: pkg.other -> pkg.sub (") and "pkg.sub.x -> pkg.other" in cycle
