"""The import rules of docs/design.md, checked on the sources: every flm module sits in one layer
and imports only from its own layer or those below; no import cycle (imports inside functions
count); the runtime never reaches the family adapters; code comments cite measurements by the
section of bench/HISTORY.md that holds them, and those sections exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flm

SRC = Path(flm.__file__).parent
REPO = SRC.parents[1]

# lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS = [
    ["flm", "flm.errors", "flm.settings"],
    ["flm.paths", "flm.config", "flm.quant"],
    ["flm.layout", "flm.rope", "flm.format", "flm.templates"],
    ["flm.tokenization"],
    ["flm.kernels"],
    ["flm.kv_cache", "flm.model", "flm.loader", "flm.backends"],
    ["flm.generate"],
    ["flm.families", "flm.convert", "flm.torch2flm", "flm.builtin"],
    ["flm.llm", "flm.verify", "flm.bench", "flm.chat", "flm.inspect_flm", "flm.server", "flm.cli", "flm.__main__"],
]
RUNTIME = ("flm.model", "flm.kv_cache", "flm.loader", "flm.backends", "flm.kernels", "flm.generate", "flm.server")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The flm modules `name` imports anywhere in its source (functions and TYPE_CHECKING too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module or ""
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    for index, members in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{name} is in no layer of docs/design.md")


def test_every_module_imports_only_its_layer_or_below():
    wrong = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
             for name, deps in sorted(GRAPH.items()) for dep in sorted(deps) if _layer(dep) > _layer(name)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Depth-first search for a back edge: any cycle, however long."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def test_the_runtime_never_reaches_the_family_adapters():
    for start in (m for m in MODULES if m.startswith(RUNTIME)):
        seen, todo = set(), [start]
        while todo:
            for dep in GRAPH[todo.pop()] - seen:
                assert not dep.startswith("flm.families"), f"{start} reaches {dep}"
                seen.add(dep)
                todo.append(dep)


def _history_sections() -> list[str]:
    text = (REPO / "bench" / "HISTORY.md").read_text()
    return re.findall(r"^#+ (.+)$", text, re.M) + re.findall(r"^- \*\*(.+?)\*\*", text, re.M)


def test_cited_measurements_exist():
    """`bench/HISTORY.md, "Section"` in a source names a heading (or a bold item) that starts so."""
    sections = _history_sections()
    missing = []
    for path in [*SRC.rglob("*.py"), *SRC.rglob("*.cpp"), *SRC.rglob("*.h")]:
        text = re.sub(r"\s*(#|//)\s*", " ", path.read_text())  # citations may wrap across comment lines
        for title in re.findall(r'bench/HISTORY\.md,\s+"([^"]+)"', text):
            title = " ".join(title.split())
            if not any(s.startswith(title) for s in sections):
                missing.append(f"{path.name}: {title}")
    assert not missing, "\n".join(missing)


def test_no_measurement_figures_in_code_comments():
    """Measurements live in bench/; a comment gives the decision and cites where its numbers are."""
    units = re.compile(r"\d\s*(tok/s|GB/s|MB/s|GFLOP/s|G MAC/s|G multiply-adds/s| ms\b| us\b| µs\b)|\d\s*->\s*\d")
    found = []
    for path in [*SRC.rglob("*.py"), *SRC.rglob("*.cpp"), *SRC.rglob("*.h")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if units.search(line) and 'f"' not in line:  # f-strings: what bench and chat print
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)
