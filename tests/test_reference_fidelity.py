"""The project against what THUDM's original ChatGLM code produced when it was run (tests/reference/*.json, made
by tests/reference/make_reference.py in a separate environment; how: tests/reference/README.md).

The checkpoints are rebuilt here with the same fixture builders and must hash to the recorded SHA-256, so a drift
in fixture building fails loudly instead of comparing against outputs of other weights. Then the project's
tokenizers, prompts, logits and greedy replies (through the real loading path, the engine and the CLI's sampling
controls: temperature 0 with the model's DEFAULT controls otherwise) must equal the original's.

ChatGLM2 has two originals and the product follows both: chat() re-encodes the whole prompt text at once (the
product's encode(), for a conversation it holds no kept cache of), and stream_chat() with a kept cache appends the
new turn alone after the generated ids (the product's continuation()).
"""

import argparse
import base64
import json
from pathlib import Path

import pytest
import torch
from chatglm_fixtures import REFERENCE_CHECKPOINTS, assert_close_to_reference, build_reference_checkpoint, file_hashes

from glm_core import ModelSpec
from glm_core.engine import Engine
from glm_core.models import load_model
from glm_core.models.chat_format import ChatGLM6BFormat

REFERENCE = Path(__file__).parent / "reference"
FAMILIES = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
RECORDS = {family: json.loads((REFERENCE / f"{family}.json").read_text(encoding="utf-8")) for family in FAMILIES}
CHECKPOINTS = {
    name: (family, entry) for family, record in RECORDS.items() for name, entry in record["checkpoints"].items()
}


def cases(name: str, kind: str) -> list[dict]:
    return CHECKPOINTS[name][1]["cases"].get(kind, [])


def case_params(kind: str, names=None):
    """pytest params (name, case) for every recorded case of `kind`, with readable ids."""
    out = []
    for name in names or CHECKPOINTS:
        for i, case in enumerate(cases(name, kind)):
            out.append(pytest.param(name, case, id=f"{name}-{kind}{i}"))
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference-checkpoints")
    built = {}

    def folder(name: str) -> Path:
        if name not in built:
            built[name] = build_reference_checkpoint(name, root / REFERENCE_CHECKPOINTS[name][0])[0]
        return built[name]

    return folder


@pytest.fixture(scope="module")
def models(folders):
    loaded = {}

    def model(name: str):
        if name not in loaded:
            loaded[name] = load_model(ModelSpec(str(folders(name)), "fp32", "cpu"))
        return loaded[name]

    return model


def test_every_reference_checkpoint_is_recorded():
    assert set(CHECKPOINTS) == set(REFERENCE_CHECKPOINTS)
    for record in RECORDS.values():
        assert record["environment"]["torch"].startswith(torch.__version__.split("+")[0]), (
            "the reference checkpoints are byte-identical only with the torch that built them"
        )
        for source in record["sources"].values():
            assert len(source["commit"]) == 40 and source["files_sha256"]


@pytest.mark.parametrize("name", sorted(REFERENCE_CHECKPOINTS))
def test_checkpoints_hash_to_the_ones_the_original_ran_on(folders, name):
    assert file_hashes(folders(name)) == CHECKPOINTS[name][1]["files_sha256"]


# ---- tokenizers and prompts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, case", case_params("tokenizer", ["chatglm-6b"]))
def test_chatglm6b_tokenizer_ids(models, name, case):
    tokenizer = models(name).tokenizer
    assert tokenizer(case["text"])["input_ids"] == case["input_ids"]
    assert tokenizer.encode(case["text"]) == case["encode_no_special"]


@pytest.mark.parametrize("name, case", case_params("tokenizer", ["chatglm-6b"]))
def test_chatglm6b_reply_text_of_given_ids(models, name, case):
    """What chat() returns when the model generates exactly these ids and <eop>: the original decodes them with
    transformers 4.27's clean_up_tokenization_spaces (" ." -> "."...), then its process_response. The product's
    reply path: the tokenizer's decode, then the format's rewrite (the streaming decoder uses the same one)."""
    from glm_core.engine.runner import reply_decoder

    loaded = models(name)
    ids = case["encode_no_special"] + [loaded.tokenizer.eos_token_id]
    assert ChatGLM6BFormat.process_response(loaded.tokenizer.decode(ids)) == case["chat_reply_text"]
    decoder = reply_decoder(loaded)
    streamed = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
    assert streamed == case["chat_reply_text"]


@pytest.mark.parametrize("name, case", case_params("tokenizer", ["chatglm2-6b", "chatglm3-6b"]))
def test_chatglm2_3_tokenizer_ids_and_decode(models, name, case):
    tokenizer = models(name).tokenizer
    assert tokenizer.prefix_ids + tokenizer.encode(case["text"]) == case["input_ids"]
    assert tokenizer.encode(case["text"]) == case["encode_no_special"]
    assert tokenizer.decode(case["encode_no_special"]) == case["decode_no_special"]


def chatglm6b_messages(query, history):
    messages = []
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": query}]


@pytest.mark.parametrize("name, case", case_params("prompts", ["chatglm-6b"]))
def test_chatglm6b_prompt_ids(models, name, case):
    fmt = models(name).chat_format
    assert fmt.encode(chatglm6b_messages(case["query"], case["history"])) == case["prompt_ids"]


@pytest.mark.parametrize("name, case", case_params("prompts", ["chatglm2-6b"]))
def test_chatglm2_prompt_ids(models, name, case):
    """The whole prompt as chat() builds it (build_inputs), and the new turn alone as stream_chat() appends it to
    a kept cache (build_stream_inputs)."""
    fmt = models(name).chat_format
    messages = chatglm6b_messages(case["query"], case["history"])
    assert fmt.encode(messages) == case["build_inputs"]
    if case["history"]:
        assert fmt.continuation(messages) == case["build_stream_inputs"]


@pytest.mark.parametrize("name, case", case_params("prompts", ["chatglm3-6b"]))
def test_chatglm3_prompt_ids(models, name, case):
    fmt = models(name).chat_format
    messages = [{"role": m["role"], "content": m["content"]} for m in case["history"]]
    assert fmt.encode(messages + [{"role": "user", "content": case["query"]}]) == case["build_chat_input"]


# ---- logits -------------------------------------------------------------------------------------------------


def logits_of(entry: dict) -> torch.Tensor:
    data = entry["logits"]
    raw = base64.b64decode(data["float32_le_base64"])
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(data["shape"])


@pytest.mark.parametrize("name, case", case_params("logits"))
def test_logits_equal_the_original_forward(models, name, case):
    """fp32 on the CPU, as the original ran (.float()); pre-quantized checkpoints dequantized as they are read,
    the original unpacking them with THUDM's CPU kernel (ChatGLM-6B) or its documented torch equivalent
    (ChatGLM2, see the record's "emulated")."""
    model = models(name).model
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([case["ids"]])).logits[0].float()
    assert logits.argmax(-1).tolist() == case["argmax"]
    assert_close_to_reference(logits[case["rows"]], logits_of(case), RECORDS[CHECKPOINTS[name][0]]["environment"])


# ---- greedy replies through the engine, with the model's default controls -------------------------------------


def default_params(loaded, max_new_tokens: int):
    """The CLI's (and the chat page's) sampling: the options given, the model's own defaults for the rest."""
    from glm_core.cli import chat_params
    from glm_core.sampling_defaults import CONTROLS

    args = argparse.Namespace(**{c: None for c in CONTROLS}, seed=None)
    args.temperature, args.max_new_tokens = 0.0, max_new_tokens
    return chat_params(args, loaded.card())[0]


def reply(engine, loaded, conversation_id, messages, max_new_tokens, recompute=False):
    done = engine.submit(conversation_id, messages, default_params(loaded, max_new_tokens), recompute=recompute).wait()
    assert done.error is None, done.error
    prompt = loaded.chat_format.encode(messages)
    return done, engine.pool.tokens(conversation_id)[len(prompt) :]


def assert_same_reply(family, done, held, case, streamed=False):
    generated = case["generated_ids"]
    assert held == generated[: len(held)] and len(held) >= len(generated) - 1  # the last token may be unfed
    if streamed and done.text.endswith("\ufffd") and not case["response"].endswith("\ufffd"):
        # stream_chat() yields no response ending in U+FFFD (a character whose bytes are not all there): its last
        # one stops before a character cut at max_length; the product's reply ends with the cut character.
        assert done.text.rstrip("\ufffd").endswith(case["response"][-1:])
        done.text = done.text.rstrip("\ufffd")
    if family == "chatglm3-6b" and done.finish_reason == "length":
        # chat() drops the last generated id (`[:-1]`, meant for the stop token) even when it stopped at
        # max_length; the product keeps it. Compare the text of the ids both have.
        assert done.text.startswith(case["response"].rstrip("\ufffd"))
    else:
        assert done.text == case["response"]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
@pytest.mark.parametrize("name, case", case_params("chat"))
def test_greedy_chat_replies(models, name, case):
    family = CHECKPOINTS[name][0]
    loaded = models(name)
    messages = messages_of(family, case["query"], case["history"])
    assert loaded.chat_format.encode(messages) == case["prompt_ids"]
    engine = Engine(loaded)
    try:
        done, held = reply(engine, loaded, "c", messages, len(case["generated_ids"]))
        assert_same_reply(family, done, held, case)
    finally:
        engine.close()


def messages_of(family: str, query: str, history: list) -> list[dict]:
    """The original's chat() arguments as the product's messages."""
    if family == "chatglm3-6b":
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        return messages + [{"role": "user", "content": query}]
    return chatglm6b_messages(query, history)


CONVERSATIONS = [pytest.param(name, id=name) for name in CHECKPOINTS if cases(name, "conversation")]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_greedy_multi_turn_conversations(models, name):
    """Several chat() turns, each given the history the previous one returned. ChatGLM-6B re-reads the whole
    conversation every turn (its prompt attends both ways) in one engine conversation, as chat() does; for
    ChatGLM2/3 chat() re-encodes the history from its text, which is what the product does for a conversation
    it holds no kept cache of (one read from the store, or resent by an API client): a new engine conversation
    per turn. Each turn gets the original's history (its replies as chat() returned them: ChatGLM3's lack their
    last id, see assert_same_reply), so a turn fails for its own reply, not for an earlier one."""
    family = CHECKPOINTS[name][0]
    loaded = models(name)
    engine = Engine(loaded)
    try:
        for number, turn in enumerate(cases(name, "conversation")):
            messages = messages_of(family, turn["query"], turn["history"])
            assert loaded.chat_format.encode(messages) == turn["prompt_ids"]
            conversation = "c" if family == "chatglm-6b" else f"c{number}"
            done, held = reply(engine, loaded, conversation, messages, len(turn["generated_ids"]))
            assert_same_reply(family, done, held, turn)
    finally:
        engine.close()


@pytest.mark.parametrize("name", [n for n in CHECKPOINTS if cases(n, "stream_conversation")])
def test_first_stream_chat_turn_with_a_kept_cache(models, name):
    """stream_chat()'s first turn (past_key_values=None, return_past_key_values=True: THUDM's cli_demo.py)."""
    family = CHECKPOINTS[name][0]
    loaded = models(name)
    turn = cases(name, "stream_conversation")[0]
    messages = [{"role": "user", "content": turn["query"]}]
    assert loaded.chat_format.encode(messages) == turn["fed_ids"]
    engine = Engine(loaded)
    try:
        done, held = reply(engine, loaded, "c", messages, turn["max_new_tokens"])
        assert_same_reply(family, done, held, turn, streamed=True)
    finally:
        engine.close()


# ---- THUDM's int4 packing --------------------------------------------------------------------------------------


def test_int4_and_int8_unpack_as_thudm_packs_them():
    """THUDM's quantization.py (its CPU kernels, run by the generator): QuantizedLinear's stored bytes and scales
    for a small weight, and extract_weight_to_float's result; the project's loader must read them back the same."""
    from glm_core.models.chatglm.checkpoint import dequantize

    packing = RECORDS["chatglm-6b"]["int4_packing"]
    for bits, layer in packing["layers"].items():
        stored = torch.tensor(layer["weight_int8"], dtype=torch.int8)
        assert bytes(stored.view(torch.uint8).flatten().tolist()).hex() == layer["weight_bytes_hex"]
        scale = torch.tensor(layer["weight_scale_fp32"], dtype=torch.float32)
        expected = torch.tensor(layer["extract_weight_to_float"], dtype=torch.float32)
        assert torch.equal(dequantize(stored, scale, int(bits)).float(), expected)
    compressed = packing["compress_int4_weight"]
    values = torch.tensor(compressed["values"], dtype=torch.int8)
    packed = torch.tensor(compressed["packed"], dtype=torch.int8)
    assert torch.equal(dequantize(packed, torch.ones(len(values)), 4).to(torch.int8), values)
    assert all("equal compress_int4_weight" in check for check in packing["fixture_checks"].values())
