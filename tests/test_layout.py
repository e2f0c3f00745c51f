"""The layering rules the code base keeps: the conversation layer and the shared types never pull in torch."""

import subprocess
import sys

from conftest import ROOT


def test_conversation_layer_imports_without_torch():
    code = (
        "import sys\n"
        "import glm_core, glm_core.protocol\n"
        "import glm_core.conversations.conversation, glm_core.conversations.store, glm_core.conversations.exchange\n"
        "import glm_core.conversations.turn, glm_core.conversations.workspace\n"
        "import glm_core.bench.llama_server\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'streamlit') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the conversation layer imported {out.stdout.strip()}"


def test_core_never_imports_streamlit():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "glm_core").rglob("*.py")
        if "import streamlit" in p.read_text() or "from streamlit" in p.read_text()
    ]
    assert offenders == []


# The import arrows of DESIGN.md, lowest first: a unit imports only from units of its own rank or below. The shared
# base (types, settings, rules free of torch and streamlit) is below everything; the UI is above everything and
# talks to backends and typed records, never to model internals (models, engine).
RANKS = {
    "glm_core": 0,  # the package's own __init__: the shared types
    "glm_core.protocol": 0,
    "glm_core.settings": 0,
    "glm_core.safe_markdown": 0,
    "glm_core.sampling_defaults": 0,
    "glm_core.reasoning": 0,  # the <think>...</think> rule: no torch, no streamlit
    "glm_core.tool_calls": 0,  # tool definitions checked, calls read back in a family's syntax: no torch
    "glm_core.access": 0,
    "glm_core.telemetry": 0,
    "glm_core.models": 1,
    "glm_core.engine": 2,
    "glm_core.backends": 3,
    "glm_core.conversations": 4,
    "glm_core.admin": 4,
    "glm_core.api": 5,
    "glm_core.bench": 6,
    "glm_core.cli": 7,
    "glm_core.__main__": 8,
    "ui": 9,
    "Home": 10,
}
UI_NEVER_IMPORTS = {"glm_core.models", "glm_core.engine"}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "glm_core":
        return ".".join(parts[:2]) if len(parts) > 1 else "glm_core"
    return parts[0] if parts[0] in ("ui", "Home") else None


def _dotted(path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, file) for every import in the project's code, relative imports resolved."""
    import ast

    edges = set()
    for path in [ROOT / "Home.py", *(ROOT / "glm_core").rglob("*.py"), *(ROOT / "ui").rglob("*.py")]:
        dotted = _dotted(path)
        source = _unit(dotted)
        package = dotted.split(".") if path.name == "__init__.py" else dotted.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                targets = [".".join(base + ([node.module] if node.module else []))]
            else:
                continue
            for target in map(_unit, targets):
                if target not in (None, source):
                    edges.add((source, target, str(path.relative_to(ROOT))))
    return edges


def test_every_unit_has_a_rank():
    units = {_unit(_dotted(p)) for p in (ROOT / "glm_core").rglob("*.py")}
    assert units <= set(RANKS), f"give these a rank in RANKS: {sorted(units - set(RANKS))}"


def test_imports_point_one_way():
    upward = sorted(
        f"{file}: {source} imports {target}"
        for source, target, file in import_edges()
        if RANKS[target] > RANKS[source] or (source in ("ui", "Home") and target in UI_NEVER_IMPORTS)
    )
    assert upward == []
