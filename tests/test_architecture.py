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

Kinds register instead of being listed: no class body names a subclass of a class defined in
its module, other than the subclass's own body (a base class that names its subclasses must be
edited for every new kind; ``remap_tf.serving.index.registry`` is the table that replaces such
lists).

Each fact once: a format constant (a file name, a format tag, a file signature) is bound in
one module, its owner (``remap_tf.contract`` for what the layers share), and every other
module imports it; neither a second constant nor a bare literal may restate it.
"""

from __future__ import annotations

import ast
import importlib
import re
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


def _namespace(module: str, path: Path, tree: ast.Module, known: set[str]) -> dict:
    """Name -> ``("class", module, name)`` or ``("module", module)`` for a module's own classes
    and everything it imports (at any depth, as for the import rule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            names[node.name] = ("class", module, node.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in known:
                    names[alias.asname] = ("module", alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                dotted = f"{base}.{alias.name}"
                target = ("module", dotted) if dotted in known else ("class", base, alias.name)
                names[alias.asname or alias.name] = target
    return names


def _resolve(target, namespaces: dict, depth: int = 0):
    """Follows re-exports (``from .base import Index`` in a package) to where a class is."""
    if target is None or target[0] != "class" or depth > 8:
        return target
    _, module, name = target
    found = namespaces.get(module, {}).get(name)
    if found is None or found == target:
        return target
    return _resolve(found, namespaces, depth + 1)


def _refers_to(node, names: dict, namespaces: dict):
    """The class an expression (``Name`` or ``module.Name``) refers to, or None."""
    if isinstance(node, ast.Name):
        return _resolve(names.get(node.id), namespaces)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        owner = names.get(node.value.id)
        if owner is not None and owner[0] == "module":
            return _resolve(("class", owner[1], node.attr), namespaces)
    return None


def base_classes_naming_subclasses(modules: dict[str, Path]) -> list[str]:
    """``path:line`` of every place where a class body names a subclass of a class that its
    module defines (a base class listing its implementations), other than that subclass's
    own body. Module-level factory functions (``make_embedder``) are not class code."""
    known = set(modules)
    trees = {m: ast.parse(p.read_text(encoding="utf-8"), str(p)) for m, p in modules.items()}
    namespaces = {m: _namespace(m, modules[m], trees[m], known) for m in modules}
    parents = {}
    for module, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [_refers_to(b, namespaces[module], namespaces) for b in node.bases]
                parents[("class", module, node.name)] = {b for b in bases if b is not None}
    children = {c: {d for d in parents if _ancestor(c, d, parents)} for c in parents}
    errors = []
    for (_, module, name), subclasses in children.items():
        if subclasses:
            errors += _named_subclasses(module, modules[module], trees[module], name, subclasses,
                                        namespaces)  # fmt: skip
    return sorted(set(errors))


def _ancestor(cls, other, parents: dict, depth: int = 0) -> bool:
    """Whether ``cls`` is a (project) ancestor of ``other``."""
    direct = parents.get(other, set())
    if cls in direct:
        return True
    return depth < 16 and any(_ancestor(cls, p, parents, depth + 1) for p in direct)


def _named_subclasses(module, path, tree, name, subclasses, namespaces) -> list[str]:
    """Where class bodies of ``module``, other than the subclasses' own, name a subclass."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    errors, stack = [], [(tree, False)]
    while stack:
        node, in_class = stack.pop()
        if isinstance(node, ast.ClassDef):
            if ("class", module, node.name) in subclasses:
                continue  # a subclass's own body may name itself and its siblings
            in_class = True
        target = _refers_to(node, namespaces[module], namespaces) if in_class else None
        if target in subclasses:
            errors.append(f"{where}:{node.lineno} names {target[2]}, a subclass of {name}")
        stack.extend((child, in_class) for child in ast.iter_child_nodes(node))
    return errors


def test_no_class_names_its_subclasses():
    errors = base_classes_naming_subclasses(source_modules())
    assert not errors, "\n".join(errors)


def test_the_checker_catches_a_base_class_naming_its_subclass(tmp_path):
    """A base class that picks its implementation by name, in its module or across a package
    re-export, is caught; a registry lookup, a subclass naming itself and a module-level
    factory function are not."""
    bad = tmp_path / "remap_tf" / "kinds.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "class Base:\n"
        "    @classmethod\n"
        "    def load(cls, kind):\n"
        "        return {'a': A, 'b': B}[kind]()\n"
        "class A(Base):\n"
        "    def copy(self):\n"
        "        return A()\n"
        "class B(A):\n"
        "    pass\n"
        "def make(kind):\n"
        "    return A() if kind == 'a' else B()\n",
        encoding="utf-8",
    )
    base = tmp_path / "remap_tf" / "pkg" / "base.py"
    base.parent.mkdir()
    (base.parent / "__init__.py").write_text("from remap_tf.pkg.impl import Impl\n")
    base.write_text("import remap_tf.pkg as pkg\nclass Root:\n    x = pkg.Impl\n")
    (base.parent / "impl.py").write_text(
        "from remap_tf.pkg.base import Root\nclass Impl(Root):\n    pass\n"
    )
    good = tmp_path / "remap_tf" / "good.py"
    good.write_text(
        "KINDS = {}\nclass Base:\n    @classmethod\n    def load(cls, kind):\n"
        "        return KINDS[kind]()\nclass A(Base):\n    def copy(self):\n"
        "        return A()\n",
        encoding="utf-8",
    )
    modules = {
        "remap_tf.kinds": bad,
        "remap_tf.pkg": base.parent / "__init__.py",
        "remap_tf.pkg.base": base,
        "remap_tf.pkg.impl": base.parent / "impl.py",
        "remap_tf.good": good,
    }
    errors = base_classes_naming_subclasses(modules)
    assert [e.split(" ", 1)[1] for e in errors] == [
        "names A, a subclass of Base",
        "names B, a subclass of A",
        "names B, a subclass of Base",
        "names Impl, a subclass of Root",
    ], errors
    places = {e.split(" ", 1)[0] for e in errors}
    assert places == {f"{bad}:4", f"{base}:3"}, places


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


# --- each fact once -------------------------------------------------------------------------
CONSTANT_NAME = re.compile(r"_?[A-Z][A-Z0-9_]*")
# The literals rule (ii) looks for elsewhere: file names ("manifest.json", ".wal") and format
# tags ("remap-index", "blake2b-64"). Short generic words ("none", "sharded") and numbers
# recur for unrelated reasons, so only the constants themselves are compared for those.
FILE_NAME = re.compile(r"[\w.-]*\.[A-Za-z]\w*")
FORMAT_TAG = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)+")


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"


def _leaves(node):
    """The str and bytes literals of a constant's value (nested tuples, lists, dicts)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
        yield node.value
    elif isinstance(node, ast.Tuple | ast.List | ast.Set):
        for element in node.elts:
            yield from _leaves(element)
    elif isinstance(node, ast.Dict):
        for value in node.values:
            yield from _leaves(value)


def stated_constants(modules: dict[str, Path]) -> dict:
    """``{value: [(module, "path:line NAME"), ...]}``: every string bound to an UPPER_CASE
    module-level name, and every bytes literal (a file signature) in such a constant."""
    stated = {}
    for module, path in modules.items():
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", 0)]
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            for target in targets:
                if not (isinstance(target, ast.Name) and CONSTANT_NAME.fullmatch(target.id)):
                    continue
                values = [v for v in _leaves(node.value) if isinstance(v, bytes)]
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    values.append(node.value.value)
                for value in values:
                    if len(value) > 1:
                        site = f"{_where(path, node.lineno)} {target.id}"
                        stated.setdefault(value, []).append((module, site))
    return stated


def restated_constants(stated: dict) -> list[str]:
    """Rule (i): one value bound as a constant in more than one module."""
    return [
        f"{value!r} is a constant in {len({m for m, _ in sites})} modules: "
        + ", ".join(site for _, site in sites)
        for value, sites in stated.items()
        if len({module for module, _ in sites}) > 1
    ]


def _docstrings(tree) -> set[int]:
    kinds = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def is_fact(value) -> bool:
    """A literal worth one owner: a file signature, a file name or a format tag."""
    if isinstance(value, bytes):
        return len(value) > 1
    return bool(FILE_NAME.fullmatch(value) or FORMAT_TAG.fullmatch(value))


def bare_copies(modules: dict[str, Path], stated: dict) -> list[str]:
    """Rule (ii): a file name, format tag or signature that a constant states, written as a
    bare literal (not a docstring) in a module that does not own it."""
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        docstrings = _docstrings(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or id(node) in docstrings:
                continue
            if not isinstance(node.value, str | bytes) or node.value not in stated:
                continue
            owners = stated[node.value]
            if is_fact(node.value) and module not in {owner for owner, _ in owners}:
                found.append(
                    f"{_where(path, node.lineno)} writes {node.value!r}; import it from "
                    + ", ".join(site for _, site in owners)
                )
    return found


def test_each_fact_is_stated_once():
    """A format constant is bound in one module, and no other module writes its literal."""
    modules = source_modules()
    stated = stated_constants(modules)
    copies = restated_constants(stated) + bare_copies(
        {**modules, **source_modules({"bench": "bench"})}, stated
    )
    assert not copies, "facts stated more than once:\n" + "\n".join(copies)


def test_the_fact_check_catches_planted_copies(tmp_path):
    """Both rules bite: a second FORMAT, a signature tuple, a bare file name; a docstring, a
    generic word and the owner's own use do not count."""
    owner = _plant_module(
        tmp_path,
        "contract.py",
        'MANIFEST_FILE = "manifest.json"\nIMAGE_SIGNATURES = {"gif": (b"GIF87a", b"GIF89a")}\n'
        'NONE = "none"\nFORMAT = "remap-index"\nPATH = MANIFEST_FILE or "manifest.json"\n',
    )
    copy = _plant_module(
        tmp_path,
        "index.py",
        '"""Reads manifest.json."""\nFORMAT = "remap-index"\n_MAGIC = (b"GIF89a",)\n'
        'def f(d):\n    """Looks for manifest.json."""\n    return d / "manifest.json", "none"\n',
    )
    modules = {"remap_tf.contract": owner, "remap_cli.paths": copy}
    stated = stated_constants(modules)
    restated = restated_constants(stated)
    assert len(restated) == 2, restated
    assert any("'remap-index' is a constant in 2 modules" in line for line in restated)
    assert any("b'GIF89a'" in line and "_MAGIC" in line for line in restated)
    bare = bare_copies(modules, stated)
    assert len(bare) == 1 and "index.py:6 writes 'manifest.json'" in bare[0], bare
    assert "MANIFEST_FILE" in bare[0]


def _plant_module(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
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
    assert "remap_tf/training/fit.py" in names and "remap_tf/serving/index/base.py" in names
    assert "remap_tf/export/saved_model.py" in names
    for page in ("index.html", "app.js", "style.css"):  # `remap serve`'s page, package data
        assert f"remap_tf/serving/service/static/{page}" in names
    assert "remap = remap_cli.main:main" in scripts
