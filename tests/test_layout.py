"""The package's layout is its architecture: each folder does one job and leans only on the folders below it.

model/ (the math) reads no file and knows no tokenizer; stream/ (feeding and generating) reads no model
file; runs/ (what long jobs need) knows no model family, only model/'s meshes and arrays; serve/ (many conversations at once) sits on top of
them; nothing in streamjax/ knows the experiments; and no
module uses another module's private (`_name`) functions: a helper two modules need gets a public home.
"""

import ast
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("streamjax/**/*.py"), *ROOT.glob("experiments/*.py")])
# folder -> the project packages its modules may import (besides itself)
ALLOWED = {
    "streamjax/model": {"streamjax.model"},
    "streamjax/stream": {"streamjax.model", "streamjax.stream"},
    "streamjax/runs": {"streamjax.model", "streamjax.runs"},
    "streamjax/files": {"streamjax.model", "streamjax.stream", "streamjax.runs", "streamjax.files"},
    "streamjax/serve": {"streamjax.model", "streamjax.stream", "streamjax.files", "streamjax.runs", "streamjax.serve"},
    "streamjax": {"streamjax"},
    "experiments": {"streamjax", "experiments"},
}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.Module, name: str) -> dict[str, str]:
    """{local name: full module name} of the project modules a file imports, and each `from x import y` target."""
    found = {}
    package = name if name.count(".") == 0 else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("streamjax", "experiments"):
                    found[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] not in ("streamjax", "experiments"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found[alias.asname or alias.name] = (
                    full if importlib.util.find_spec(base) and _is_module(full) else base
                )
    return found


def _is_module(full: str) -> bool:
    try:
        return importlib.util.find_spec(full) is not None
    except ModuleNotFoundError:
        return False


def private_uses(tree: ast.Module, modules: dict[str, str]) -> list[str]:
    """`module._name` attribute uses and `from module import _name` imports of project modules."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("streamjax", "experiments"):
            uses += [f"from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            if _private(node.attr):
                uses.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return uses


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def folder_of(path: pathlib.Path) -> str:
    relative = path.relative_to(ROOT).parent.as_posix()
    return "streamjax/model" if relative.startswith("streamjax/model") else relative


def outside_imports(tree: ast.Module, name: str, folder: str) -> list[str]:
    """The project modules a file of `folder` imports that its folder may not (`ALLOWED`)."""
    allowed = ALLOWED[folder]
    return sorted(
        {
            full
            for full in imported_modules(tree, name).values()
            if not any(full == package or full.startswith(package + ".") for package in allowed)
        }
    )


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_module_uses_another_modules_private_names(path):
    tree = ast.parse(path.read_text())
    assert private_uses(tree, imported_modules(tree, module_name(path))) == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_folder_imports_only_the_folders_below_it(path):
    tree = ast.parse(path.read_text())
    outside = outside_imports(tree, module_name(path), folder_of(path))
    assert outside == [], (
        f"{path.relative_to(ROOT)} imports {outside}; it may import {sorted(ALLOWED[folder_of(path)])}"
    )


def test_the_rules_catch_a_violation(tmp_path):
    """The checks above fail on a module that breaks them (so a green run means something)."""
    code = "from streamjax.files import loading\nfrom streamjax.model import cache\nx = cache._write_slots\n"
    tree = ast.parse(code)
    modules = imported_modules(tree, "streamjax.stream.example")
    assert private_uses(tree, modules) == ["cache._write_slots (line 3)"]
    assert outside_imports(tree, "streamjax.stream.example", "streamjax/stream") == ["streamjax.files.loading"]
    assert outside_imports(tree, "streamjax.files.example", "streamjax/files") == []
