"""Comparisons and blind votes: kept per workspace, counted for the team, ranked by Bradley-Terry."""

import csv
import io
import json
import math

import numpy as np
import pytest
from scipy.optimize import minimize

from glm_core.conversations.arena import (
    ELO_SCALE,
    Arena,
    ArenaError,
    Column,
    Vote,
    export_comparisons,
    pair_records,
    ranking,
)


def votes_of(a: str, b: str, a_wins: int, b_wins: int, ties: int = 0) -> list[Vote]:
    return [Vote(a, b, "a")] * a_wins + [Vote(a, b, "b")] * b_wins + [Vote(a, b, "tie")] * ties


def test_two_configurations_score_apart_by_the_log_odds():
    """Bradley-Terry's estimate for one pair is exact: theta_A - theta_B = ln(wins_A / wins_B); on the Elo scale
    8 wins to 2 is 400 * log10(4) = 240.8 points."""
    ranks = ranking(votes_of("INT4", "BF16", 2, 8))
    best, worst = ranks
    assert (best.config, worst.config) == ("BF16", "INT4")
    assert best.score - worst.score == pytest.approx(400 * math.log10(4), abs=1.0)
    assert (best.wins, best.losses, best.ties, best.votes) == (8, 2, 0, 10) and best.win_rate == 0.8
    for r in ranks:
        assert r.ci_low < r.score < r.ci_high  # ten votes leave a wide interval, around the estimate


def test_ranking_matches_the_maximum_likelihood_fit():
    """Three configurations, a known set of votes (ties as half a win each way): choix's scores equal a direct
    maximisation of the Bradley-Terry likelihood by scipy."""
    votes = votes_of("A", "B", 7, 3, 2) + votes_of("B", "C", 6, 2, 2) + votes_of("A", "C", 9, 1)
    ranks = ranking(votes, rounds=100)
    assert [r.config for r in ranks] == ["A", "B", "C"]
    assert [r.votes for r in ranks] == [22, 22, 20]

    wins = {("A", "B"): 7 + 1, ("B", "A"): 3 + 1, ("B", "C"): 6 + 1, ("C", "B"): 2 + 1, ("A", "C"): 9, ("C", "A"): 1}
    names = ["A", "B", "C"]

    def nll(theta):
        t = dict(zip(names, theta))
        return sum(n * np.logaddexp(0, t[loser] - t[winner]) for (winner, loser), n in wins.items())

    fit = minimize(nll, np.zeros(3)).x
    fit -= fit.mean()
    by_name = {r.config: (r.score - 1000) / ELO_SCALE for r in ranks}
    for name, theta in zip(names, fit):
        assert by_name[name] == pytest.approx(theta, abs=0.02)
    (ab, ac, bc) = pair_records(votes)
    assert (ab.config_a, ab.config_b, ab.a_wins, ab.b_wins, ab.ties, ab.votes) == ("A", "B", 7, 3, 2, 12)
    assert ab.a_win_rate == pytest.approx(8 / 12) and ac.a_win_rate == 0.9 and bc.votes == 10


def test_ties_only_leave_equal_scores():
    ranks = ranking(votes_of("X", "Y", 0, 0, 5))
    assert ranks[0].score == pytest.approx(ranks[1].score) == pytest.approx(1000)
    assert ranks[0].win_rate == 0.5


def columns(*configs):
    return [Column(c, f"answer of {c}", "SmolLM2", c, {"completion_tokens": 5}) for c in configs]


def test_votes_are_kept_per_workspace_and_counted_for_the_team(data_dir):
    arena = Arena()
    first = arena.save_comparison("ws-one", "Capital of France?", columns("BF16", "INT4"), blind=True)
    second = arena.save_comparison("ws-two", "Capital of Spain?", columns("BF16", "INT4", "INT8"), blind=False)
    (vote,) = arena.vote("ws-one", first, "BF16")
    assert (vote.config_a, vote.config_b, vote.winner, vote.workspace, vote.comparison_id) == (
        "BF16",
        "INT4",
        "a",
        "ws-one",
        first,
    )
    arena.vote("ws-two", second, "INT8")  # the pick beats both other columns: two pairwise votes
    assert arena.vote_counts() == {"ws-one": 1, "ws-two": 2}
    assert len(arena.votes()) == 3 and len(arena.votes("ws-one")) == 1
    assert {(v.config_a, v.config_b, v.winner) for v in arena.votes("ws-two")} == {
        ("BF16", "INT8", "b"),
        ("INT4", "INT8", "b"),
    }
    # one workspace neither reads nor votes on another's comparison
    assert arena.comparison("ws-two", first) is None and arena.comparisons("ws-two")[0].id == second
    with pytest.raises(ArenaError, match="no such comparison"):
        arena.vote("ws-two", first, "INT4")
    # voting again replaces the vote; a tie is a tie on every pair
    arena.vote("ws-two", second, None)
    assert {v.winner for v in arena.votes("ws-two")} == {"tie"} and len(arena.votes("ws-two")) == 3
    assert arena.comparison("ws-two", second).best == "tie" and arena.comparison("ws-one", first).best == "BF16"
    with pytest.raises(ArenaError, match="not one of"):
        arena.vote("ws-one", first, "FP32")
    ranks = {r.config: r for r in ranking(arena.votes())}
    assert ranks["BF16"].votes == 3 and ranks["BF16"].wins == 1 and ranks["BF16"].ties == 2


@pytest.mark.parametrize(
    "configs, problem",
    [(("BF16",), "2 to 4 columns"), (("A", "B", "C", "D", "E"), "2 to 4"), (("A", "A"), "different")],
)
def test_a_comparison_needs_two_to_four_different_configurations(data_dir, configs, problem):
    with pytest.raises(ArenaError, match=problem):
        Arena().save_comparison("ws", "hi", columns(*configs), blind=False)


def test_comparisons_export_as_json_and_csv(data_dir):
    arena = Arena()
    cid = arena.save_comparison("ws", "=cmd|' /C calc'!A0", columns("BF16", "INT4"), blind=True)
    arena.vote("ws", cid, "INT4")
    document = json.loads(export_comparisons(arena.comparisons("ws"), "json"))
    (exported,) = document["comparisons"]
    assert exported["best"] == "INT4" and exported["blind"] is True
    assert exported["votes"] == [{"config_a": "BF16", "config_b": "INT4", "winner": "b"}]
    assert [c["text"] for c in exported["columns"]] == ["answer of BF16", "answer of INT4"]
    rows = list(csv.DictReader(io.StringIO(export_comparisons(arena.comparisons("ws"), "csv").decode())))
    assert [r["config"] for r in rows] == ["BF16", "INT4"] and rows[0]["voted_best"] == "INT4"
    assert rows[0]["prompt"].startswith("'=")  # a spreadsheet shows it as text, never runs it
    assert rows[0]["completion_tokens"] == "5"
