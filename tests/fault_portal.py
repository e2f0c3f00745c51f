"""A stand-in for the portal process in the kill -9 test: five chat turns streaming at once into the store, the
way the chat page runs them (start_turn, text_stream, finish), each delta echoed on stdout as a JSON line.

One engine per stream: the turns must all be streaming when the process is killed, whatever the scheduler's
batch size; what is tested is what the store keeps, not how the engine schedules.
"""

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glm_core import ModelSpec, SamplingParams  # noqa: E402
from glm_core.conversations.conversation import Conversation  # noqa: E402
from glm_core.conversations.store import Store  # noqa: E402
from glm_core.conversations.turn import start_turn  # noqa: E402
from glm_core.engine import Engine  # noqa: E402
from glm_core.models import load_model  # noqa: E402

lock = threading.Lock()


def say(event: dict) -> None:
    with lock:
        print(json.dumps(event), flush=True)


def stream(store: Store, engine: Engine, workspace: str, number: int) -> None:
    conversation = Conversation()
    turn = start_turn(
        store,
        engine,
        workspace,
        conversation,
        keep=0,
        prompt=f"Tell me a long story, number {number}",
        params=SamplingParams(max_length=4096, max_new_tokens=4000, temperature=0.8, seed=number),
    )
    say({"started": conversation.id, "prompt": f"Tell me a long story, number {number}"})
    for delta in turn.text_stream():
        say({"id": conversation.id, "delta": delta, "t": time.time()})
    turn.finish()
    say({"finished": conversation.id})


def main() -> None:
    data_dir, model_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    loaded = load_model(ModelSpec(model_dir, "fp32", "cpu"))
    store = Store(data_dir)
    workspace = store.create_workspace()
    threads = [threading.Thread(target=stream, args=(store, Engine(loaded), workspace, n)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()
