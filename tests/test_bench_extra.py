"""The bench extra brings every bench command's dependencies: each module under
specserve_ray/bench imports only the core dependencies, the [bench] extra and the
standard library, and nothing from the deployments package."""
from __future__ import annotations

import ast
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pyproject():
    try:
        import tomllib
    except ImportError:            # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dist_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, 1)[0].lower().replace("_", "-")


# Import names that differ from their distribution's name.
IMPORT_TO_DIST = {"yaml": "pyyaml", "google": "protobuf", "ray": "ray", "PIL": "pillow",
                  "sklearn": "scikit-learn"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_bench_extra_covers_every_bench_command_and_no_deployments_import():
    project = _pyproject()["project"]
    allowed = {_dist_name(r) for r in project["dependencies"]}
    allowed |= {_dist_name(r) for r in project["optional-dependencies"]["bench"]}
    own = {"specserve_ray", "specserve_kernels"}
    bench_dir = ROOT / "specserve_ray" / "bench"
    missing = {}
    for path in sorted(bench_dir.glob("*.py")):
        imports = _imports(path)
        assert "deployments" not in imports, f"{path.name} imports the deployments package"
        for name in imports - own - set(sys.stdlib_module_names):
            dist = IMPORT_TO_DIST.get(name, name).lower().replace("_", "-")
            if dist not in allowed:
                missing.setdefault(path.name, []).append(name)
    assert not missing, f"bench modules import packages outside core + [bench]: {missing}"
    # And the specserve_ray modules the bench commands import stay within them too.
    from specserve_ray.bench.__main__ import COMMAND_MODULES
    assert set(COMMAND_MODULES) == {"single", "trace", "load", "deploy"}
    assert {"httpx", "matplotlib", "tqdm", "pyyaml"} <= allowed
