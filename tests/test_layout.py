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
