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


def test_a_checkout_on_sys_path_imports_its_own_parts():
    """With the checkout's root first on ``sys.path`` and no editable install to fill in (a ``pip install .`` next
    to the clone: ``python -m autotune.cli`` and Ray workers started in the clone), every part still imports, and
    from the checkout. Before, the root's ``autotune/`` (the CLI alone) shadowed the install and
    ``autotune.sampling`` was missing."""
    import subprocess
    import sys

    code = "\n".join([
        "import sys",
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "import autotune.sampling.solvers, autotune.search.job, autotune.compile.manifest",
        "print(autotune.__file__); print(autotune.sampling.solvers.__file__)",
    ])
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    first, second = res.stdout.split()
    assert first == str(ROOT / "autotune" / "__init__.py")
    assert second == str(ROOT / "sampling" / "solvers" / "__init__.py")
