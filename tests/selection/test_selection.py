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
