"""The package layout is the architecture: these tests keep it so.

- one package per primitive, none importing another primitive or ``fastinfer.testing``
  (composition happens in ``integrations/``, the CLI and examples);
- no import cycles anywhere in the package;
- every statistics field declares the metric it is exported as, and every standard name it
  declares exists with the same kind;
- no module grows past ~600 lines;
- each shared rule has one definition (quantiles, tolerances, atomic writes, tables, private torch
  APIs): the patterns they replace do not reappear elsewhere.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastinfer
from fastinfer._common.export import export_of
from fastinfer.metrics import STANDARD_METRICS

ROOT = Path(fastinfer.__file__).parent
PRIMITIVES = ("batching", "compiling", "loading", "attention", "pool", "metrics", "profiling")
SHARED = ("errors", "_env", "_optional", "_common", "_torch_compat")
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, *, runtime_only: bool = True) -> Iterator[tuple[str, int]]:
    """``fastinfer.*`` modules imported anywhere in ``path`` (functions included), with lines.

    Imports under ``if TYPE_CHECKING:`` are skipped with ``runtime_only``: they never execute.
    """
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for inner in ast.walk(node):
                    skip.add(id(inner))
    package = _package_of(path)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastinfer"):
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                base = ".".join(parent[: len(parent) - node.level + 1] + ([base] if base else []))
            if not base.startswith("fastinfer"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        return ".".join(parts)
    return ".".join(parts[:-1])


def _room(module: str) -> str | None:
    """The primitive a module belongs to (None for shared code, integrations, CLI, testing)."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    return parts[1] if parts[1] in PRIMITIVES else None


def test_no_import_cycles() -> None:
    graph = {m: {t for t, _ in _imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A module importing a sibling initialises their package first; that edge is implicit in
    # Python and not a cycle: only explicit imports between modules count.
    seen: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        seen[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if seen.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in seen:
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m)
    pretty = [" -> ".join(c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(pretty)


def test_primitives_import_no_other_primitive_nor_testing() -> None:
    bad = []
    for module, path in MODULES.items():
        room = _room(module)
        if room is None:
            continue
        for target, line in _imports(path, runtime_only=False):
            other = _room(target)
            if target == "fastinfer.testing" or (other is not None and other != room):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
            if target == "fastinfer" or target.startswith("fastinfer.integrations"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_shared_code_imports_no_primitive() -> None:
    bad = []
    for module, path in MODULES.items():
        if not any(
            module == f"fastinfer.{s}" or module.startswith(f"fastinfer.{s}.") for s in SHARED
        ):
            continue
        for target, line in _imports(path, runtime_only=False):
            if _room(target) is not None or target in ("fastinfer", "fastinfer.testing"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def _statistics_classes() -> list[type]:
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages(fastinfer.__path__, "fastinfer."):
        if info.name.startswith(("fastinfer.integrations", "fastinfer._cli")):
            continue  # optional dependencies; checked below where installed
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if (
                isinstance(obj, type)
                and dataclasses.is_dataclass(obj)
                and obj.__name__.endswith("Statistics")
                and obj.__module__.startswith("fastinfer")
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


STATISTICS = _statistics_classes()


def test_the_statistics_classes_are_found() -> None:
    names = {c.__name__ for c in STATISTICS}
    assert {
        "BatcherStatistics",
        "CompileStatistics",
        "CacheStatistics",
        "PoolStatistics",
        "WorkerStatistics",
        "RecorderStatistics",
    } <= names


@pytest.mark.parametrize("cls", STATISTICS, ids=lambda c: c.__name__)
def test_every_statistics_field_declares_its_export(cls: type) -> None:
    undeclared = [f.name for f in dataclasses.fields(cls) if export_of(f) is None]
    assert not undeclared, (
        f"{cls.__name__} fields {undeclared} declare no export: give each one gauge(...), "
        "counter(...) or not_exported(reason) from fastinfer._common.export"
    )
    for f in dataclasses.fields(cls):
        exp = export_of(f)
        assert exp is not None
        if exp.standard is not None:
            spec = STANDARD_METRICS.get(exp.standard)
            assert spec is not None, f"{cls.__name__}.{f.name}: no standard metric {exp.standard!r}"
            assert spec.kind == exp.kind, f"{cls.__name__}.{f.name}: {exp.kind} vs {spec.kind}"
            assert {k for k, _ in exp.labels} <= set(spec.labels) | {exp.key_label}
        if exp.unit:
            assert f.name.endswith(f"_{exp.unit}"), f"{cls.__name__}.{f.name} declares {exp.unit}"


def test_replica_statistics_declare_their_export() -> None:
    ray = pytest.importorskip("ray")
    del ray
    from fastinfer.integrations.ray import ReplicaStatistics

    assert all(export_of(f) is not None for f in dataclasses.fields(ReplicaStatistics))


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_no_module_is_over_600_lines(module: str) -> None:
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines; split it by concern (limit {MAX_LINES})"


# pattern -> the one module allowed to contain it, and why
ONE_DEFINITION = {
    r"tempfile\.mkstemp|NamedTemporaryFile\(": ("fastinfer/_common/files.py", "atomic writes"),
    r"\.ljust\(|\.rjust\(": ("fastinfer/_common/tables.py", "text tables"),
    r"def _?(quantile|percentile|median)\b|statistics\.(median|quantiles)": (
        "fastinfer/_common/quantiles.py|fastinfer/_common/timing.py",
        "quantiles",
    ),
    r"TOLERANCES\b|\(atol, rtol\)": ("fastinfer/_common/tolerances.py", "tolerances"),
    r"torch\._[a-zA-Z]|torch\.ops\.|torch\.utils\._|from torch import _|_extra_reducers|\bF\._[a-z]": (
        "fastinfer/_torch_compat/_compiling.py|fastinfer/_torch_compat/_kernels.py|"
        "fastinfer/_torch_compat/_shared_memory.py",
        "private torch APIs",
    ),
}


@pytest.mark.parametrize("pattern", sorted(ONE_DEFINITION), ids=lambda p: ONE_DEFINITION[p][1])
def test_each_rule_has_one_definition(pattern: str) -> None:
    owners, what = ONE_DEFINITION[pattern]
    allowed = set(owners.split("|"))
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        if rel in allowed:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if "``" in code or code.strip().startswith(('"""', "'''")):
                continue  # prose in docstrings may name the private op
            if re.search(pattern, code):
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, f"{what} must go through {owners}:\n" + "\n".join(bad)
