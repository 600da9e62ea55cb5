"""The project's layout holds: imports go one way between packages (no circles), the leaves know no model
family, no module or function outgrows its budget, and no family is recognized by its name outside the
families (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("compress", "distill", "quant", "importance", "benchmarks")
# compress's packages from the bottom up: a module may import its own package and the ones before it.
LAYERS = ("compress.errors", "compress.io", "compress.models", "compress.sources", "compress.evaluation",
          "compress.pruning", "compress.deploy", "compress.core", "compress.families", "compress.app")
LEAVES = ("distill", "quant", "importance")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, Path]:
    found = {}
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Every project module ``path`` imports, function-local imports included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in modules and t != name}
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def _layer(module: str) -> int | None:
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    return None


def test_no_import_circles_among_the_projects_modules():
    graph = _graph()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_packages_import_downward_only_and_the_leaves_know_no_compress():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if module.split(".")[0] in LEAVES and target.split(".")[0] == "compress":
                wrong.append(f"{module} imports {target}: the leaves take models and data, not compress's knowledge")
            mine, theirs = _layer(module), _layer(target)
            if mine is not None and (target == "compress" or (theirs is not None and theirs > mine)):
                wrong.append(f"{module} imports {target}, a later layer")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_module_or_function_over_its_budget():
    too_long = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)


def test_no_family_is_recognized_by_name_or_by_is_encoder_decoder_outside_the_families():
    families = ("compress.families", "compress.models")
    pattern = re.compile(r"""is_encoder_decoder|(==|!=|\bin)\s*["'](mu|minitron|mobilellm)["']|["'](mu|minitron|mobilellm)["']\s*(==|!=)""")
    found = []
    for name, path in _modules().items():
        if name.startswith(families):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "family tests outside compress/families:\n" + "\n".join(found)
