"""The ChatGLM-6B (first generation) tokenizer, "ice_text", on plain `sentencepiece` (no remote code).

As THUDM/chatglm-6b's tokenization_chatglm.py (SPTokenizer and its HF wrapper):
- before SentencePiece, text is rewritten: "\\n" -> "<n>", "\\t" -> "<|tab|>", each run of 2..80 spaces ->
  "<|blank_N|>" (longest runs first); decoding rewrites them back;
- ids are piece ids plus `num_image_tokens` (tokenizer_config.json: 0 in the current checkpoints, 20000 in the
  first release and as the class default);
- the special tokens ([MASK] [gMASK] <sop> <eop>) are pieces of ice_text.model; the model reads their ids from
  config.json, so the loader checks that both agree (a stale num_image_tokens shows up here);
- a prompt is encode(text) + [gMASK] <sop> (build_inputs_with_special_tokens); "你好" -> 5, 74874, 130001, 130004
  on the real vocabulary (chatglm.cpp's tests);
- decoding drops the special ids and the ids below num_image_tokens and decodes the rest in one run.
"""

from __future__ import annotations

import re
from pathlib import Path

import sentencepiece as spm

MAX_BLANK = 80
SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
DEFAULT_NUM_IMAGE_TOKENS = 20000  # the original class default, used when tokenizer_config.json does not say
_BLANKS = re.compile(r"<\|blank_(\d+)\|>")
_SPACE_RUNS = re.compile(" {2,}")


def preprocess(text: str) -> str:
    """The original _preprocess: newline, tab and runs of 2..80 spaces as their pieces."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")

    def blanks(match: re.Match) -> str:  # the original replaces runs of 80 first, then 79 ... 2
        n = len(match.group())
        return f"<|blank_{MAX_BLANK}|>" * (n // MAX_BLANK) + (
            f"<|blank_{n % MAX_BLANK}|>" if n % MAX_BLANK > 1 else " " * (n % MAX_BLANK)
        )

    return _SPACE_RUNS.sub(blanks, text)


def postprocess(text: str) -> str:
    """The original postprocess: the pieces back to newline, tab and spaces."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return _BLANKS.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= MAX_BLANK else m.group(), text)


class TokenizerMismatch(ValueError):
    """ice_text.model, tokenizer_config.json and config.json disagree on the special ids."""


class IceTokenizer:
    def __init__(
        self,
        model_file: str | Path,
        num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS,
        special_ids: dict[str, int] | None = None,
        pad_token_id: int | None = None,
        remove_space: bool = False,
        do_lower_case: bool = False,
    ):
        """`special_ids`: config.json's ids by piece name ({"[MASK]": mask_token_id, "[gMASK]": ..., "<sop>":
        bos_token_id, "<eop>": eos_token_id}); the other special pieces get their piece id + num_image_tokens."""
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.n_pieces = self.sp.get_piece_size()
        self.num_image_tokens = num_image_tokens
        self.remove_space, self.do_lower_case = remove_space, do_lower_case
        self.special_ids: dict[str, int] = {}
        for name in SPECIAL_PIECES:
            piece = self.sp.piece_to_id(name)
            if self.sp.id_to_piece(piece) == name:
                self.special_ids[name] = piece + num_image_tokens
        for name, configured in (special_ids or {}).items():
            own = self.special_ids.get(name)
            if own is not None and own != configured:
                raise TokenizerMismatch(
                    f"config.json gives {name} id {configured}, but ice_text.model with num_image_tokens "
                    f"{num_image_tokens} gives {own}"
                )
            self.special_ids[name] = int(configured)
        missing = [n for n in ("[gMASK]", "<sop>", "<eop>") if n not in self.special_ids]
        if missing:
            raise TokenizerMismatch(f"neither ice_text.model nor config.json has {', '.join(missing)}")
        self.special_names = {i: name for name, i in self.special_ids.items()}
        self.bos_token_id = self.special_ids["<sop>"]
        self.eos_token_id = self.special_ids["<eop>"]
        self.eos_token = "<eop>"
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return self.n_pieces + self.num_image_tokens

    def command(self, name: str) -> int:
        return self.special_ids[name]

    @property
    def suffix_ids(self) -> list[int]:
        """What the original tokenizer appends to every prompt: [gMASK] <sop>."""
        return [self.special_ids["[gMASK]"], self.special_ids["<sop>"]]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (with the dummy-prefix piece, as the original SPTokenizer.encode), no special tokens."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return [i + self.num_image_tokens for i in self.sp.encode(preprocess(text))]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.encode(text)
        return {"input_ids": (ids + self.suffix_ids) if add_special_tokens else ids}

    def _text(self, ids: list[int]) -> str:
        return postprocess(self.sp.decode([i - self.num_image_tokens for i in ids]))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Special ids (and pad, and ids below num_image_tokens) dropped, the rest decoded in one run. With
        skip_special_tokens=False the special tokens' names are written where they stand instead."""
        upper = self.n_pieces + self.num_image_tokens
        ids = [int(x) for x in ids]
        if skip_special_tokens:
            return self._text(
                [
                    i
                    for i in ids
                    if self.num_image_tokens <= i < upper and i not in self.special_names and i != self.pad_token_id
                ]
            )
        out, run = [], []
        for i in ids:
            if i in self.special_names or not self.num_image_tokens <= i < upper:
                if run:
                    out.append(self._text(run))
                    run = []
                out.append(self.special_names.get(i, ""))
            else:
                run.append(i)
        if run:
            out.append(self._text(run))
        return "".join(out)
