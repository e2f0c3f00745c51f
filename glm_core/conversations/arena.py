"""Side-by-side comparisons and blind votes: one prompt answered by 2-4 configurations (a model at a precision
level, another local model, a remote backend), the replies with their figures, and which one a person preferred.

A comparison belongs to the workspace that made it (like a conversation: no other workspace reads it). The votes
are the team's: the ranking counts every workspace's votes, as the benchmark history is shared. One SQLite file
beside the conversation store, a connection per operation (safe across threads and processes).

The ranking is Bradley-Terry (what Chatbot Arena reports): each configuration has a strength theta, and
P(i beats j) = 1 / (1 + exp(theta_j - theta_i)). choix fits it (ILSR, Maystre & Grossglauser 2015); a tie counts
as half a win each way (Chatbot Arena's convention). Scores are on the Elo scale, 1000 + 400 * log10(e) * theta,
and their 95 % intervals come from refitting on votes resampled with replacement (the bootstrap).
"""

from __future__ import annotations

import csv
import io
import json
import math
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..settings import load_settings

DB_NAME = "arena.sqlite3"
MIN_COLUMNS, MAX_COLUMNS = 2, 4
CONFIG_MAX_CHARS = 200
PROMPT_MAX_CHARS = 100_000
BOOTSTRAP_ROUNDS = 200
ELO_BASE, ELO_SCALE = 1000.0, 400.0 / math.log(10)  # theta -> Elo points: 1000 + 400 * log10(e^theta)
REGULARIZATION = 0.01  # choix's alpha: keeps a configuration that never won (or never lost) at a finite score
TIE = "tie"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id TEXT PRIMARY KEY,
    workspace TEXT NOT NULL,
    prompt TEXT NOT NULL,
    blind INTEGER NOT NULL,
    columns TEXT NOT NULL,          -- JSON: [{"config", "text", "model", "precision", "stats", "error"}, ...]
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_by_workspace ON comparisons(workspace, created_at DESC);
CREATE TABLE IF NOT EXISTS votes (
    comparison_id TEXT NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
    workspace TEXT NOT NULL,
    config_a TEXT NOT NULL,         -- the pair in sorted order: config_a < config_b
    config_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    created_at REAL NOT NULL,
    PRIMARY KEY (comparison_id, config_a, config_b)
);
CREATE INDEX IF NOT EXISTS votes_by_workspace ON votes(workspace);
"""


@dataclass
class Column:
    """One configuration's reply in a comparison."""

    config: str  # what was compared, as the page names it: "SmolLM2-135M-Instruct · INT4", "remote: vllm"
    text: str = ""
    model: str | None = None
    precision: str | None = None
    stats: dict = field(default_factory=dict)  # tokens, ttft_s, tokens/s, memory bytes: the reply's figures
    error: str | None = None


@dataclass
class Vote:
    config_a: str
    config_b: str
    winner: str  # "a", "b" or "tie"
    workspace: str = ""
    comparison_id: str = ""
    created_at: float = 0.0


@dataclass
class Comparison:
    id: str
    prompt: str
    columns: list[Column]
    blind: bool
    created_at: float
    votes: list[Vote] = field(default_factory=list)

    @property
    def best(self) -> str | None:
        """The configuration the vote picked; "tie"; or None before a vote."""
        if not self.votes:
            return None
        wins = {c.config: 0 for c in self.columns}
        for v in self.votes:
            if v.winner != TIE:
                wins[v.config_a if v.winner == "a" else v.config_b] += 1
        top = max(wins.values())
        return TIE if top == 0 else next(c for c, w in wins.items() if w == top)


class ArenaError(ValueError):
    """A comparison or vote the arena refuses; the message says why."""


class Arena:
    def __init__(self, data_dir: Path | str | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else load_settings().data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            with db:
                yield db
        finally:
            db.close()

    def save_comparison(self, workspace: str, prompt: str, columns: Sequence[Column], blind: bool) -> str:
        if not MIN_COLUMNS <= len(columns) <= MAX_COLUMNS:
            raise ArenaError(f"a comparison has {MIN_COLUMNS} to {MAX_COLUMNS} columns, not {len(columns)}")
        configs = [c.config for c in columns]
        if len(set(configs)) != len(configs):
            raise ArenaError("each column must be a different configuration")
        if any(not c.strip() or len(c) > CONFIG_MAX_CHARS for c in configs):
            raise ArenaError(f"a configuration's name must have 1 to {CONFIG_MAX_CHARS} characters")
        if not prompt.strip() or len(prompt) > PROMPT_MAX_CHARS:
            raise ArenaError(f"the prompt must have 1 to {PROMPT_MAX_CHARS} characters")
        comparison_id = secrets.token_hex(8)
        with self._connect() as db:
            db.execute(
                "INSERT INTO comparisons (id, workspace, prompt, blind, columns, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (comparison_id, workspace, prompt, int(blind), json.dumps([asdict(c) for c in columns]), time.time()),
            )
        return comparison_id

    def vote(self, workspace: str, comparison_id: str, best: str | None) -> list[Vote]:
        """`best` is the configuration whose answer was better (it beats every other column), or None for a tie
        (every pair ties). Voting again on the same comparison replaces the earlier vote."""
        comparison = self.comparison(workspace, comparison_id)
        if comparison is None:
            raise ArenaError("no such comparison in this workspace")
        configs = [c.config for c in comparison.columns]
        if best is not None and best not in configs:
            raise ArenaError(f"{best!r} is not one of this comparison's configurations")
        now = time.time()
        votes = []
        for i, first in enumerate(configs):
            for second in configs[i + 1 :]:
                a, b = sorted((first, second))
                if best is None:
                    winner = TIE
                elif best in (a, b):
                    winner = "a" if best == a else "b"
                else:
                    continue  # two answers the person did not pick between: no vote on that pair
                votes.append(Vote(a, b, winner, workspace, comparison_id, now))
        with self._connect() as db:
            db.execute("DELETE FROM votes WHERE comparison_id = ? AND workspace = ?", (comparison_id, workspace))
            db.executemany(
                "INSERT INTO votes (comparison_id, workspace, config_a, config_b, winner, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(v.comparison_id, v.workspace, v.config_a, v.config_b, v.winner, v.created_at) for v in votes],
            )
        return votes

    def comparison(self, workspace: str, comparison_id: str) -> Comparison | None:
        found = self.comparisons(workspace, ids=[comparison_id])
        return found[0] if found else None

    def comparisons(self, workspace: str, ids: Sequence[str] | None = None, limit: int = 1000) -> list[Comparison]:
        """This workspace's comparisons, newest first, each with its votes."""
        query = "SELECT id, prompt, blind, columns, created_at FROM comparisons WHERE workspace = ?"
        args: list = [workspace]
        if ids is not None:
            query += f" AND id IN ({', '.join('?' * len(ids))})"
            args += list(ids)
        with self._connect() as db:
            rows = db.execute(query + " ORDER BY created_at DESC LIMIT ?", (*args, limit)).fetchall()
            result = []
            for cid, prompt, blind, columns, created in rows:
                votes = [
                    Vote(a, b, w, workspace, cid, t)
                    for a, b, w, t in db.execute(
                        "SELECT config_a, config_b, winner, created_at FROM votes WHERE comparison_id = ? "
                        "AND workspace = ? ORDER BY config_a, config_b",
                        (cid, workspace),
                    )
                ]
                result.append(
                    Comparison(cid, prompt, [Column(**c) for c in json.loads(columns)], bool(blind), created, votes)
                )
        return result

    def votes(self, workspace: str | None = None) -> list[Vote]:
        """The votes of one workspace, or (None) the team's: every workspace's."""
        query = "SELECT config_a, config_b, winner, workspace, comparison_id, created_at FROM votes"
        with self._connect() as db:
            if workspace is None:
                rows = db.execute(query + " ORDER BY created_at").fetchall()
            else:
                rows = db.execute(query + " WHERE workspace = ? ORDER BY created_at", (workspace,)).fetchall()
        return [Vote(*row) for row in rows]

    def vote_counts(self) -> dict[str, int]:
        """Votes per workspace (pairwise votes: a pick among n columns counts n - 1)."""
        with self._connect() as db:
            return dict(db.execute("SELECT workspace, COUNT(*) FROM votes GROUP BY workspace").fetchall())


# ---- win rates and the ranking -----------------------------------------------------------------------------------


@dataclass
class PairRecord:
    config_a: str
    config_b: str
    a_wins: int = 0
    b_wins: int = 0
    ties: int = 0

    @property
    def votes(self) -> int:
        return self.a_wins + self.b_wins + self.ties

    @property
    def a_win_rate(self) -> float:
        """A's share of the pair's votes, a tie counting half."""
        return (self.a_wins + 0.5 * self.ties) / self.votes


def pair_records(votes: Sequence[Vote]) -> list[PairRecord]:
    pairs: dict[tuple[str, str], PairRecord] = {}
    for v in votes:
        record = pairs.setdefault((v.config_a, v.config_b), PairRecord(v.config_a, v.config_b))
        if v.winner == "a":
            record.a_wins += 1
        elif v.winner == "b":
            record.b_wins += 1
        else:
            record.ties += 1
    return sorted(pairs.values(), key=lambda r: (r.config_a, r.config_b))


@dataclass
class Rank:
    config: str
    score: float  # Elo scale
    ci_low: float
    ci_high: float
    votes: int
    wins: int
    losses: int
    ties: int

    @property
    def win_rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.votes if self.votes else 0.0


def _games(votes: Sequence[Vote], index: dict[str, int]) -> list[tuple[int, int]]:
    """(winner, loser) games for choix: a decisive vote is two games won, a tie one game won by each side."""
    games = []
    for v in votes:
        a, b = index[v.config_a], index[v.config_b]
        if v.winner == "a":
            games += [(a, b), (a, b)]
        elif v.winner == "b":
            games += [(b, a), (b, a)]
        else:
            games += [(a, b), (b, a)]
    return games


def _fit(count: int, games: list[tuple[int, int]]):
    import choix

    return choix.ilsr_pairwise(count, games, alpha=REGULARIZATION)


def ranking(votes: Sequence[Vote], rounds: int = BOOTSTRAP_ROUNDS, seed: int = 0) -> list[Rank]:
    """Bradley-Terry scores (Elo scale) with 95 % bootstrap intervals, best first."""
    import numpy as np

    if not votes:
        return []
    configs = sorted({c for v in votes for c in (v.config_a, v.config_b)})
    index = {c: i for i, c in enumerate(configs)}
    theta = _fit(len(configs), _games(votes, index))
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(rounds):
        picked = [votes[i] for i in rng.integers(0, len(votes), len(votes))]
        samples.append(_fit(len(configs), _games(picked, index)))
    low, high = np.percentile(np.array(samples), [2.5, 97.5], axis=0) if samples else (theta, theta)
    tally = {c: [0, 0, 0] for c in configs}  # wins, losses, ties
    for v in votes:
        if v.winner == TIE:
            tally[v.config_a][2] += 1
            tally[v.config_b][2] += 1
        else:
            winner, loser = (v.config_a, v.config_b) if v.winner == "a" else (v.config_b, v.config_a)
            tally[winner][0] += 1
            tally[loser][1] += 1
    ranks = [
        Rank(
            config,
            ELO_BASE + ELO_SCALE * float(theta[i]),
            ELO_BASE + ELO_SCALE * float(low[i]),
            ELO_BASE + ELO_SCALE * float(high[i]),
            sum(tally[config]),
            *tally[config],
        )
        for i, config in enumerate(configs)
    ]
    return sorted(ranks, key=lambda r: -r.score)


# ---- export ----------------------------------------------------------------------------------------------------

EXPORT_FORMAT_NAME = "glm-chat-dashboard/comparisons"
CSV_COLUMNS = (
    "comparison_id",
    "created_at",
    "blind",
    "prompt",
    "column",
    "config",
    "model",
    "precision",
    "text",
    "error",
    "completion_tokens",
    "ttft_s",
    "decode_tokens_per_s",
    "memory_bytes",
    "voted_best",
)


def export_comparisons(comparisons: Sequence[Comparison], fmt: str) -> bytes:
    """`json` (everything, with the pairwise votes) or `csv` (one row per reply; text cells cannot run as formulas)."""
    from .exchange import iso_time, spreadsheet_safe

    if fmt == "json":
        document = {
            "format": EXPORT_FORMAT_NAME,
            "version": 1,
            "exported_at": iso_time(time.time()),
            "comparisons": [
                {
                    "id": c.id,
                    "created_at": iso_time(c.created_at),
                    "blind": c.blind,
                    "prompt": c.prompt,
                    "columns": [asdict(col) for col in c.columns],
                    "votes": [{"config_a": v.config_a, "config_b": v.config_b, "winner": v.winner} for v in c.votes],
                    "best": c.best,
                }
                for c in comparisons
            ],
        }
        return json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")
    if fmt != "csv":
        raise ValueError(f"unknown export format {fmt!r}; choose json or csv")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in comparisons:
        for number, col in enumerate(c.columns, start=1):
            row = {
                "comparison_id": c.id,
                "created_at": iso_time(c.created_at),
                "blind": c.blind,
                "prompt": c.prompt,
                "column": number,
                "config": col.config,
                "model": col.model,
                "precision": col.precision,
                "text": col.text,
                "error": col.error,
                "voted_best": c.best,
                **{k: col.stats.get(k) for k in ("completion_tokens", "ttft_s", "decode_tokens_per_s", "memory_bytes")},
            }
            writer.writerow({k: "" if v is None else spreadsheet_safe(v) for k, v in row.items()})
    return buffer.getvalue().encode("utf-8")
