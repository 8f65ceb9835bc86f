"""The package's modules import one another without a circle, type-only imports included (issue #23: plan.py and
work.py imported each other under TYPE_CHECKING)."""

import ast
import pathlib

import uba_fused

PACKAGE = pathlib.Path(uba_fused.__file__).parent


def _imports(path: pathlib.Path) -> set[str]:
    """The modules of the package that ``path`` imports, anywhere in it (relative imports, resolved; a package's
    ``__init__`` is named by the package, so the children it imports make no circle with it)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            target = ".".join(base + tuple(node.module.split("."))) if node.module else ".".join(base)
            out.add(target)
    return out


def test_no_module_imports_itself_through_others():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {t for t in _imports(p) if t in modules and t != m} for m, p in modules.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for m in graph if (c := cycle_from(m))]
    assert not cycles, f"import circles: {cycles[:3]}"
