"""The package's layering: imports only run downwards (data/networks/metrics <- engines <- handlers <- bundle
entry points), so that a lower layer can be read, tested and reused without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import muscle_ext

PACKAGE = Path(muscle_ext.__file__).parent
LAYERS = {  # first part of the module path below muscle_ext -> layer (a module imports its own layer or lower)
    "flags": 0, "settings": 0, "bundle_args": 0,
    "data": 1, "networks": 1, "metrics": 1,
    "engines": 2,
    "handlers": 3,
    "bundle_errors": 4, "bundle_checks": 4, "pipeline": 4, "zoo": 4, "cli": 4,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every muscle_ext module ``path`` imports, at the top or inside a function (lazy imports count too)."""
    module = _module_name(path)
    return _imports_in(path.read_text(), module if path.name == "__init__.py" else module.rsplit(".", 1)[0])


def _imports_in(source: str, package: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
    return {n for n in found if n == "muscle_ext" or n.startswith("muscle_ext.")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    unplaced = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")
                if p.name != "__init__.py" or p.parent != PACKAGE} - {f"{k}.py" for k in LAYERS} - set(LAYERS)
    assert not unplaced, f"place these in LAYERS: {sorted(unplaced)}"


def test_imports_only_run_downwards():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(_module_name(path))
        if own is None:
            continue
        for imported in sorted(_imports(path)):
            layer = _layer(imported)
            if layer is not None and layer > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {imported}")
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def test_the_scan_sees_lazy_and_relative_imports():
    # the check above can fail: function-level, relative and absolute imports of a higher layer are all found
    source = "import os\ndef f():\n    from ..handlers import TrackingHandler\n    import muscle_ext.engines.x\n"
    assert _imports_in(source, "muscle_ext.metrics") == {"muscle_ext.handlers", "muscle_ext.engines.x"}
