"""The package's import graph: no cycles, and no module imports from a layer above its own.

Read from the source with `ast` (nothing is imported). Every import of an ``sjc_jax`` module
counts, at module level or inside a function (a function-level import still runs, just later;
the code base uses them to keep ``python -m sjc_jax`` fast, not to break cycles). Importing
``a.b.c`` also runs the package ``__init__`` of ``a.b``, so an edge to a module adds edges to its
parent packages (except the root ``sjc_jax``, whose ``__init__`` imports nothing: its
re-exports are resolved on first use, and are checked below to be numerics), but not to the
packages the importing module itself lies in (they are initialised before it runs: a package
``__init__`` re-exporting its submodules is no cycle).

The layers (the same table is in docs/conventions.md), each importing only its own
layer and those below:

1. numerics: the grid, cameras, renderer, estimators, samplers, losses, optimiser, the step,
   the config, diffusion/, and the file primitives they read and write with;
2. models: the model kinds behind ``--model`` (testbed/, learned/ but its trainer) and their
   registry;
3. run engine and outputs: the engine the commands share (``engine``), runs, sweeps and the
   learned model's training, run directories, checkpoints, locks, stop requests, the memory
   check, and what runs write (artifacts, export, report, tensorboard);
4. front ends: the command line and the benchmark.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sjc_jax"

NUMERICS, MODELS, ENGINE, FRONT = 1, 2, 3, 4
LAYERS = {
    NUMERICS: (
        "sjc_jax",
        "sjc_jax.camera",
        "sjc_jax.config",
        "sjc_jax.estimators",
        "sjc_jax.files",
        "sjc_jax.grid",
        "sjc_jax.grid_io",
        "sjc_jax.losses",
        "sjc_jax.mesh",
        "sjc_jax.mesh_metrics",
        "sjc_jax.optim",
        "sjc_jax.prompts",
        "sjc_jax.render",
        "sjc_jax.samplers",
        "sjc_jax.sjc",
        "sjc_jax.sweep",
        "sjc_jax.texture",
        "sjc_jax.diffusion",
        "sjc_jax.diffusion.attention",
        "sjc_jax.diffusion.denoiser",
        "sjc_jax.diffusion.numerics",
        "sjc_jax.diffusion.quiet",
        "sjc_jax.diffusion.schedule",
        "sjc_jax.diffusion.stable_diffusion",
        "sjc_jax.diffusion.tiny",
        "sjc_jax.diffusion.weights",
    ),
    MODELS: (
        "sjc_jax.model_kind",
        "sjc_jax.models",
        "sjc_jax.testbed",
        "sjc_jax.testbed.core",
        "sjc_jax.testbed.empirical",
        "sjc_jax.testbed.scenes",
        "sjc_jax.learned",
        "sjc_jax.learned.data",
        "sjc_jax.learned.model",
        "sjc_jax.learned.sampling",
    ),
    ENGINE: (
        "sjc_jax.artifacts",
        "sjc_jax.checkpoint",
        "sjc_jax.compile_cache",
        "sjc_jax.devices",
        "sjc_jax.engine",
        "sjc_jax.export",
        "sjc_jax.interrupts",
        "sjc_jax.learned.train",
        "sjc_jax.mesh_viewer",
        "sjc_jax.progress",
        "sjc_jax.reexport",
        "sjc_jax.report",
        "sjc_jax.resources",
        "sjc_jax.rundir",
        "sjc_jax.runner",
        "sjc_jax.sweep_run",
        "sjc_jax.tensorboard",
    ),
    FRONT: (
        "sjc_jax.__main__",
        "sjc_jax.bench",
        "sjc_jax.cli",
    ),
}
LAYER_OF = {module: layer for layer, modules in LAYERS.items() for module in modules}


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its source (with their parents)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                found.add(sub if sub in modules else module)
    edges = set()
    for module in found:
        if not module.startswith("sjc_jax."):
            continue
        assert module in modules, f"{name} imports {module}, which is not a module"
        parts = module.split(".")
        edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # A module's own packages run before it does (importing it imports them first): their
    # names are no edge from it.
    parts = name.split(".")
    return edges - {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    modules = set(_modules())
    assert sorted(modules - set(LAYER_OF)) == [], "new modules: add them to LAYERS"
    assert sorted(set(LAYER_OF) - modules) == [], "modules gone: remove them from LAYERS"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_upward_imports():
    upward = sorted(
        f"{name} (layer {LAYER_OF[name]}) imports {dep} (layer {LAYER_OF[dep]})"
        for name, deps in _graph().items()
        for dep in deps
        if LAYER_OF[dep] > LAYER_OF[name]
    )
    assert upward == []


def test_package_reexports_are_numerics():
    import sjc_jax

    assert {LAYER_OF[m] for m in sjc_jax._EXPORTS.values()} == {NUMERICS}


def test_the_checks_see_cycles_and_function_level_imports(tmp_path):
    """The checker itself: a two-module cycle through a function-level import, and a parent
    package's ``__init__`` counted, are both found."""
    pkg = tmp_path / "sjc_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from sjc_jax.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("import sjc_jax.a\n")
    (pkg / "sub" / "b.py").write_text("x = 1\n")
    modules = {}
    for path in sorted(pkg.rglob("*.py")):
        parts = path.relative_to(tmp_path).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["sjc_jax.a"] == {"sjc_jax.sub", "sjc_jax.sub.b"}
    assert _cycles(graph) == [["sjc_jax.a", "sjc_jax.sub"]]
