import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HOME = str(ROOT / "Home.py")
OUTPUT_DIR = ROOT / "test-output"

from chatglm_fixtures import chatglm2_config, random_state_dict, train_sentencepiece, write_checkpoint  # noqa: E402

from glm_core import ModelSpec, load_settings  # noqa: E402
from glm_core.models import load_model  # noqa: E402
from glm_core.models.loading import convert_gguf, embedded_gguf_path  # noqa: E402


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(scope="session")
def embedded_fp32():
    """The real embedded model in FP32 (exactness tests compare logits paths, so no bf16 rounding)."""
    loaded = load_model(ModelSpec("embedded", "fp32", "cpu"))
    yield loaded
    loaded.release()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and the embedded model's tokenizer: fast, and (seed 0) it rambles
    until a limit or a stop instead of ending its turn."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(convert_gguf(embedded_gguf_path(), load_settings().cache_dir))
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    return load_model(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    """An engine over the tiny model, one per test module (its API servers and requests share it)."""
    from glm_core.engine import Engine

    engine = Engine(tiny_loaded)
    yield engine
    engine.close()


# ---- tiny ChatGLM2/3 checkpoints in the original THUDM layout (random weights, a SentencePiece model trained here)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="session")
def pieces(sp_model):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()


@pytest.fixture(scope="session")
def glm2(tmp_path_factory, sp_model, pieces):
    config = chatglm2_config(pieces)
    sd = random_state_dict(config)
    folder = write_checkpoint(tmp_path_factory.mktemp("m") / "glm2-tiny", sp_model, config, sd, "bin")
    return folder, config, sd


@pytest.fixture(scope="session")
def glm3(tmp_path_factory, sp_model, pieces):
    config = chatglm2_config(pieces, name="THUDM/chatglm3-6b")
    sd = random_state_dict(config, seed=1)
    folder = write_checkpoint(tmp_path_factory.mktemp("m") / "glm3-tiny", sp_model, config, sd, "sharded-bin")
    return folder, config, sd


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    """Every test stores conversations in its own folder, never in the project's data/ (subprocesses inherit it)."""
    folder = tmp_path / "glm-data"
    monkeypatch.setenv("GLM_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def env_cleanup(monkeypatch):
    for name in ("GLM_MODEL_PATH", "GLM_PRECISION", "GLM_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No test compiles a decode graph unless it asks for one (Engine(..., compile="on"), tests/test_fast_decode.py):
    # a compile takes from seconds (tiny models) to minutes (SmolLM2) on a 2-core machine.
    os.environ["GLM_COMPILE"] = "off"


def pytest_report_header(config):
    """Whether the peer tests (tests/test_peer_llama.py) will run, said before any test does."""
    from glm_core.bench.llama_server import NotBuilt, check_built

    try:
        return f"llama-server: {check_built()} (the peer tests run)"
    except NotBuilt as exc:
        return f"{exc}; the peer tests are skipped"


def page_app(page: str | None = None, timeout: float = 120):
    """The portal through Streamlit's AppTest, not run yet: Home.py's frame (its access rules) on `page`, the name of
    a script in ui/pages/ ("GPU_monitor", "Shared", ...; None or HOME: the chat page), as a browser opening /GPU_monitor."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=timeout)
    if page not in (None, HOME):
        at.switch_page(f"ui/pages/{page}.py")
    return at


def open_page(page=None, ws=None, c=None, user=None, secrets=None):
    """A page through the frame (page_app), run once (it must not raise): optionally in workspace `ws`, on
    conversation `c`, as signed-in `user`, with `secrets`."""
    at = page_app(page)
    if ws is not None:
        at.query_params["ws"] = ws
    if c is not None:
        at.query_params["c"] = c
    if user is not None:
        at.user = user
    if secrets is not None:
        at.secrets = secrets
    at.run()
    assert not at.exception, at.exception
    return at


def stop_process(process, timeout: float) -> None:
    """Terminate a server started for a test; kill it if it does not end within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def shown(text: str) -> str:
    """What a reader sees of Markdown that escapes every special character (glm_core.safe_markdown.plain)."""
    import re

    return re.sub(r"\\(.)", r"\1", text)


# ---- one portal for the browser tests of a session ---------------------------------------------------------


@pytest.fixture(scope="session")
def portal_data(tmp_path_factory) -> Path:
    """The shared portal's data folder: tests make their own workspaces in it (stored_workspace) and open them by
    URL, so they never see each other's conversations."""
    return tmp_path_factory.mktemp("portal-data")


@pytest.fixture(scope="session")
def server(output_dir, portal_data):
    """`streamlit run Home.py` started once for the session's browser tests (on the embedded model); its URL."""
    from browser_support import need_chromium, running_portal

    need_chromium()
    with running_portal(output_dir, {"GLM_DATA_DIR": str(portal_data)}) as (url, _, _):
        yield url


# A hung test fails after pyproject's timeout (5 minutes); these kinds legitimately take longer on 2 cores: a
# compile of the decode graphs on a cold cache, a real browser against a real portal, llama.cpp's server.
LONGER_TIMEOUTS = {"slow": 900, "browser": 600, "peer": 600, "gpu": 900}


# The files that take longest (over a minute of one worker each, `--durations` of a whole run, 2026-12-07), longest
# first. `make test` hands whole files to its two workers in collection order: these go first, so that the run
# does not end with one worker alone on a long file that it took last while the other stands idle.
LONGEST_FILES = [
    "test_llm_comply.py",
    "test_browser.py",
    "test_cli.py",
    "test_against_transformers.py",
    "test_browser_compare.py",
    "test_batching.py",
    "test_bench_child.py",
    "test_glm_families.py",
    "test_engine.py",
    "test_fast_decode.py",
    "test_bench_quality.py",
    "test_bench_memory.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order stays
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        longest = max((s for name, s in LONGER_TIMEOUTS.items() if item.get_closest_marker(name)), default=None)
        if longest is not None:
            item.add_marker(pytest.mark.timeout(longest))
