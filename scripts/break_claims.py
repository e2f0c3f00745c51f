"""Break one of the README's claims at a time, in a throwaway copy of the committed tree, and run the test that
guards it: each must fail. `.venv/bin/python scripts/break_claims.py [N ...]` (all, or mutations N); prints one
line per mutation. A line saying PASSES is a test that misses its claim."""

import os
import pathlib
import subprocess
import sys
import tempfile

PROJECT = pathlib.Path(__file__).resolve().parent.parent
MUTATIONS = [
    (
        "kept cache reuses one token too many",
        "glm_core/engine/runner.py",
        "reused = min(reusable(kept.tokens, ids), len(ids) - 1)",
        "reused = min(reusable(kept.tokens, ids) + 1, len(ids) - 1)",
        ["tests/test_against_transformers.py::test_kept_cache_turns_equal_generate_on_the_whole_history"],
    ),
    (
        "batched rows attend past their own length",
        "glm_core/engine/kv_slots.py",
        "mask = torch.arange(self._kv_len, device=self.device)[None, :] <= self._positions[:, None]",
        "mask = torch.arange(self._kv_len, device=self.device)[None, :] <= longest + 0 * self._positions[:, None]",
        ["tests/test_against_transformers.py::test_batched_replies_equal_generate_alone"],
    ),
    (
        "ChatGLM-6B residual scale off by 1 %",
        "glm_core/models/chatglm/glm6b.py",
        "self.alpha = math.sqrt(2 * ORIGINAL_ALPHA_LAYERS)",
        "self.alpha = math.sqrt(2 * ORIGINAL_ALPHA_LAYERS) * 1.01",
        ["tests/test_reference_fidelity.py", "-k", "logits_equal"],
    ),
    (
        "every client counts as this machine (anyone on the network is admin)",
        "glm_core/access.py",
        'return ip.is_loopback if ip is not None else address == "localhost"',
        "return True",
        ["tests/test_access.py", "-k", "client_addresses or this_machines"],
    ),
    (
        "model text reaches Markdown unescaped",
        "glm_core/safe_markdown.py",
        'return _MARKDOWN_SPECIALS.sub(r"\\\\\\1", str(text))',
        "return str(text)",
        ["tests/test_conversations_ui.py::test_html_in_messages_and_titles_renders_as_text_on_every_page"],
    ),
    (
        "a share link skips the access password",
        "ui/frame.py",
        "        require_signed_in()\n",
        "        pass\n",
        ["tests/test_conversations_ui.py::test_the_access_password_guards_share_links_too"],
    ),
    (
        "INT4 leaves every layer in float",
        "glm_core/models/quant.py",
        "    if WeightOnlyInt4Linear.supports(linear.in_features, group_size):",
        "    if False:",
        ["tests/test_quant.py::test_embedded_weights_shrink_as_promised"],
    ),
    (
        "a pre-quantized ChatGLM-6B INT4 requantized with the nibbles swapped",
        "glm_core/models/quant.py",
        "        q, scales_and_zeros = quantize_int4(weight, self.group_size)",
        "        q, scales_and_zeros = quantize_int4(weight, self.group_size)\n        q = 15 - q",
        ["tests/test_chatglm6b.py", "-k", "prequantized"],
    ),
]


def main(which: list[str]) -> int:
    missed = 0
    with tempfile.TemporaryDirectory() as temp:
        root = pathlib.Path(temp) / "tree"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(root), "HEAD"], cwd=PROJECT, check=True)
        (root / ".venv").symlink_to(PROJECT / ".venv")
        try:
            for number, (what, path, old, new, test) in enumerate(MUTATIONS):
                if which and str(number) not in which:
                    continue
                missed += not check(root, number, what, path, old, new, test)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(root)], cwd=PROJECT, check=True)
    return 1 if missed else 0


def check(root, number, what, path, old, new, test) -> bool:
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, check=True)
    file = root / path
    text = file.read_text()
    assert old in text, (what, old)
    file.write_text(text.replace(old, new, 1))
    done = subprocess.run(
        [str(root / ".venv/bin/python"), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *test],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    summary = [line for line in done.stdout.splitlines() if " passed" in line or " failed" in line][-1:]
    verdict = "FAILS (good)" if done.returncode else "PASSES (the test misses it)"
    print(f"[{number}] {what}: {' '.join(test)} -> {verdict} {summary}", flush=True)
    return done.returncode != 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
