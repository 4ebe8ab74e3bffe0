"""The code's shape: no import cycles between ephemera's modules (including imports
inside functions; ``if TYPE_CHECKING:`` blocks are types only), no module much over
500 lines, the controller never knows a provider by name, and lazy imports only for
what ``ephemera --help`` must not load."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ephemera": ROOT / "ephemera", "ephemera_providers": ROOT / "providers"}
MAX_LINES = 520
# What may be imported inside a function: SDKs and libraries that ``ephemera --help``
# must not pay for, and the CLI's commands (each loaded when it runs).
LAZY_ALLOWED = re.compile(
    r"^(boto3|botocore|docker|paramiko|huggingface_hub|transformers|torch|safetensors|"
    r"cryptography|tenacity|moto|ruamel|rich|yaml|jsonschema|pydantic|pydantic_settings|"
    r"platformdirs|click|tomllib|sqlite3|urllib|http|ipaddress|statistics|random|zipfile|"
    r"tarfile|fnmatch|getpass|hashlib|base64|uuid|socket|select|importlib|subprocess|"
    r"textwrap|difflib|math|json|csv|io|tempfile|shutil|threading|signal|os|time|defusedxml|"
    r"ephemera\.cli|ephemera\.registry|ephemera_providers)")


def modules() -> dict[str, Path]:
    found = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports_of(path: Path, known: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """(ephemera modules imported anywhere outside TYPE_CHECKING blocks, imports made
    inside functions as (line, module))."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    lazy: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            for name in names:
                if name in known:
                    found.add(name)
            if names and in_function:
                lazy.append((child.lineno, names[0]))
            visit(child, inner)

    visit(tree, False)
    return found, lazy


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports_of(path, set(mods))[0] - {name} for name, path in mods.items()}
    # A package's __init__ imported through a submodule is not an edge back.
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in graph.items()}
    assert cycles(graph) == []


def test_the_walker_finds_a_cycle(tmp_path):
    """The check itself: two modules importing each other inside functions are a cycle."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("import a\n")
    known = {"a", "b"}
    graph = {m: imports_of(tmp_path / f"{m}.py", known)[0] - {m} for m in known}
    assert cycles(graph) == [["a", "b"]]


def test_no_module_is_much_over_500_lines():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_controller_knows_no_provider_by_name():
    text = "\n".join(p.read_text() for p in (ROOT / "ephemera").rglob("*.py"))
    assert re.findall(r"provider_name ==|provider_name in|_IMAGE_PROVIDERS", text) == []
    lifecycle = "\n".join(p.read_text() for p in (ROOT / "ephemera" / "lifecycle").glob("*.py"))
    assert re.findall(r"getattr\((self|run)\.provider", lifecycle) == []


def test_lazy_imports_only_at_the_edges():
    mods = modules()
    inside = [f"{mods[name].relative_to(ROOT)}:{line} imports {what}"
              for name in sorted(mods) if name.startswith("ephemera.")
              and not name.startswith("ephemera.cli")
              for line, what in imports_of(mods[name], set(mods))[1]
              if not LAZY_ALLOWED.match(what)]
    assert inside == []
