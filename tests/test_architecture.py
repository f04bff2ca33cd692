"""The layout docs/architecture.md describes, enforced: layers import downward only, commands never import each
other, nobody imports another module's private names, there are no import cycles, and files and functions stay
short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("satcli", "models")

# the layers of docs/architecture.md, lowest first; a module imports only from lower layers or its own package
LAYERS: dict[str, int] = {
    "models": 0,
    "satcli.core": 1,
    "satcli.data": 2,
    "satcli.formats": 3,
    "satcli.pictures": 4,
    "satcli.scoring": 5,
    "satcli.training": 6,
    "satcli.captioning": 6,
    "satcli.commands": 7,
    "satcli.cli": 8,
    "satcli.api": 8,
    "satcli.__main__": 9,
}
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("models.decoding", "_beam_search")}  # the beam search, read as one piece


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules(*PACKAGES)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = MODULES.get(module, Path()).name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``module``, wherever it is."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # `from satcli.data import store` imports a module, not a name
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((source, alias.name, node.lineno))
    return found


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _layer(module: str) -> tuple[str, int] | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None


def test_every_module_belongs_to_a_layer():
    loose = [m for m in MODULES if m not in ("satcli", "models") and _layer(m) is None]
    assert not loose, f"modules outside every layer of docs/architecture.md: {loose}"


def test_layers_import_downward_only():
    wrong = []
    for module in MODULES:
        mine = _layer(module)
        if mine is None:
            continue
        for target, _, line in _imports(module):
            theirs = _layer(target) if _ours(target) else None
            if theirs is None or theirs[0] == mine[0]:
                continue
            if theirs[1] >= mine[1]:
                wrong.append(f"{module}:{line} imports {target} ({theirs[0]} is not below {mine[0]})")
    assert not wrong, "\n".join(wrong)


def test_no_command_imports_another_command():
    wrong = [f"{module}:{line} imports {target}"
             for module in MODULES if module.startswith("satcli.commands.")
             for target, _, line in _imports(module)
             if target.startswith("satcli.commands") and target != module]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    everywhere = {**MODULES, **_modules("bench", "tests")}
    wrong = []
    for module, path in everywhere.items():
        MODULES.setdefault(module, path)  # so _imports can read bench/ and tests/ too
        for target, name, line in _imports(module):
            private = (name or target.rsplit(".", 1)[-1]).startswith("_") and not (name or "").startswith("__")
            if _ours(target) and private and target != module and not target.endswith("__main__"):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {name or target} from {target}")
    for module in set(everywhere) - set(_modules(*PACKAGES)):
        MODULES.pop(module, None)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ is imported on the way to its modules, but importing it from one of them is a cycle
    # only if __init__ really imports that module back, which the graph already says
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("satcli")))
def test_no_file_is_too_long_to_read(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines"


def test_no_function_is_too_long_to_read():
    wrong = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and (module, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines")
    assert not wrong, "\n".join(wrong)


def test_the_checks_catch_what_they_name(tmp_path):
    """The rules above, tried on a made-up module that breaks each one."""
    global MODULES
    saved = MODULES
    bad = ROOT / "satcli" / "commands" / "zz_rule_probe.py"
    other = bad.with_name("zz_rule_other.py")
    try:
        bad.write_text("from satcli.commands.train import run\nfrom satcli.core.atomic import _private\n")
        MODULES = _modules(*PACKAGES)
        with pytest.raises(AssertionError, match="zz_rule_probe"):
            test_no_command_imports_another_command()
        with pytest.raises(AssertionError, match="_private"):
            test_no_module_imports_a_private_name_of_another()
        bad.write_text("import satcli.cli\n")
        MODULES = _modules(*PACKAGES)
        with pytest.raises(AssertionError, match="is not below"):
            test_layers_import_downward_only()
        bad.write_text("def f():\n    from satcli.commands import zz_rule_other\n")
        other.write_text("from satcli.commands.zz_rule_probe import f\n")
        MODULES = _modules(*PACKAGES)
        with pytest.raises(AssertionError, match="zz_rule_probe → satcli.commands.zz_rule_other"):
            test_no_import_cycles()
    finally:
        bad.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
        MODULES = saved
