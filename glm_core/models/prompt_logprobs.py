"""The log probability of each token of a prompt under the loaded model, given the tokens before it (what
`/v1/completions` returns with `echo` and `logprobs`, as OpenAI's legacy API did, for evaluation harnesses that
score a text).

The work runs on the engine's worker thread (Engine.run_on_worker), one slice at a time over a cache, so replies
being decoded get a step between two slices; each slice's logits are the model's own forward (the same call the
engine's prefill makes), log-softmaxed in float32. A model whose prompt attends both ways (ChatGLM-6B,
`prefill_whole_prompt`) reads its prompt in one forward, as the engine feeds it.
"""

from __future__ import annotations

import torch

from .loading import LoadedModel

# Tokens one slice reads: its logits are SLICE_TOKENS x the vocabulary in float32 (151,552 for GLM-4: 155 MB).
SLICE_TOKENS = 256


class PromptLogprobsJob:
    """Each token's logprob given the ones before it (None for the first, which has nothing before it) and the
    `top` most likely tokens at its position ([] for the first), computed one slice per `step`."""

    def __init__(self, token_ids: list[int], top: int):
        if not token_ids:
            raise ValueError("the prompt is empty")
        self.token_ids = list(token_ids)
        self.top_count = top
        self.logprobs: list[float | None] = [None]
        self.top: list[list[tuple[int, float]]] = [[]]
        self._done = 0
        self._cache = None

    @property
    def done(self) -> bool:
        return self._done >= len(self.token_ids)

    @torch.inference_mode()
    def step(self, loaded: LoadedModel) -> bool:
        """Read one slice of the prompt; True once every token has its logprob."""
        from transformers import DynamicCache

        if self.done:
            return True
        model = loaded.model
        if self._cache is None:
            vocab_size = model.get_input_embeddings().num_embeddings
            if min(self.token_ids) < 0 or max(self.token_ids) >= vocab_size:
                raise ValueError(f"the prompt has a token id outside the model's vocabulary (0 to {vocab_size - 1})")
            self._cache = DynamicCache(config=model.config)
        whole = getattr(model, "prefill_whole_prompt", False)
        end = len(self.token_ids) if whole else min(self._done + SLICE_TOKENS, len(self.token_ids))
        chunk = torch.tensor([self.token_ids[self._done : end]], dtype=torch.long, device=loaded.device)
        logits = model(input_ids=chunk, past_key_values=self._cache, use_cache=True).logits[0]
        # Position i predicts token i + 1: the slice scores the tokens after each of its own (the last one's
        # prediction scores the next slice's first token).
        following = torch.tensor(self.token_ids[self._done + 1 : end + 1], dtype=torch.long, device=logits.device)
        rows = torch.log_softmax(logits[: len(following)].float(), dim=-1)
        chosen = rows.gather(1, following[:, None])[:, 0].clamp(min=-9999.0).tolist()
        self.logprobs.extend(chosen)
        if self.top_count:
            values, indices = torch.topk(rows, self.top_count, dim=-1)
            self.top.extend(list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist()))
        else:
            self.top.extend([] for _ in chosen)
        self._done = end
        if self.done:
            self._cache = None
        return self.done


def prompt_logprobs(loaded: LoadedModel, token_ids: list[int], top: int = 0) -> PromptLogprobsJob:
    """All slices at once (for callers with the model to themselves: the benchmarks, the tests)."""
    job = PromptLogprobsJob(token_ids, top)
    while not job.step(loaded):
        pass
    return job
