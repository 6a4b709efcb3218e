"""`import routereplay` stays framework-free: integrations are leaf modules imported on demand."""

import subprocess
import sys

# (tqdm is left out: `import torch` itself imports it.)
FRAMEWORKS = ["transformers", "megatron", "trl", "vllm", "sglang", "verl", "matplotlib"]


def test_import_routereplay_imports_no_framework():
    code = (
        "import sys, routereplay, routereplay.core.layout, routereplay.core.io, routereplay.formats, "
        "routereplay.core.routing, routereplay.runtime.session, routereplay.rl.metrics, routereplay.cli\n"
        f"loaded = [m for m in {FRAMEWORKS!r} if m in sys.modules]\n"
        "print(','.join(loaded))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import routereplay pulled in: {out.stdout.strip()}"


def test_public_api():
    import routereplay

    for name in ("RoutingTrace", "save", "load", "attach", "RouterSpec", "route", "errors"):
        assert hasattr(routereplay, name), name


def _import_graph() -> dict[str, set[str]]:
    """Module -> the routereplay modules it imports (anywhere in the file, lazy imports included)."""
    import ast
    import pathlib

    import routereplay

    root = pathlib.Path(routereplay.__file__).parent
    names = {
        "routereplay" + "".join(f".{p}" for p in f.relative_to(root).with_suffix("").parts): f
        for f in root.rglob("*.py")
    }
    names = {k.removesuffix(".__init__"): f for k, f in names.items()}
    graph = {}
    for name, f in names.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("routereplay"):
                # `from pkg import module` depends on that module; `from module import name` on the module
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names]
                targets = subs if len(subs) == len(node.names) else [node.module, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in names and t != name and t != "routereplay"}
        graph[name] = deps
    return graph


def test_the_import_graph_has_no_cycle():
    """Data flows one way: trace -> layout -> session -> adapters; integrations and CLI on top."""
    graph = _import_graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert "routereplay.adapters.hf" not in _closure(graph, "routereplay.runtime.session")
    assert not any(m.startswith("routereplay.adapters.") for m in _closure(graph, "routereplay.runtime.session"))


def _closure(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_only_adapters_integrations_and_the_cli_import_an_adapter():
    """The core never imports an adapter (seam.py): engines are leaves over the core."""
    allowed = ("routereplay.adapters", "routereplay.integrations", "routereplay.cli", "routereplay.cli.check")
    graph = _import_graph()
    offenders = {
        module: sorted(d for d in deps if d.startswith("routereplay.adapters"))
        for module, deps in graph.items()
        if not module.startswith(allowed)
    }
    assert not {m: d for m, d in offenders.items() if d}, offenders


def test_no_package_module_is_loaded_through_importlib():
    """Every import of a routereplay module is an import statement the graph above sees. The
    dynamic loads are attach's (adapters registered as entry points, routereplay.adapters group)
    and _compat's (a deprecated module path loads the module that now holds it)."""
    import ast
    import pathlib

    import routereplay

    root = pathlib.Path(routereplay.__file__).parent
    found = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name not in ("import_module", "__import__"):
                continue
            target = node.args[0] if node.args else None
            literal = target.value if isinstance(target, ast.Constant) else None
            if literal is None or str(literal).startswith("routereplay"):
                found.append(f"{f.relative_to(root)}:{node.lineno} {literal or ast.unparse(target)}")
    assert [s.split(":")[0] for s in found] == ["_compat.py", "runtime/attach.py", "runtime/attach.py"], found


def test_the_folders_name_the_layers():
    """The package root holds the public face only; every module lives in the folder of its layer."""
    import pathlib

    import routereplay

    root = pathlib.Path(routereplay.__file__).parent
    assert sorted(p.name for p in root.glob("*.py")) == ["__init__.py", "_compat.py"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__") == [
        "adapters", "cli", "core", "data", "formats", "integrations", "kernels", "parallel", "rl", "runtime",
    ]


def test_deprecated_module_paths_are_the_moved_modules():
    """Code written against 0.1's flat paths keeps working, warned, on the very same module objects."""
    code = (
        "import warnings, importlib\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import routereplay, routereplay.core.layout as new\n"
        "from routereplay._compat import MOVED\n"
        "import routereplay.errors\n"  # stable: no warning
        "try:\n"
        "    import routereplay.layout\n"
        "except DeprecationWarning as e:\n"
        "    print(e)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "assert all(importlib.import_module(o) is importlib.import_module(n) for o, n in MOVED.items())\n"
        "assert callable(routereplay.attach)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "routereplay.layout moved to routereplay.core.layout; import it from there"


def test_no_test_module_imports_another():
    """What tests share lives in tests/helpers.py and tests/hf_zoo.py. (The GPU runner
    tests/gpu_distributed.py runs test_distributed_hf's cases under torchrun: a runner, not a test.)"""
    import pathlib
    import re as re_

    here = pathlib.Path(__file__).parent
    found = [
        f"{f.name}: {m.group(0).strip()}"
        for f in sorted(here.glob("*.py"))
        if f.name != "gpu_distributed.py"
        for m in re_.finditer(r"^\s*(from test_\w+ import|import test_\w+)", f.read_text(), re_.MULTILINE)
    ]
    assert found == []
