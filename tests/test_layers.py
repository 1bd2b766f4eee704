"""The package's layers read as the data flow: no import cycle between its parts, no module imports the
command line, the kernels import nothing from the package. Walked from the source (AST), so an import
inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ("fastdm", "kernels", *rel.parts[1:]) if rel.parts[0] == "kernels" else rel.parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> list[tuple[str, str]]:
    """(importing module, imported fastdm module) for every import in fastdm/ and kernels/."""
    out = []
    for path in [*ROOT.joinpath("fastdm").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]:
        mod, pkg = _module(path), path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module or ""]
            else:
                continue
            out += [(mod, t) for t in targets if t == "fastdm" or t.startswith("fastdm.")]
    return out


def _part(mod: str) -> str:
    """The layer a module belongs to: a subpackage or a top-level module of fastdm."""
    return ".".join(mod.split(".")[:2])


def test_no_cycle_between_the_package_parts():
    graph: dict[str, set[str]] = {}
    for a, b in imports():
        pa, pb = _part(a), _part(b)
        if pa != pb and pb != "fastdm":  # (the package root re-exports the API)
            graph.setdefault(pa, set()).add(pb)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    cycles = sorted(p for p in graph if p in reach(p))
    assert cycles == [], {p: sorted(graph[p]) for p in cycles}


def test_nothing_imports_the_command_line():
    assert [a for a, b in imports() if b == "fastdm.cli" or b.startswith("fastdm.cli.")] == []


def test_kernels_import_nothing_from_the_package():
    assert [(a, b) for a, b in imports() if a.startswith("fastdm.kernels") and not b.startswith("fastdm.kernels")] == []


def test_the_walk_sees_imports_inside_functions():
    """A check that could not fail if the walk missed function-local imports (the request layer imports
    the cascade inside run())."""
    assert ("fastdm.request", "fastdm.cascade") in imports()


def _benchmark_imports() -> dict[str, set[str]]:
    """benchmarks module -> the benchmarks modules it imports (function-local imports too)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.joinpath("benchmarks").glob("*.py"):
        mod = f"benchmarks.{path.stem}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
                graph.setdefault(mod, set()).update(f"benchmarks.{a.name}" for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
                graph.setdefault(mod, set()).add(node.module)
            elif isinstance(node, ast.Import):
                graph.setdefault(mod, set()).update(a.name for a in node.names if a.name.startswith("benchmarks."))
    return graph


def test_benchmarks_share_one_suite_and_import_no_cycle():
    """quality, its cascade rows, loss balance and upscale settings share benchmarks/suite.py; none reaches
    into another's module (quality runs the cascade rows: the one import between two benchmarks)."""
    graph = _benchmark_imports()
    shared = {"benchmarks.common", "benchmarks.suite"}
    between = sorted((a, b) for a, bs in graph.items() for b in bs if b not in shared and a != b)
    assert between == [("benchmarks.quality", "benchmarks.quality_cascade")], between
    for user in ("benchmarks.quality", "benchmarks.quality_cascade", "benchmarks.loss_balance", "benchmarks.upscale_settings"):
        assert "benchmarks.suite" in graph.get(user, set()), user
    assert not graph.get("benchmarks.suite", set()) - {"benchmarks.common"}


def test_tests_run_from_any_working_directory(tmp_path):
    """With the package installed, a test that imports benchmarks/ passes when pytest starts elsewhere
    (tests/ is a package: pytest puts the repository root on the path, not the working directory)."""
    import os
    import subprocess
    import sys

    target = ROOT / "tests" / "test_quality_suite.py"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:benchmark",  # (pytest-benchmark's
                        # storage folder, where that plugin happens to be installed)
                        f"{target}::test_suite_is_fixed_and_each_case_asks_for_a_change"],
                       cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "1 passed" in p.stdout
    assert not any(tmp_path.iterdir())  # and writes nothing where it started


def test_the_editor_never_imports_the_toy_world():
    """The toy world (generator, metrics, suite) is the test bench: only the benchmark harness and presets (which
    render a clip and build the shapes architecture) and the toy world itself import it, never the editor."""
    users = {a for a, b in imports() if b == "fastdm.toyworld" or b.startswith("fastdm.toyworld.")}
    assert users and all(u.startswith(("fastdm.toyworld", "fastdm.bench")) for u in users), sorted(users)
