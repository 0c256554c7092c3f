from __future__ import annotations

import pytest

from espace_export.errors import EspaceError
from espace_export.selection.ranks import choose_rank, layer_compression


@pytest.mark.parametrize(
    ("K", "N", "ratio", "expected"),
    [
        (4096, 4096, 0.5, 1024),  # the paper's square case: L = K/4 gives exactly 50 %
        (4096, 11008, 0.5, 1024),  # 1492 allowed → largest power of two
        (11008, 4096, 0.5, 1024),
        (384, 384, 0.2, 128),  # overshoots: 153.6 allowed, pow2 gives 128 → 33 %
        (64, 64, 0.5, 16),
        (64, 32, 0.5, None),  # 10.7 allowed < min rank 16
    ],
)
def test_pow2_rule(K: int, N: int, ratio: float, expected: int | None) -> None:
    L = choose_rank(K, N, ratio)
    assert expected == L
    if L is not None:
        assert layer_compression(K, N, L) >= ratio
        assert (1 - ratio) * K * N < 2 * L * (K + N)  # the next power of two would not fit


def test_granularity_rule_tracks_the_asked_ratio_on_narrow_layers() -> None:
    pow2 = layer_compression(384, 384, choose_rank(384, 384, 0.2) or 0)
    fine = layer_compression(384, 384, choose_rank(384, 384, 0.2, rule=16) or 0)
    assert fine >= 0.2
    assert abs(fine - 0.2) < abs(pow2 - 0.2)
    assert choose_rank(384, 384, 0.2, rule="16") == 144


def test_min_rank_and_bad_arguments() -> None:
    assert choose_rank(64, 32, 0.5, min_rank=8) == 8
    for ratio in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(EspaceError, match="--ratio"):
            choose_rank(64, 64, ratio)
    with pytest.raises(EspaceError, match="rank rule"):
        choose_rank(64, 64, 0.5, rule="fibonacci")


def test_fill_spends_the_overshoot_on_the_most_harmful_units_and_keeps_the_ratio() -> None:
    from types import SimpleNamespace

    from espace_export.selection.planner import fill_ranks, unit_saving

    def layer(K: int, N: int) -> SimpleNamespace:
        return SimpleNamespace(K=K, N=N)

    # a shared q/k/v unit, two FFN layers and an attention output, MiniLM's shapes at the 0.5 ranks
    units = {"qkv": [layer(384, 384)] * 3, "up": [layer(384, 1536)], "down": [layer(1536, 384)], "o": [layer(384, 384)]}
    ranks = {"qkv": 144, "up": 144, "down": 144, "o": 96}
    harm = {"qkv": 0.1, "up": 0.3, "down": 0.2, "o": 0.05}
    targeted = 3 * 384 * 384 + 2 * 384 * 1536 + 384 * 384
    saved = sum(unit_saving(units[k], ranks[k]) for k in units)
    ratio = (saved - 2 * 16 * 1920 - 16 * 1536 - 100) / targeted  # room for both FFN steps and the q/k/v one
    raised = fill_ranks(units, ranks, harm, targeted, ratio, 16)
    assert raised == {"up": 160, "down": 160, "qkv": 160}  # the harmful first; "o" (12k) does not fit the 100 left
    after = {**ranks, **raised}
    assert sum(unit_saving(units[k], after[k]) for k in units) >= ratio * targeted
    # round robin: every unit takes one step before the most harmful takes a second
    ratio = (saved - 3 * 16 * 1920 - 16 * 1536 - 16 * 768 - 10) / targeted
    assert fill_ranks(units, ranks, harm, targeted, ratio, 16) == {"up": 176, "down": 160, "qkv": 160, "o": 112}
    assert fill_ranks(units, ranks, harm, targeted, saved / targeted, 16) == {}  # no overshoot: nothing to spend
    assert fill_ranks(units, ranks, harm, targeted, ratio, "pow2") == {}  # 144 → 288 never fits
    # a rank whose pair would save nothing is never taken, however large the surplus
    assert all(unit_saving(units[k], L) > 0 for k, L in fill_ranks(units, ranks, harm, targeted, 0.01, 16).items())
