"""Dynamic sampling (rl.rollout_prompts_per_step): the group choice, its config checks, and that the trainer
trains on exactly the chosen groups' rollouts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from gdsd_jax.config_io import ConfigError
from gdsd_jax.rl.dynamic_sampling import group_rows, groups_by_spread
from tests.test_rl_trainer import _trainer, tiny_cfg


def _best_subset(rewards, g, keep):
    """Brute force: the subset of ``keep`` groups with the largest total spread, earliest on ties."""
    spreads = [float(np.std(rewards[i * g:(i + 1) * g])) for i in range(len(rewards) // g)]
    best = max(itertools.combinations(range(len(spreads)), keep),
               key=lambda c: (sum(spreads[i] for i in c), [-i for i in c]))
    return list(best)


def test_keeps_the_groups_of_largest_spread_in_their_order():
    # 4 groups of 2: spreads 0, 0.5, 0, 0.5 -> the two 0.5 groups; one group -> the earlier of the two.
    r = np.array([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0])
    assert groups_by_spread(r, 2, 2).tolist() == [1, 3]
    assert groups_by_spread(r, 2, 1).tolist() == [1]
    assert groups_by_spread(r, 2, 4).tolist() == [0, 1, 2, 3]


def test_matches_a_brute_force_choice_on_random_rewards():
    rng = np.random.default_rng(0)
    for _ in range(50):
        g, n = int(rng.choice([2, 4])), int(rng.integers(2, 7))
        # Quantised rewards, as the task rewards are (fractions of cells), so ties happen; quarters keep every
        # spread exact in binary, so a tie is a tie in any summation order.
        r = rng.integers(0, 5, size=n * g) / 4.0
        keep = int(rng.integers(1, n + 1))
        assert groups_by_spread(r, g, keep).tolist() == _best_subset(r, g, keep)


def test_group_rows_are_the_consecutive_rows_of_each_group():
    assert group_rows(np.array([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]


@pytest.mark.parametrize("keep", [0, 5])
def test_keep_out_of_range_is_an_error(keep):
    with pytest.raises(ValueError, match=f"keep={keep}.*4"):
        groups_by_spread(np.zeros(8), 2, keep)


def test_rewards_that_do_not_form_groups_are_an_error():
    with pytest.raises(ValueError, match="groups of 3"):
        groups_by_spread(np.zeros(8), 3, 1)


def test_fewer_rollout_prompts_than_trained_prompts_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="rl.rollout_prompts_per_step=2 must be >= rl.prompts_per_step=4"):
        tiny_cfg(tmp_path, "rl.rollout_prompts_per_step=2")


@pytest.mark.slow
def test_the_trainer_updates_on_the_chosen_groups_only(tmp_path):
    """8 prompts rolled out, 4 trained: the update sees the rollouts of the 4 groups of largest spread (the
    choice recomputed here from the scored rewards), and the metrics count flat groups before and after."""
    cfg, trainer, task = _trainer(tmp_path, "rl.rollout_prompts_per_step=8")
    assert cfg.rollout_prompts == 8 and (trainer.rollout_rows, trainer.rows) == (32, 16)
    # The memory planner compiles the rollout at the generated rows and the update at the trained rows.
    from gdsd_jax.experiments.plan import abstract_inputs
    inp = abstract_inputs(trainer, trainer.mesh)
    assert inp["prompt_ids"].shape[0] == 32 and inp["batch"].sequences.shape[0] == 16
    seen = {}
    score, update = trainer.adapter.score, trainer.fns.update

    def spy_score(comp, cmask, examples):
        out = score(comp, cmask, examples)
        seen["rewards"], seen["completions"] = out.rewards.copy(), np.asarray(comp).copy()
        return out

    def spy_update(state, frozen, batch, *rest):
        seen.setdefault("batches", []).append(np.asarray(batch.sequences))
        return update(state, frozen, batch, *rest)

    trainer.adapter.score, trainer.fns.update = spy_score, spy_update
    state, frozen = trainer.init_state()
    examples = list(task.examples("train"))[:8]
    _, m = trainer.rl_step(state, frozen, examples)

    rewards, g = seen["rewards"], cfg.rl.num_generations
    assert rewards.shape == (32,)
    spreads = rewards.reshape(8, g).std(axis=1)
    chosen = groups_by_spread(rewards, g, 4).tolist()      # the choice itself is tested against brute force above
    others = [i for i in range(8) if i not in chosen]
    assert spreads[chosen].min() >= spreads[others].max()
    rows = [i * g + j for i in chosen for j in range(g)]
    lp = cfg.task.prompt_length
    (batch,) = seen["batches"]
    assert batch.shape[0] == 16
    np.testing.assert_array_equal(batch[:, lp:], seen["completions"][rows])
    # The prompts travel with their completions: row k holds the prompt of chosen group k // G.
    prompts = trainer.adapter.encode([examples[i] for i in chosen for _ in range(g)])[0]
    np.testing.assert_array_equal(batch[:, :lp], prompts)
    assert m["zero_spread_groups"] == pytest.approx(np.mean(spreads == 0))
    assert m["zero_spread_groups_trained"] == pytest.approx(np.mean(spreads[chosen] == 0))
    assert m["reward_mean"] == pytest.approx(rewards.mean())
