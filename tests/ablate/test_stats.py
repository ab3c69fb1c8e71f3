"""The statistics of a verdict on hand-made numbers with known answers (textbook formulas, scipy's own
implementations where it has them, the tables of ../shared/notes/verdict-statistics.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from ablate.results import stats


def test_paired_t_interval_matches_the_textbook():
    changes = [-0.2, -0.1, -0.3]  # mean -0.2, sd 0.1, t(0.975, 2) = 4.302653
    c = stats.seed_change(changes, None, None)
    half = 4.302652729 * 0.1 / math.sqrt(3)
    assert (c.n, c.mean, c.sd, c.df, c.noise) == (3, pytest.approx(-0.2), pytest.approx(0.1), 2, "seed")
    assert (c.low, c.high) == (pytest.approx(-0.2 - half), pytest.approx(-0.2 + half))
    assert c.p == pytest.approx(scipy.stats.ttest_1samp(changes, 0).pvalue)


def test_one_seed_and_no_resamples_gives_a_change_but_no_interval():
    c = stats.seed_change([0.3], None, None)
    assert c.n == 1 and c.mean == 0.3 and math.isnan(c.low) and math.isnan(c.p) and c.noise == ""


def test_the_two_way_residual_variance_of_a_balanced_table_is_the_anova_one():
    y = np.array([[1.0, 1.2, 0.9], [0.7, 1.0, 0.5], [1.1, 1.1, 1.0]])  # arms x seeds
    resid = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    values = {(f"arm{a}", s): y[a, s] for a in range(3) for s in range(3)}
    var, df = stats.two_way_variance(values)
    assert df == 4 and var == pytest.approx((resid**2).sum() / 4)
    del values[("arm1", 2)]  # an unbalanced table still fits: one value fewer, one df fewer
    assert stats.two_way_variance(values)[1] == 3


def test_prior_df_is_limma_s_moment_estimate():
    assert stats.prior_df([1.0, 1.0, 1.0, 1.0], [3, 3, 3, 3]) == math.inf  # no spread beyond chance
    s2, d = [0.01, 1.0, 100.0, 0.1, 3.0], [4] * 5
    d0 = stats.prior_df(s2, d)
    e = np.log(s2) - scipy.special.digamma(2.0) + np.log(2.0)
    v = np.var(e, ddof=1) - scipy.special.polygamma(1, 2.0)
    assert scipy.special.polygamma(1, d0 / 2) == pytest.approx(v, rel=1e-6)  # ψ'(d0/2) = v


def test_moderation_shrinks_a_delta_s_variance_toward_the_pooled_one():
    pooled = stats.Pooled(s0_2=1.0, d0=4.0, cap=7)
    s2, df = pooled.moderated([0.0, 2.0])  # own variance 2 with 1 df
    assert s2 == pytest.approx((4 * 1.0 + 1 * 2.0) / 5) and df == 5
    assert stats.Pooled(1.0, math.inf, 7).moderated([0.0, 2.0]) == (pytest.approx(1.0), 7)  # d0 = ∞: capped
    assert stats.Pooled(1.0, 4.0, 7).moderated([0.5]) == (pytest.approx(1.0), 4)  # one seed: the prior alone


def test_benjamini_hochberg_and_holm_are_the_textbook_adjustments():
    p = np.random.default_rng(0).uniform(size=20) ** 3
    changes = [stats.Change(1.0, 2, p=float(x)) for x in p]
    stats.adjust(changes, "bh")
    np.testing.assert_allclose([c.q for c in changes], scipy.stats.false_discovery_control(p, method="bh"))
    stats.adjust(changes, "holm")
    order = np.argsort(p)
    holm = np.maximum.accumulate(np.minimum(1, p[order] * (len(p) - np.arange(len(p)))))
    np.testing.assert_allclose(np.array([c.q for c in changes])[order], holm)
    assert [c.significant for c in changes] == [c.q <= 0.05 for c in changes]


def test_the_eval_interval_is_the_bootstrap_s_centred_on_the_change():
    boot = np.random.default_rng(1).normal(0.5, 0.1, 4000)  # Δ* around a biased 0.5
    c = stats.eval_change(0.3, 1, boot)
    assert c.noise == "eval" and c.low == pytest.approx(0.3 - 1.96 * 0.1, abs=0.01)
    assert c.high == pytest.approx(0.3 + 1.96 * 0.1, abs=0.01) and c.p < 0.01


@pytest.mark.parametrize(("effect", "seeds"), [(0.5, 34), (1.0, 10), (1.5, 6), (2.0, 5)])
def test_seeds_needed_at_80_percent_power_are_the_exact_paired_t_ones(effect, seeds):
    change = stats.Change(effect, 2, sd=1.0)
    assert stats.seeds_needed(change, None) == seeds  # the notes' table, df = n - 1


def test_an_open_change_is_sized_for_the_level_the_table_s_rule_asks_of_the_next_verdict():
    changes = [stats.Change(0.0, 2, p=p) for p in (0.001, 0.04, 0.3, 0.6)]
    stats.adjust(changes, "bh")
    assert [c.significant for c in changes] == [True, False, False, False]
    assert stats.next_level(changes, "bh") == pytest.approx(0.05 * 2 / 4)  # BH's next step
    stats.adjust(changes, "holm")
    assert stats.next_level(changes, "holm") == pytest.approx(0.05 / 3)
    open_change = stats.Change(1.0, 2, sd=1.0)
    assert stats.seeds_needed(open_change, None, alpha=0.025) > stats.seeds_needed(open_change, None) == 10
