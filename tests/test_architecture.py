"""The layering rule, read from the source: who may import whom, no cycles, no private reach.

Layers (docs/architecture.md), bottom to top:

- core: ``remap_tf/`` (the model and the shared contract) imports nothing else of the project;
- ``remap_tf.training`` (``training/``), ``remap_tf.export`` (``export/``) and
  ``remap_tf.serving`` (``serving/``) import only the core and themselves, never each other;
- ``remap_cli`` (the ``remap`` command and the demo) may import everything.

Every ``import`` statement counts, also those inside functions: moving an import into a
function hides a dependency from the reader, not from this test. ``bench/`` and the library
may not reach into another module's private names (``_name``). The installed distribution
adds only ``remap_tf`` and ``remap_cli`` as top-level names.
"""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Folder in the repository -> the package it installs as (setup.py's package_dir).
FOLDERS = {
    "remap_tf": "remap_tf",
    "training": "remap_tf.training",
    "export": "remap_tf.export",
    "serving": "remap_tf.serving",
    "remap_cli": "remap_cli",
}
ALLOWED = {
    "core": {"core"},
    "training": {"core", "training"},
    "export": {"core", "export"},
    "serving": {"core", "serving"},
    "cli": {"core", "training", "export", "serving", "cli"},
}
# Names that exist as folders in the repository but are never installed.
NOT_INSTALLED = {"training", "export", "serving", "bench", "tests"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "remap_cli":
        return "cli"
    if parts[0] != "remap_tf":
        return None
    if len(parts) > 1 and parts[1] in ("training", "export", "serving"):
        return parts[1]
    return "core"


def source_modules(folders=FOLDERS) -> dict[str, Path]:
    """Dotted module name -> file, for every project module."""
    modules = {}
    for folder, package in folders.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("").parts
            if relative[-1] == "__init__":
                relative = relative[:-1]
            modules[".".join((package, *relative))] = path
    return modules


def imports_of(module: str, path: Path, known: set[str]):
    """``(line, imported module, names imported from it)`` for every import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in known]
            if submodules:
                for target in submodules:
                    yield node.lineno, target, ()
            else:
                yield node.lineno, base, names


def project_target(name: str, known: set[str]) -> str | None:
    """The project module ``name`` refers to (itself or its closest known parent)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def find_violations(modules: dict[str, Path]):
    known = set(modules)
    layer_errors, private_errors, edges = [], [], {m: set() for m in modules}
    for module, path in modules.items():
        where = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        for line, name, names in imports_of(module, path, known):
            if name.split(".")[0] in NOT_INSTALLED:
                layer_errors.append(f"{where}:{line} imports {name!r}, which is not installed")
                continue
            target = project_target(name, known)
            if target is None:
                continue
            if target != module:
                edges[module].add(target)
            if layer_of(target) not in ALLOWED[layer_of(module)]:
                layer_errors.append(
                    f"{where}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)})"
                )
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                private_errors.append(f"{where}:{line} imports private {private} from {target}")
    return layer_errors, private_errors, edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_layers_import_only_downwards():
    layer_errors, _, _ = find_violations(source_modules())
    assert not layer_errors, "\n".join(layer_errors)


def test_no_import_cycles():
    _, _, edges = find_violations(source_modules())
    assert not cycles(edges), cycles(edges)


def test_no_private_names_across_modules():
    modules = source_modules()
    _, private_errors, _ = find_violations(modules)
    bench = source_modules({"bench": "bench"})
    known = set(modules) | set(bench)
    for module, path in bench.items():
        for line, name, names in imports_of(module, path, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and name.split(".")[0] in ("remap_tf", "remap_cli"):
                private_errors.append(f"{path.relative_to(ROOT)}:{line} imports {private}")
            if name.split(".")[0] == "tests":
                private_errors.append(f"{path.relative_to(ROOT)}:{line} imports {name} (tests)")
    assert not private_errors, "\n".join(private_errors)


def test_the_checker_catches_a_planted_upward_import(tmp_path):
    """The rule bites: a core module importing serving, and a serving/training pair."""
    planted = {
        "remap_tf.contract": _plant(tmp_path, "contract.py", "from remap_tf.serving import index"),
        "remap_tf.serving.index": _plant(tmp_path, "index.py", "import remap_tf.training.fit"),
        "remap_tf.training.fit": _plant(tmp_path, "fit.py", "from remap_tf.serving import index"),
        "remap_tf.serving.x": _plant(tmp_path, "x.py", "from remap_tf.contract import _hidden"),
        "remap_tf.serving.y": _plant(tmp_path, "y.py", "import training.fit"),
    }
    layer_errors, private_errors, edges = find_violations(planted)
    assert len(layer_errors) == 4, layer_errors  # core->serving, serving<->training, training
    assert any("not installed" in e for e in layer_errors)
    assert len(private_errors) == 1 and "_hidden" in private_errors[0]
    assert cycles(edges) == [["remap_tf.serving.index", "remap_tf.training.fit"]]


def _plant(folder: Path, name: str, line: str) -> Path:
    path = folder / "remap_tf" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"def f():\n    {line}\n", encoding="utf-8")
    return path


def test_lazy_api_names_point_into_the_core():
    """``remap_tf``'s lazily loaded names come from core modules, and all of them resolve."""
    import remap_tf

    for name, module in remap_tf._API.items():
        assert layer_of(module) == "core", (name, module)
    for module in remap_tf.SERIALIZABLE_MODULES:
        assert layer_of(module) == "core", module
    assert sorted(remap_tf.__all__) == sorted([*remap_tf._API, "register_serializables"])
    for name in remap_tf.__all__:
        assert getattr(remap_tf, name) is not None


def test_light_modules_and_the_cli_parser_do_not_import_tensorflow():
    """``import remap_tf`` and the contract are cheap; ``remap --help`` builds every parser
    without TensorFlow, Keras or ScaNN."""
    code = (
        "import sys, remap_tf, remap_tf.contract, remap_tf.errors, remap_tf.io, "
        "remap_tf.specs, remap_tf.pairs, remap_tf.evaluation, remap_tf.datasets, remap_tf.outputs, "
        "remap_tf.training.config\n"
        "from remap_cli.main import build_parser\n"
        "build_parser()\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'tensorflow', 'keras', 'scann', 'grpc', 'PIL'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip() == "[]", out


def test_keras_objects_register_when_keras_is_imported_after_remap_tf():
    code = (
        "import remap_tf, keras\n"
        "names = ['remap_tf>TripletLoss', 'remap_tf>RegionWeighting', 'remap_tf>Whitening']\n"
        "print(all(keras.saving.get_registered_object(n) is not None for n in names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.strip().splitlines()[-1] == "True", out


def test_every_project_folder_is_an_installed_package():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("__init__.py"):
            relative = path.parent.relative_to(ROOT / folder).parts
            dotted = ".".join((package, *relative))
            assert f'"{dotted}"' in setup, f"{dotted} is missing from setup.py's packages"
            importlib.import_module(dotted)


def test_the_wheel_installs_only_project_names(tmp_path):
    """Builds the wheel and reads its top-level names and its console script."""
    had_build = (ROOT / "build").exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    if not had_build:  # setuptools builds in ./build
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    (wheel,) = tmp_path.glob("remap_tf-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"remap_tf", "remap_cli"}, top
    assert "remap_tf/training/fit.py" in names and "remap_tf/serving/index.py" in names
    assert "remap_tf/export/saved_model.py" in names
    for page in ("index.html", "app.js", "style.css"):  # `remap serve`'s page, package data
        assert f"remap_tf/serving/service/static/{page}" in names
    assert "remap = remap_cli.main:main" in scripts
