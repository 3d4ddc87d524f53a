"""pyproject.toml: a wheel (``pip install .``, not ``-e``) holds every subpackage of the source tree.

setuptools installs only the packages ``[tool.setuptools] packages`` lists; with ``package-dir`` mapping each
top-level folder, a new subfolder is not found by itself (``sampling/solvers`` was missing from wheels while
editable installs, which map whole folders, worked)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert "autotune.sampling.solvers" in found  # the walk really descends
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but not in the tree: {sorted(listed - found)}"
