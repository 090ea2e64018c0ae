"""The solved-fraction rule of evaluation summaries."""

import numpy as np
import pytest

from gdsd_jax.training.evaluate import solved_fraction


@pytest.mark.parametrize("rewards, max_reward, expected", [
    ([0.1, 0.1, 0.1], None, 0.0),            # only well-formed answers: nothing solved
    ([1.0, 0.5, 1.0, 0.0], None, 0.5),        # Sudoku-style fractions
    ([2.5, 3.0, 0.5, 3.0], None, 0.5),        # GSM8K-style sums: the best of the set counts
    ([0.4, 0.6], 0.6, 0.5),                   # explicit bar
    ([], None, 0.0),
])
def test_solved_fraction(rewards, max_reward, expected):
    assert solved_fraction(np.asarray(rewards), max_reward) == pytest.approx(expected)
