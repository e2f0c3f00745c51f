"""Each family's tool format against its original repository's documented examples (THUDM/ChatGLM3 PROMPT.md and
tool_using/README.md; glm-4-9b-chat's chat template and the prompt it renders), and constrained decoding on tiny
random models: a forced call parses and matches the function's schema whatever the weights."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from glm_core.engine import Engine
from glm_core.models import load_model
from glm_core.models.chat_format import ChatGLM3Format, TemplateChatFormat
from glm_core.models.chatglm.tokenizer import ChatGLMTokenizer
from glm_core.models.tool_formats import ChatGLM3ToolSyntax, GLM4ToolSyntax, HermesToolSyntax
from glm_core.protocol import ModelSpec, OutputSpec, SamplingParams

# PROMPT.md's tool-calling example (its parameters written as JSON: the document's trailing commas are Python's).
WEATHER = {
    "name": "get_current_weather",
    "description": "Get the current weather in a given location",
    "parameters": {
        "type": "object",
        "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string"},
        },
        "required": ["location"],
    },
}
PROMPT_MD_TOOL_CALL = (
    "<|system|>\n"
    "Answer the following questions as best as you can. You have access to the following tools:\n"
    + json.dumps([WEATHER], indent=4, ensure_ascii=False)
    + "<|user|>\nWhat's the weather in Beijing today?"
    "<|assistant|>\nOkay, let's look up the weather in Bejing today."
    '<|assistant|>get_current_weather\n```python\ntool_call(location="beijing", unit="celsius")\n```'
    '<|observation|>\n{"temperature": 22}'
    "<|assistant|>"
)
# A tool for tiny random models: every value bounded, so a constrained call always ends.
BOUNDED = {
    "name": "get_weather",
    "description": "the weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit"],
    },
}


def test_chatglm3_renders_prompt_md_tool_example(glm3):
    folder, _config, _sd = glm3
    tokenizer = ChatGLMTokenizer(folder / "tokenizer.model", "chatglm3")
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "What's the weather in Beijing today?"},
        {
            "role": "assistant",
            "content": "Okay, let's look up the weather in Bejing today.",
            "tool_calls": [{"id": "call_1", "name": "get_current_weather", "arguments": PARSED_CALL}],
        },
        {"role": "tool", "content": '{"temperature": 22}', "tool_call_id": "call_1", "name": "get_current_weather"},
    ]
    ids = ChatGLM3Format(tokenizer).encode(messages, tools=[WEATHER])
    # The documented text, tokenized as ChatGLM3's build_single_message does: per `<|role|>{metadata}\n{content}`,
    # the role's token, encode("{metadata}\n"), encode(content).
    expected = list(tokenizer.prefix_ids)
    for role, segment in re.findall(r"(<\|\w+\|>)([^<]*(?:<(?!\|)[^<]*)*)", PROMPT_MD_TOOL_CALL):
        metadata, _, content = segment.partition("\n")
        expected += [tokenizer.command(role)]
        if segment or role != "<|assistant|>":
            expected += tokenizer.encode(f"{metadata}\n") + tokenizer.encode(content)
    assert ids == expected


PARSED_CALL = '{"location": "beijing", "unit": "celsius"}'


def test_chatglm3_reads_a_call_as_the_original_process_response_did():
    reply = 'get_current_weather\n```python\ntool_call(location="beijing", unit="celsius")\n```'
    content, calls = ChatGLM3ToolSyntax().parse(reply, [WEATHER])
    assert content == "" and calls == [{"name": "get_current_weather", "arguments": PARSED_CALL}]
    # tool_using/README.md's `track` tool; Python literals (True, None) and JSON's (true, null) both read back.
    track = {"name": "track", "parameters": {"type": "object", "properties": {"symbol": {}}}}
    _, calls = ChatGLM3ToolSyntax().parse(
        'track\n```python\ntool_call(symbol="10111", live=True, extra=null)\n```', [track]
    )
    assert json.loads(calls[0]["arguments"]) == {"symbol": "10111", "live": True, "extra": None}
    # Never run: a call that is not literals is text.
    assert ChatGLM3ToolSyntax().parse('track\n```python\ntool_call(symbol=__import__("os"))\n```', [track])[1] == []
    # Plain replies and unknown names stay text.
    assert ChatGLM3ToolSyntax().parse("Hello there.\nHow can I help?", [WEATHER]) == (
        "Hello there.\nHow can I help?",
        [],
    )
    assert ChatGLM3ToolSyntax().parse("other\n```python\ntool_call()\n```", [WEATHER])[1] == []


def test_chatglm3_call_is_written_back_as_the_model_wrote_it():
    metadata, content = ChatGLM3ToolSyntax.call_text({"name": "get_current_weather", "arguments": PARSED_CALL})
    assert (metadata, content) == (
        "get_current_weather",
        '```python\ntool_call(location="beijing", unit="celsius")\n```',
    )


# glm-4-9b-chat's chat template, less its built-in python/simple_browser/cogview tools.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，你的任务是针对用户的问题"
    "和要求提供适当的答复和支持。\n\n# 可用工具{% set tools = item['tools'] %}{% for tool in tools %}"
    "{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}"
    "{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BOOKS = {
    "name": "get_recommended_books",
    "description": "Get recommended books based on user's interests",
    "parameters": {
        "type": "object",
        "properties": {
            "interests": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The interests to recommend books for",
            }
        },
        "required": ["interests"],
    },
}


def test_glm4_template_renders_tools_calls_and_observations(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = GLM4_TEMPLATE
    fmt = TemplateChatFormat(tokenizer, {2})
    assert isinstance(fmt.tool_syntax, GLM4ToolSyntax)
    arguments = '{"interests": ["history", "science fiction"]}'
    messages = [
        {"role": "user", "content": "Hi, I am looking for some book recommendations."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c", "name": BOOKS["name"], "arguments": arguments}],
        },
        {"role": "tool", "content": '{"books": ["Dune"]}', "name": BOOKS["name"], "tool_call_id": "c"},
    ]
    shaped = fmt.template_messages(messages, [BOOKS])
    # As the rendering documented for glm-4-9b-chat shows it (transformers' Jinja trims a block tag's newline).
    text = tokenizer.apply_chat_template(shaped, add_generation_prompt=True, tokenize=False)
    assert text == (
        "[gMASK]<sop><|system|>\n你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
        "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n## get_recommended_books\n\n"
        + json.dumps(BOOKS, indent=4, ensure_ascii=False)
        + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
        "<|user|>\nHi, I am looking for some book recommendations."
        f"<|assistant|>get_recommended_books\n{arguments}"
        '<|observation|>\n{"books": ["Dune"]}<|assistant|>'
    )
    content, calls = fmt.tool_syntax.parse(f"get_recommended_books\n{arguments}", [BOOKS])
    assert content == "" and calls == [{"name": "get_recommended_books", "arguments": arguments}]
    assert fmt.tool_syntax.parse("Here are some books.", [BOOKS]) == ("Here are some books.", [])


def test_hermes_blocks_parse_and_a_template_without_tools_is_told_of_them(tiny_model_dir):
    from transformers import AutoTokenizer

    syntax = HermesToolSyntax()
    reply = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert syntax.parse(reply, [BOUNDED]) == (
        "Let me look.",
        [{"name": "get_weather", "arguments": '{"city": "Paris"}'}],
    )
    assert syntax.parse('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', [BOUNDED])[1] == []
    fmt = TemplateChatFormat(AutoTokenizer.from_pretrained(tiny_model_dir), {2})  # SmolLM2's template: no tools
    text = fmt.tokenizer.decode(fmt.encode([{"role": "user", "content": "hi"}], tools=[BOUNDED]))
    assert "<tools>" in text and '"name": "get_weather"' in text and text.index("<tools>") < text.index("user\nhi")


def forced(engine, tool, choice, seed, **output):
    request = engine.submit(
        f"forced-{seed}-{choice}",
        [{"role": "user", "content": "What is the weather in Paris?"}],
        SamplingParams(max_new_tokens=120, temperature=1.0, top_p=1.0, seed=seed),
        output=OutputSpec(tools=[tool], tool_choice=choice, **output),
    )
    return request.wait(120)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_forced_call_parses_against_its_schema_on_a_random_model(engine, seed):
    reply = forced(engine, BOUNDED, "required" if seed % 2 else "get_weather", seed, parallel_tool_calls=False)
    assert reply.error is None and reply.finish_reason == "eos", reply
    content, calls = engine.tool_syntax.parse(reply.text, [BOUNDED])
    assert content == "" and [c["name"] for c in calls] == ["get_weather"], reply.text
    jsonschema.validate(json.loads(calls[0]["arguments"]), BOUNDED["parameters"])


def test_json_schema_output_on_a_random_model_and_free_rows_beside_it(engine):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 8}, "score": {"type": "integer", "maximum": 9}},
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_new_tokens=60, temperature=1.0, top_p=1.0, seed=5)
    free = engine.submit("free-row", [{"role": "user", "content": "hello"}], params)
    constrained = engine.submit(
        "json-row", [{"role": "user", "content": "hello"}], params, output=OutputSpec(json_schema=schema)
    )
    free_reply, reply = free.wait(120), constrained.wait(120)
    jsonschema.validate(json.loads(reply.text), schema)
    assert free_reply.finish_reason == "length" and not free_reply.text.startswith("{")


def test_chatglm3_forced_call_on_a_random_checkpoint(glm3):
    folder, _config, _sd = glm3
    engine = Engine(load_model(ModelSpec(str(folder), "fp32", "cpu")))
    try:
        reply = engine.submit(
            "glm3-forced",
            [{"role": "user", "content": "weather?"}],
            SamplingParams(max_new_tokens=120, temperature=1.0, top_p=1.0, seed=3),
            output=OutputSpec(tools=[WEATHER, BOUNDED], tool_choice="get_weather"),
        ).wait(120)
        assert reply.error is None, reply.error
        assert reply.text.startswith('get_weather\n```python\ntool_call(city="'), reply.text
        content, calls = ChatGLM3ToolSyntax().parse(reply.text, [WEATHER, BOUNDED])
        assert content == "" and calls[0]["name"] == "get_weather", reply.text
        jsonschema.validate(json.loads(calls[0]["arguments"]), BOUNDED["parameters"])
    finally:
        engine.close()


def test_bad_output_requests_are_refused_before_queuing(engine, glm2):
    with pytest.raises(ValueError, match="not among the tools"):
        engine.submit("x", [{"role": "user", "content": "hi"}], output=OutputSpec(tools=[BOUNDED], tool_choice="nope"))
    with pytest.raises(ValueError, match="top_logprobs"):
        engine.submit("x", [{"role": "user", "content": "hi"}], output=OutputSpec(top_logprobs=21))
    folder, _config, _sd = glm2
    glm2_engine = Engine(load_model(ModelSpec(str(folder), "fp32", "cpu")))
    try:
        with pytest.raises(ValueError, match="not trained for tool calls"):
            glm2_engine.submit("x", [{"role": "user", "content": "hi"}], output=OutputSpec(tools=[BOUNDED]))
    finally:
        glm2_engine.close()


def test_a_stream_holds_back_only_what_may_still_be_a_call():
    hermes, glm4 = HermesToolSyntax(), GLM4ToolSyntax()
    assert hermes.streamable("Sure, let me check.", [BOUNDED]) == len("Sure, let me check.")
    assert hermes.streamable("Sure. <tool", [BOUNDED]) == len("Sure. ")
    assert hermes.streamable('Sure. <tool_call>\n{"name": "get_weather"', [BOUNDED]) == len("Sure. ")
    assert hermes.streamable("a < b", [BOUNDED]) == len("a < b")
    assert glm4.streamable("get_wea", [BOUNDED]) == 0  # may be the name line of a call
    assert glm4.streamable('get_weather\n{"city"', [BOUNDED]) == 0
    assert glm4.streamable("get wet", [BOUNDED]) == len("get wet")
    assert glm4.streamable("Hello", [BOUNDED]) == len("Hello")


def test_a_row_whose_grammar_fails_ends_alone(engine, monkeypatch):
    """Fault injection: without its mask, a constrained row samples tokens its grammar refuses; that row ends with
    the grammar's error and the free row decoding beside it in the same batch is untouched."""
    from glm_core.engine.constraints import Constraint

    monkeypatch.setattr(Constraint, "mask", lambda self, logits: logits)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=7)
    free = engine.submit("beside-a-failure", [{"role": "user", "content": "hello"}], params)
    doomed = engine.submit(
        "failing-grammar", [{"role": "user", "content": "hello"}], params, output=OutputSpec(json_schema={})
    )
    failed, fine = doomed.wait(120), free.wait(120)
    assert failed.finish_reason == "error" and "grammar" in failed.error
    assert fine.error is None and fine.finish_reason == "length" and fine.stats.completion_tokens == 12


def test_chatglm3_text_then_a_call_in_one_reply_as_prompt_md_shows(glm3):
    """PROMPT.md's assistant says something, then opens a new assistant turn for the call. With tools the reply's
    role tokens are written by name, so the call is read back and the text before it is its content."""
    from glm_core.engine.textstream import IncrementalDecoder

    folder, _config, _sd = glm3
    tokenizer = ChatGLMTokenizer(folder / "tokenizer.model", "chatglm3")
    call = 'get_current_weather\n```python\ntool_call(location="beijing", unit="celsius")\n```'
    ids = (
        tokenizer.encode("\nOkay, let's look up the weather in Bejing today.")
        + [tokenizer.command("<|assistant|>")]
        + tokenizer.encode(call)
    )
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=False)
    text = ("".join(decoder.push(i) for i in ids) + decoder.flush()).lstrip()
    content, calls = ChatGLM3ToolSyntax().parse(text, [WEATHER])
    assert content == "Okay, let's look up the weather in Bejing today."
    assert calls == [{"name": "get_current_weather", "arguments": PARSED_CALL}]
    assert ChatGLM3ToolSyntax().streamable(text, [WEATHER]) == text.index("<|assistant|>")


TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def several_forced(engine, seeds, parallel: bool) -> list[list[dict]]:
    """Each seed's calls (a forced reply of the random model, any of two tools), each checked against its
    function's schema."""
    schemas = {"get_weather": BOUNDED["parameters"], "get_time": TIME["parameters"]}
    found = []
    for seed in seeds:
        reply = engine.submit(
            f"several-{seed}-{parallel}",
            [{"role": "user", "content": "Weather?"}],
            SamplingParams(max_new_tokens=200, temperature=1.0, top_p=1.0, seed=seed),
            output=OutputSpec(tools=[BOUNDED, TIME], tool_choice="required", parallel_tool_calls=parallel),
        ).wait(120)
        assert reply.error is None and reply.finish_reason == "eos", reply
        content, calls = engine.tool_syntax.parse(reply.text, [BOUNDED, TIME])
        assert content == "" and calls, reply.text
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
        found.append(calls)
    return found


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_parallel_forced_calls_are_one_or_more_and_one_without(engine):
    """Hermes blocks (the tiny model's template): with parallel_tool_calls one or more `<tool_call>` blocks, one per
    line; without, exactly one."""
    several = several_forced(engine, range(8), parallel=True)
    assert max(len(calls) for calls in several) >= 2 and min(len(calls) for calls in several) == 1
    single = several_forced(engine, range(8), parallel=False)
    assert all(len(calls) == 1 for calls in single)


def test_glm4_parallel_forced_calls_open_a_turn_each(tmp_path):
    """GLM-4's format: each further call opens a new assistant turn (`<|assistant|>{name}`), written by the special
    token under the grammar and read back call by call."""
    from glm_family_fixtures import write_glm_folder

    engine = Engine(load_model(ModelSpec(str(write_glm_folder(tmp_path / "glm", "glm")), "fp32", "cpu")))
    try:
        several = several_forced(engine, range(12), parallel=True)
        twice = [seed for seed, calls in enumerate(several) if len(calls) >= 2]
        assert twice, [len(calls) for calls in several]
        # the same seeds without parallel calls: the grammar ends the turn after the first
        assert [len(calls) for calls in several_forced(engine, twice, parallel=False)] == [1] * len(twice)
    finally:
        engine.close()


def test_chatglm3_grammar_takes_several_calls_each_in_its_own_turn(glm3):
    """ChatGLM3's format under the forced-call grammar, driven token by token: a second call after <|assistant|>
    is accepted with parallel_tool_calls and refused without, and the turn may end after any call."""
    import torch

    from glm_core.engine.constraints import Constraint, SentencePieceVocabulary, grammar_for

    folder, _config, _sd = glm3
    loaded = load_model(ModelSpec(str(folder), "fp32", "cpu"))
    tokenizer, chat_format = loaded.tokenizer, loaded.chat_format
    vocabulary = loaded.model.get_output_embeddings().weight.shape[0]
    pieces = SentencePieceVocabulary(tokenizer, vocabulary)
    [assistant] = [i for i, name in tokenizer.special_names.items() if name == "<|assistant|>"]
    first = "get_time\n```python\ntool_call()\n```"
    second = 'get_weather\n```python\ntool_call(city="Paris", unit="celsius")\n```'
    for parallel in (True, False):
        grammar = grammar_for(
            OutputSpec(tools=[BOUNDED, TIME], tool_choice="required", parallel_tool_calls=parallel), chat_format
        )
        constraint = Constraint(grammar, tokenizer, vocabulary, chat_format.stop_token_ids)
        for token in pieces(first):
            constraint.accept(token)
        allowed = set((constraint.mask(torch.zeros(vocabulary)) > float("-inf")).nonzero().flatten().tolist())
        if not parallel:
            assert constraint.finished  # one call: the reply ends here
            continue
        assert allowed == set(chat_format.stop_token_ids) | {assistant}  # end the turn, or open the next call
        for token in [assistant, *pieces(second)]:
            constraint.accept(token)
        allowed = set((constraint.mask(torch.zeros(vocabulary)) > float("-inf")).nonzero().flatten().tolist())
        assert allowed == set(chat_format.stop_token_ids) | {assistant}
    content, calls = ChatGLM3ToolSyntax().parse(f"{first}<|assistant|>{second}", [BOUNDED, TIME])
    assert content == "" and [c["name"] for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1]["arguments"]) == {"city": "Paris", "unit": "celsius"}
