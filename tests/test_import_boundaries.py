"""The packages' import boundaries (docs/ARCHITECTURE.md, "Layout"), checked on the source
with `ast`, every import statement, at module level or inside a function:

- no module of prefill_worker/ imports decode_worker or router;
- no module of decode_worker/ imports prefill_worker or router;
- no module of router/ imports the engine (routing must not load torch or the model code);
- nothing in engine/ imports ray, grpc, zmq or deploy;
- planes/ (what crosses process boundaries) and worker_base/ (the shared worker skeleton)
  import neither pool nor the router, and planes/ not the engine either;
- planner/ (profile, simulate, plan) imports neither ray nor grpc, and the engine does not
  import it.

Plus one run-time check: importing the router loads no torch.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level names its modules must not import
RULES = {
    "prefill_worker": {"decode_worker", "router"},
    "decode_worker": {"prefill_worker", "router"},
    "router": {"engine", "decode_worker", "prefill_worker", "torch"},
    "engine": {"ray", "grpc", "zmq", "deploy", "router", "decode_worker", "prefill_worker", "worker_base", "planner"},
    "planes": {"engine", "router", "decode_worker", "prefill_worker", "deploy", "worker_base", "ray", "torch"},
    "worker_base": {"router", "decode_worker", "prefill_worker", "deploy"},
    "planner": {"ray", "grpc"},
}


def imported_names(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in the tree; relative imports resolved against
    the module's own dotted name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[:-node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            # `from . import x` at the top: the names themselves are the packages
            out += [(node.lineno, name)] if name else [(node.lineno, a.name) for a in node.names]
    return out


def violations(package: str, forbidden: set[str], root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        module = ".".join(rel.with_suffix("").parts)
        tree = ast.parse(path.read_text(), filename=str(rel))
        for line, name in imported_names(tree, module):
            top = name.split(".")[0]
            if top in forbidden:
                bad.append(f"{rel}:{line} imports {name}")
    return sorted(set(bad))


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_stay_inside_its_boundary(package):
    assert (ROOT / package).is_dir(), package
    assert violations(package, RULES[package]) == []


def test_the_check_catches_a_forbidden_import(tmp_path):
    """A worker that imports the router (at module level or in a function), or the other
    pool, is reported, and a relative import is resolved before it is judged."""
    pkg = tmp_path / "prefill_worker"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ok.py").write_text("import kv_transfer\nfrom planes import messages\n")
    (pkg / "bad.py").write_text("from router import planes\n\n"
                                "def f():\n    import decode_worker.worker as w\n    return w\n")
    (pkg / "rel.py").write_text("from ..router import core\n")
    found = violations("prefill_worker", RULES["prefill_worker"], root=tmp_path)
    assert found == ["prefill_worker/bad.py:1 imports router",
                     "prefill_worker/bad.py:4 imports decode_worker.worker",
                     "prefill_worker/rel.py:1 imports router"]
    eng = tmp_path / "engine"
    eng.mkdir()
    (eng / "cli.py").write_text("from deploy.cluster import serve_forever\nimport zmq.asyncio\n")
    assert violations("engine", RULES["engine"], root=tmp_path) == ["engine/cli.py:1 imports deploy.cluster",
                                                                  "engine/cli.py:2 imports zmq.asyncio"]


def test_routing_loads_no_torch():
    code = ("import sys, router.core, router.server, router.frontend, router.openai_api; "
            "print('torch' in sys.modules, 'engine' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]
