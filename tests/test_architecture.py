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
    "satcli.engines": 7,
    "satcli.commands": 8,
    "satcli.cli": 9,
    "satcli.api": 9,
    "satcli.__main__": 10,
}
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_FUNCTIONS_ALLOWED = {("models.decoding", "_beam_search")}  # the beam search, read as one piece


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


ASSETS = ("report_assets", "export_assets")  # files satcli ships to users (export's caption.py), not its modules


def _modules(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((ROOT / package).rglob("*.py"))
            if not set(p.relative_to(ROOT).parts) & set(ASSETS)}


MODULES = _modules(*PACKAGES)  # what the rules are about
EVERYWHERE = {**MODULES, **_modules("bench", "tests")}  # whose private-name imports are checked too
Modules = dict[str, Path]


def _resolve(module: str, node: ast.ImportFrom, modules: Modules) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    is_package = modules.get(module, Path()).name == "__init__.py"
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, modules: Modules) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in ``module``, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(modules[module].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, modules)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # `from satcli.data import store` imports a module, not a name
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


def upward_imports(modules: Modules) -> list[str]:
    wrong = []
    for module in modules:
        mine = _layer(module)
        if mine is None:
            continue
        for target, _, line in _imports(module, modules):
            theirs = _layer(target) if _ours(target) else None
            if theirs is not None and theirs[0] != mine[0] and theirs[1] >= mine[1]:
                wrong.append(f"{module}:{line} imports {target} ({theirs[0]} is not below {mine[0]})")
    return wrong


def command_imports(modules: Modules) -> list[str]:
    return [f"{module}:{line} imports {target}"
            for module in modules if module.startswith("satcli.commands.")
            for target, _, line in _imports(module, modules)
            if target.startswith("satcli.commands") and target != module]


def private_imports(modules: Modules) -> list[str]:
    wrong = []
    for module, path in modules.items():
        for target, name, line in _imports(module, modules):
            private = (name or target.rsplit(".", 1)[-1]).startswith("_") and not (name or "").startswith("__")
            if _ours(target) and private and target != module and not target.endswith("__main__"):
                wrong.append(f"{path.name}:{line} ({module}) imports {name or target} from {target}")
    return wrong


def import_cycles(modules: Modules) -> list[str]:
    graph = {m: {t for t, _, _ in _imports(m, modules) if t in modules and t != m} for m in modules}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return [" → ".join(c) for c in cycles]


def test_every_module_belongs_to_a_layer():
    loose = [m for m in MODULES if m not in ("satcli", "models") and _layer(m) is None]
    assert not loose, f"modules outside every layer of docs/architecture.md: {loose}"


def test_layers_import_downward_only():
    wrong = upward_imports(MODULES)
    assert not wrong, "\n".join(wrong)


def test_no_command_imports_another_command():
    wrong = command_imports(MODULES)
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name_of_another():
    wrong = private_imports(EVERYWHERE)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    cycles = import_cycles(MODULES)
    assert not cycles, "\n".join(cycles)


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
    """Each rule, tried on made-up modules (in tmp_path, beside the real tree) that break it."""
    def with_probes(**sources: str) -> Modules:
        probes = {}
        for name, text in sources.items():
            probes[f"satcli.commands.{name}"] = tmp_path / f"{name}.py"
            probes[f"satcli.commands.{name}"].write_text(text)
        return {**MODULES, **probes}

    breaking = with_probes(zz_probe="from satcli.commands.train import run\nfrom satcli.core.atomic import _private\n")
    assert any("zz_probe" in line for line in command_imports(breaking))
    assert any("_private" in line for line in private_imports(breaking))
    upward = with_probes(zz_probe="import satcli.cli\n")
    assert any("zz_probe" in line and "is not below" in line for line in upward_imports(upward))
    cycle = with_probes(zz_probe="def f():\n    from satcli.commands import zz_other\n",
                        zz_other="from satcli.commands.zz_probe import f\n")
    assert "satcli.commands.zz_other → satcli.commands.zz_probe → satcli.commands.zz_other" in import_cycles(cycle)
    assert not command_imports(MODULES) and not import_cycles(MODULES)  # the real tree, for contrast
