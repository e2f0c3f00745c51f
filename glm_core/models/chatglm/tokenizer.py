"""The ChatGLM2/ChatGLM3 tokenizer on plain `sentencepiece` (no remote code).

Special tokens follow the piece vocabulary: with n pieces, [MASK] [gMASK] [sMASK] sop eop take ids n..n+4, and
ChatGLM3 adds <|system|> <|user|> <|assistant|> <|observation|> at n+5..n+8. eos is 2, pad 0.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

CHATGLM2_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
EOS_ID, PAD_ID = 2, 0


class ChatGLMTokenizer:
    def __init__(self, model_file: str | Path, family: str = "chatglm3"):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.family = family
        self.n_pieces = self.sp.get_piece_size()
        names = CHATGLM2_SPECIALS + (CHATGLM3_ROLES if family == "chatglm3" else [])
        self.special_ids = {name: self.n_pieces + i for i, name in enumerate(names)}
        self.special_names = {i: name for name, i in self.special_ids.items()}
        self.eos_token_id = EOS_ID
        self.pad_token_id = PAD_ID
        self.eos_token = self.sp.id_to_piece(EOS_ID)

    def __len__(self) -> int:
        return self.n_pieces + len(self.special_ids)

    def command(self, name: str) -> int:
        return self.special_ids[name]

    @property
    def prefix_ids(self) -> list[int]:
        """What the original tokenizer put in front of every prompt."""
        return [self.special_ids["[gMASK]"], self.special_ids["sop"]]

    def encode(self, text: str) -> list[int]:
        """Plain SentencePiece ids (with the dummy-prefix piece, as the original SPTokenizer.encode)."""
        return list(self.sp.encode(text))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.encode(text)
        return {"input_ids": (self.prefix_ids + ids) if add_special_tokens else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """As the original tokenizer: special ids are dropped and every other id is decoded in one run, so a piece
        that follows a special id keeps its leading space ("A" <|user|> "▁B" -> "A B"). With
        skip_special_tokens=False the special tokens' names are written where they stand instead."""
        ids = [int(x) for x in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if 0 <= i < self.n_pieces])
        out, run = [], []
        for i in ids:
            if 0 <= i < self.n_pieces:
                run.append(i)
                continue
            if run:
                out.append(self.sp.decode(run))
                run = []
            out.append(self.special_names.get(i, ""))
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)
