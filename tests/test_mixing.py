"""Update rules of dynamic batch loading against hand-computed values."""
import math

import numpy as np
import pytest

from composer_sheared.data.mixing import update_weights, validate_proportions


W = [0.5, 0.3, 0.2]
L = [2.0, 1.0, 3.0]
REF = [1.5, 1.2, 2.0]  # excess: +0.5, -0.2, +1.0


def test_paper_rule_clips_negative_excess_and_normalises():
    # Algorithm 1: delta = max(l - ref, 0) = [0.5, 0, 1.0]; w * exp(delta), normalised.
    raw = [0.5 * math.exp(0.5), 0.3 * math.exp(0.0), 0.2 * math.exp(1.0)]
    expected = [x / sum(raw) for x in raw]
    got = update_weights(W, L, REF, "paper")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    # 0.5e^.5, .3, .2e over their sum 1.66802 (computed by hand)
    np.testing.assert_allclose(got, [0.4942160, 0.1798543, 0.3259298], atol=1e-6)


def test_doremi_rule_is_softmax_of_log_weights_plus_excess_then_smoothed():
    eta, c = 1.0, 1e-4
    logits = [math.log(0.5) + 0.5, math.log(0.3) - 0.2, math.log(0.2) + 1.0]
    z = sum(math.exp(x) for x in logits)
    soft = [math.exp(x) / z for x in logits]
    expected = [(1 - c) * s + c / 3 for s in soft]
    got = update_weights(W, L, REF, "doremi", eta=eta, c=c)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, [0.5108537, 0.1522329, 0.3369135], atol=1e-6)
    assert abs(got.sum() - 1) < 1e-12


def test_doremi_eta_and_smoothing():
    got = update_weights([0.25, 0.75], [1.0, 1.0], [0.0, 1.0], "doremi", eta=2.0, c=0.1)
    # softmax(log .25 + 2, log .75) = [.25 e^2, .75] / (.25 e^2 + .75)
    s0 = 0.25 * math.e ** 2 / (0.25 * math.e ** 2 + 0.75)
    np.testing.assert_allclose(got, [0.9 * s0 + 0.05, 0.9 * (1 - s0) + 0.05], atol=1e-12)


def test_constant_rule_keeps_weights():
    np.testing.assert_allclose(update_weights(W, L, REF, "constant"), W, atol=1e-15)


def test_paper_rule_without_excess_keeps_weights():
    np.testing.assert_allclose(update_weights(W, [1, 1, 1], [2, 2, 2], "paper"), W, atol=1e-15)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown update rule"):
        update_weights(W, L, REF, "bogus")
    with pytest.raises(ValueError, match="2 losses for 3 weights|equal length"):
        update_weights(W, L[:2], REF[:2], "paper")
    with pytest.raises(ValueError, match="3 entries but there are 2 domains"):
        validate_proportions([0.2, 0.3, 0.5], 2)
    with pytest.raises(ValueError, match="non-negative"):
        validate_proportions([1.2, -0.2], 2)
    with pytest.raises(ValueError, match="sum to 1"):
        validate_proportions([0.5, 0.4], 2)
    validate_proportions([0.5, 0.5 + 5e-7], 2)  # within 1e-6
