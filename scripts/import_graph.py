"""The import graph between the project's units, from the source (no import is executed).

    python3 scripts/import_graph.py

One line per unit: `Home`, `ui`, and each top-level module or package of `glm_core`, with the units it imports.
`tests/test_layout.py` asserts that the arrows point one way.
"""

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unit(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[1] if parts[0] == "glm_core" else parts[0]


def imported(path: Path) -> set[str]:
    package = path.relative_to(ROOT).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: -node.level]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            modules = [module] + [f"{module}.{alias.name}" for alias in node.names] if node.level else [module]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "glm_core" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "ui":
                found.add("ui")
    return found


def main() -> None:
    arrows = collections.defaultdict(set)
    for path in [ROOT / "Home.py", *ROOT.glob("ui/**/*.py"), *ROOT.glob("glm_core/**/*.py")]:
        source = unit(path)
        arrows[source] |= imported(path) - {source}
    for source in sorted(arrows):
        print(f"{source} -> {', '.join(sorted(arrows[source])) or '(nothing)'}")


if __name__ == "__main__":
    main()
