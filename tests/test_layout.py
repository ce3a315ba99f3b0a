"""The package map holds: every module imports on its own, imports point one way
(app -> serving -> engine -> kernels) without cycles, and the engine loads without Ray,
FastAPI or Triton."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers", "kernels")
# the Serve application and its arguments wire every package together
COMPOSITION_ROOT = ("app.serve_app", "app.serve_args")
# what each layer may import from the project
ALLOWED = {
    "workers": (),
    "kernels": ("kernels",),
    "workers.engine": ("workers.engine", "kernels"),
    "workers.replica": ("workers.replica", "workers.engine", "workers.tracker"),
    "workers.router": ("workers.router", "workers.engine", "workers.tracker"),
    "workers.tracker": ("workers.tracker",),
    "workers.store": ("workers.store",),
    "app": ("app", "workers.engine", "workers.store"),
}


def modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def project_imports(module: str) -> set[str]:
    """Project modules `module` imports anywhere in its body (lazy imports count)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def loaded_after(imports: list[str]) -> set[str]:
    """Top-level packages loaded by importing `imports` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {imports!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_every_module_imports_in_a_fresh_interpreter():
    loaded_after(modules())


def test_engine_core_loads_without_ray_fastapi_or_triton():
    engine = [m for m in modules() if m.startswith("workers.engine")
              and m != "workers.engine.triton_backend"]
    assert not loaded_after(engine) & {"ray", "fastapi", "starlette", "triton"}


def test_http_api_loads_without_ray():
    api = [m for m in modules() if m.startswith("app") and m not in COMPOSITION_ROOT]
    assert "ray" not in loaded_after(api)


def test_imports_point_one_way():
    for module in modules():
        if module in COMPOSITION_ROOT:
            continue
        layer = max((p for p in ALLOWED if module == p or module.startswith(p + ".")), key=len)
        for target in project_imports(module):
            assert target.startswith(ALLOWED[layer]), f"{module} imports {target}"


def test_no_import_cycles():
    names = set(modules())
    graph = {m: {t for t in project_imports(m) if t in names} for m in names}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "cycle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(names):
        if module not in state:
            visit(module, [module])
