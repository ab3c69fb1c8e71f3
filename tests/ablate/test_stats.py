"""Paired statistics on hand-made numbers with known answers."""

from __future__ import annotations

import math

import pytest

from ablate.results import stats


def test_paired_t_interval_matches_the_textbook():
    # changes -0.2, -0.1, -0.3: mean -0.2, std 0.1, t(0.975, 2) = 4.302653, half width 4.302653·0.1/√3
    c = stats.paired([-0.2, -0.1, -0.3])
    half = 4.302652729 * 0.1 / math.sqrt(3)
    assert (c.n, c.mean, c.std) == (3, pytest.approx(-0.2), pytest.approx(0.1))
    assert (c.low, c.high) == (pytest.approx(-0.2 - half), pytest.approx(-0.2 + half))
    assert not c.significant  # [-0.448, 0.048]: three seeds this noisy cannot exclude zero


def test_an_interval_that_contains_zero_is_not_significant():
    c = stats.paired([0.5, -0.4])
    assert c.has_interval and c.low < 0 < c.high and not c.significant


def test_a_clear_change_is_significant():
    c = stats.paired([-1.0, -1.1, -0.9, -1.05])
    assert c.significant and c.high < 0


def test_one_seed_gives_a_change_but_no_interval():
    c = stats.paired([0.3])
    assert c.n == 1 and c.mean == 0.3 and math.isnan(c.std) and not c.has_interval and not c.significant


def test_missing_pairs_are_left_out():
    assert stats.paired([0.1, math.nan, 0.3]).n == 2
    assert stats.paired([]).n == 0 and math.isnan(stats.paired([]).mean)
