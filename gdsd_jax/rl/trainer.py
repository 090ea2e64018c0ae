"""The RL trainer: rollout -> rewards -> advantages -> ``num_iterations`` inner updates.

One RL step (the GDSD paper, arXiv 2605.29398, §2.1):

1. ``P`` prompts from the Grain pipeline (this process's slice), each repeated ``G`` times.
2. Rollout: the jitted diffusion sampler on the training mesh (one compiled program).
3. Rewards on the host (task reward functions; failures score 0 and are counted).
4. Leave-one-out (or group-mean) advantages per group of ``G``.
5. For every inner iteration ``j``: masks from a key; the old (rollout-time) and reference statistics are
   computed once, without gradients, under the same masks, before any update.
6. ``num_iterations`` optimizer updates; each accumulates gradients over micro-batches inside one jitted
   function (``lax.scan``) and divides the summed loss numerators by the summed denominators, so the
   result equals the full-batch loss exactly.

:meth:`RLTrainer.rl_step` composes :meth:`~RLTrainer.generate` (2), :meth:`~RLTrainer.score` (3-4),
:meth:`~RLTrainer.score_statistics` (5), :meth:`~RLTrainer.train` (6) and :meth:`~RLTrainer.step_metrics`;
their device functions are :mod:`gdsd_jax.rl.step`'s, jitted once per trainer (``RLTrainer.fns``).

State lives here only: the trainable tree (full parameters or LoRA adapters), the optimizer state, the
step and the RNG key. Everything mathematical is a pure function from :mod:`gdsd_jax.objectives`,
:mod:`gdsd_jax.sampling` and :mod:`gdsd_jax.models`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import batch_sharding
from gdsd_jax.errors import UserError
from gdsd_jax.models import lora as lora_lib
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.objectives import get_objective
from gdsd_jax.objectives.advantages import compute_advantages
from gdsd_jax.objectives.types import RolloutBatch
from gdsd_jax.rl.dynamic_sampling import group_rows, groups_by_spread
from gdsd_jax.rl.step import ModelParts, StepContext, cast_floats, compile_step, old_and_reference
from gdsd_jax.training.config import TrainConfig


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite update; the run stopped (no non-finite update was applied
    or saved)."""


def make_optimizer(optim, total_steps: int, updates_per_step: int = 1) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and the configured schedule.

    ``total_steps`` and ``optim.warmup_steps`` count RL steps; each RL step makes ``updates_per_step``
    (= ``num_iterations``) optimizer updates, all at that step's learning rate (:func:`learning_rate`).
    """
    return optax.chain(
        optax.clip_by_global_norm(optim.max_grad_norm),
        optax.adamw(update_schedule(optim, total_steps, updates_per_step), b1=optim.b1, b2=optim.b2,
                    weight_decay=optim.weight_decay, mu_dtype=jnp.float32),
    )


def update_schedule(optim, total_steps: int, updates_per_step: int = 1):
    """The learning rate as a function of the optimizer's update count: update ``c`` belongs to RL step
    ``c // updates_per_step`` (a schedule over updates would end ``num_iterations`` times too early)."""
    if optim.schedule == "constant":
        return optim.lr
    return lambda count: learning_rate(optim, count // updates_per_step, total_steps)


def warmup_steps(optim, total_steps: int) -> int:
    """The warm-up the schedule applies: ``optim.warmup_steps``, shortened to ``total_steps - 1`` when the run
    is shorter (a 2-step smoke run of a recipe warmed up over 10 steps), so that the peak rate is reached and
    the cosine has a step to decay over; the run logs the shortening (:func:`warmup_note`)."""
    return max(0, min(optim.warmup_steps, total_steps - 1))


def warmup_note(optim, total_steps: int) -> str | None:
    """One log line when :func:`warmup_steps` shortens the configured warm-up, else None."""
    if optim.schedule == "constant" or warmup_steps(optim, total_steps) == optim.warmup_steps:
        return None
    return (f"optim.warmup_steps={optim.warmup_steps} is not shorter than rl.total_steps={total_steps}: warming up "
            f"over {warmup_steps(optim, total_steps)} step(s) instead")


def learning_rate(optim, step, total_steps: int):
    """Learning rate of RL step ``step`` (an int or a traced count)."""
    if optim.schedule == "constant":
        return optim.lr
    warmup = warmup_steps(optim, total_steps)
    # warmup = 0: no warm-up, step 0 already runs at the peak rate.
    if optim.schedule == "constant_with_warmup":
        return optim.lr if warmup == 0 else optim.lr * jnp.minimum(1.0, step / warmup)
    if warmup == 0:
        return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1))(step)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, total_steps)(step)


def _opt_init(tx: optax.GradientTransformation, trainable):
    """Optimizer state with fp32 moments whatever the trained weights' dtype (bf16 weights keep fp32 Adam
    statistics; ``optax.apply_updates`` casts each update back to its weight's dtype)."""
    return tx.init(cast_floats(trainable, jnp.float32))


@dataclasses.dataclass
class Generated:
    """This process's rollout rows on the host: ``sequences`` [B_local, Lp + gen_length], ``prompt_mask``
    [B_local, Lp], ``completion_mask`` [B_local, gen_length]; ``nfe`` [B_rollout] the model forwards of every
    row, gathered from all processes."""
    sequences: np.ndarray
    prompt_mask: np.ndarray
    completion_mask: np.ndarray
    nfe: np.ndarray


@dataclasses.dataclass
class Rollouts:
    """One step's generated and scored rows, on this process, after dynamic sampling.

    ``batch`` / ``advantages`` [B] are the trained rows (global arrays on the mesh); ``rewards`` and
    ``completion_lengths`` [B_rollout] are every generated row's, gathered from all processes, for metrics;
    ``trained_rewards`` [B_local] this process's trained rows' rewards; ``nfe`` [B_rollout] model forwards
    per row; ``reward_terms`` the mean of each reward function over every rollout."""
    batch: RolloutBatch
    advantages: jax.Array
    rewards: np.ndarray
    trained_rewards: np.ndarray
    completion_lengths: np.ndarray
    nfe: np.ndarray
    reward_failures: int
    reward_terms: dict[str, float]


class RLTrainer:
    """Owns the mesh, the compiled step functions and the loop. Built from a validated :class:`TrainConfig`."""

    def __init__(self, cfg: TrainConfig, model_cfg: DenoiserConfig, base_params, mesh: Mesh, adapter, task,
                 *, tokenizer=None):
        self.cfg = cfg
        self.mesh = mesh
        self.adapter = adapter
        self.task = task
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.sampling_cfg = cfg.sampling
        self.eval_sampling_cfg = cfg.eval_sampling_config()
        self.obj_cfg = cfg.objective
        self.objective = get_objective(self.obj_cfg.name)
        rl = cfg.rl
        self.rows = rl.prompts_per_step * rl.num_generations               # trained rows per step
        self.rollout_rows = cfg.rollout_prompts * rl.num_generations       # generated rows (dynamic sampling: more)
        self.n_micro = self.rows // rl.micro_batch_size
        self.needs_old = self.objective.needs_old(self.obj_cfg, rl.num_iterations)
        self.needs_ref = self.objective.needs_ref(self.obj_cfg)
        self.advantage_method, self.advantage_scale_std = cfg.advantage_settings()
        self.parts = ModelParts(model_cfg, cfg.lora.enabled,
                                lora_lib.lora_scale(cfg.lora.rank, cfg.lora.alpha) if cfg.lora.enabled else 1.0)
        self.tx = make_optimizer(cfg.optim, rl.total_steps, rl.num_iterations)
        self._base_params = base_params
        #: the compiled step functions (:mod:`gdsd_jax.rl.step`): ``rollout``, ``draw_masks``,
        #: ``statistics``, ``update``; the planner, the benchmarks and the tests drive a step's parts
        #: through them.
        self.fns = compile_step(StepContext(self.parts, self.objective, self.obj_cfg, self.tx, mesh, self.n_micro))

    # ---- state ------------------------------------------------------------------------------------
    def init_state(self) -> tuple[dict, Any]:
        """Fresh training state and the frozen tree."""
        cfg = self.cfg
        key = jax.random.key(cfg.rl.seed)
        if cfg.lora.enabled:
            trainable = lora_lib.init_lora(self.model_cfg, jax.random.fold_in(key, 1), cfg.lora.rank,
                                           cfg.lora.targets, self.mesh)
            frozen = self._base_params
        else:
            trainable = self._base_params
            if cfg.optim.param_dtype is not None:
                trainable = cast_floats(trainable, jnp.dtype(cfg.optim.param_dtype))
            # The reference copy exists only if a loss term needs it (no second copy otherwise).
            frozen = jax.tree.map(jnp.copy, self._base_params) if self.needs_ref else None
        rep = NamedSharding(self.mesh, P())
        # AdamW moments are laid out like the leaves they track (FSDP-sharded), counters replicated; a plain
        # jit(tx.init) would put the whole optimizer state on one device.
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trainable)):
            opt_state = _opt_init(self.tx, trainable)   # traced (e.g. under jax.eval_shape): no layout to follow
        else:
            init = functools.partial(_opt_init, self.tx)
            opt_shardings = optax.tree_map_params(self.tx, lambda _, p: p.sharding,
                                                  jax.eval_shape(init, trainable), trainable,
                                                  transform_non_params=lambda _: rep)
            opt_state = jax.jit(init, out_shardings=opt_shardings)(trainable)
        state = {"trainable": trainable, "opt_state": opt_state,
                 "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
                 "key": jax.device_put(jax.random.key_data(key), rep)}
        return state, frozen

    def abstract_state(self, state: dict) -> dict:
        """Restore targets: the shardings of a fresh state, with anything not laid out on the mesh (scalar
        counters) replicated over it so that a restored state is valid on every topology."""
        rep = NamedSharding(self.mesh, P())

        def target(x):
            sh = x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else rep
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

        return jax.tree.map(target, state)

    # ---- one RL step ------------------------------------------------------------------------------
    def rl_step(self, state: dict, frozen, examples: list[dict]) -> tuple[dict, dict]:
        """Run one RL step on this process's rollout prompts (``cfg.rollout_prompts`` in all; with dynamic
        sampling the ``rl.prompts_per_step`` groups of largest reward spread are trained on); returns the
        new state and host metrics."""
        step = int(state["step"])
        gen_key, mask_key = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(state["key"]), step))
        timings = {}
        t0 = time.perf_counter()
        gen = self.generate(state, frozen, examples, gen_key)
        timings["time_generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ro = self.score(gen, examples)
        timings["time_reward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        masks, old, ref = self.score_statistics(state, frozen, ro.batch, mask_key)
        timings["time_scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, updates = self.train(state, frozen, ro, masks, old, ref)
        timings["time_update"] = time.perf_counter() - t0
        state = dict(state, step=state["step"] + 1)
        return state, self.step_metrics(step, ro, updates, timings)

    def generate(self, state: dict, frozen, examples: list[dict], key: jax.Array) -> Generated:
        """Rollout of this process's prompts, each repeated ``G`` times (rows prompt-major)."""
        # ``examples`` are this process's prompts. Rows are prompt-major (the G completions of a prompt
        # are consecutive) and every process owns a contiguous block of rows, so a group never straddles
        # processes: rewards and advantages are computed where the completions were generated.
        g = self.cfg.rl.num_generations
        prompt_ids, prompt_mask = self.adapter.encode(examples)
        prompt_ids, prompt_mask = np.repeat(prompt_ids, g, axis=0), np.repeat(prompt_mask, g, axis=0)
        sharding = batch_sharding(self.mesh, 2)
        pid = multihost.global_batch(prompt_ids, sharding)
        pmask = multihost.global_batch(prompt_mask, sharding)
        out = self.fns.rollout(state["trainable"], frozen, pid, pmask, key, self.sampling_cfg)
        return Generated(sequences=multihost.local_rows(out.sequences), prompt_mask=prompt_mask,
                         completion_mask=multihost.local_rows(out.completion_mask),
                         nfe=multihost.host_allgather(multihost.local_rows(out.nfe)))

    def score(self, gen: Generated, examples: list[dict]) -> Rollouts:
        """Rewards of this process's rollout rows, dynamic sampling (the groups of largest reward spread) and
        advantages: the trained batch."""
        rl, g = self.cfg.rl, self.cfg.rl.num_generations
        rows_examples = [ex for ex in examples for _ in range(g)]
        seqs, cmask, prompt_mask = gen.sequences, gen.completion_mask, gen.prompt_mask
        lp = prompt_mask.shape[1]
        scores = self.adapter.score(seqs[:, lp:], cmask, rows_examples)
        rewards = multihost.host_allgather(scores.rewards)        # for metrics only: every rollout
        comp_len = multihost.host_allgather(cmask.sum(axis=1))   # likewise, before dynamic sampling subsets
        trained_rewards = scores.rewards
        if self.cfg.rollout_prompts != rl.prompts_per_step:
            # Dynamic sampling, per process (its groups are local): keep its share of the trained groups.
            local_keep = len(examples) * rl.prompts_per_step // self.cfg.rollout_prompts
            rows = group_rows(groups_by_spread(scores.rewards, g, local_keep), g)
            seqs, cmask, trained_rewards, prompt_mask = seqs[rows], cmask[rows], scores.rewards[rows], prompt_mask[rows]
        adv = np.asarray(compute_advantages(jnp.asarray(trained_rewards), g, method=self.advantage_method,
                                            scale_std=self.advantage_scale_std))
        sharding = batch_sharding(self.mesh, 2)
        batch = RolloutBatch(sequences=multihost.global_batch(seqs, sharding),
                             prompt_mask=multihost.global_batch(prompt_mask, sharding),
                             completion_mask=multihost.global_batch(cmask, sharding), prompt_len=lp)
        terms = {name: float(np.mean(multihost.host_allgather(np.asarray(vals))))
                 for name, vals in scores.per_fn.items()}
        return Rollouts(batch=batch,
                        advantages=multihost.global_batch(adv.astype(np.float32), batch_sharding(self.mesh, 1)),
                        rewards=rewards, trained_rewards=trained_rewards, completion_lengths=comp_len, nfe=gen.nfe,
                        reward_failures=int(multihost.host_allgather(np.asarray([scores.failures])).sum()),
                        reward_terms=terms)

    def score_statistics(self, state: dict, frozen, batch: RolloutBatch, key: jax.Array) -> tuple[list, list, list]:
        """Masks for each of the ``rl.num_iterations`` inner updates (from ``fold_in(key, j)``) and the old and
        reference statistics under them (``None`` entries where the objective needs none), all before any
        update."""
        masks = [self.fns.draw_masks(jax.random.fold_in(key, j), batch) for j in range(self.cfg.rl.num_iterations)]
        old, ref = old_and_reference(self.fns, self.parts, state["trainable"], frozen, batch, masks,
                                     needs_old=self.needs_old, needs_ref=self.needs_ref)
        jax.block_until_ready((old, ref))
        return masks, old, ref

    def train(self, state: dict, frozen, ro: Rollouts, masks: list, old: list, ref: list) -> tuple[dict, dict]:
        """The ``rl.num_iterations`` optimizer updates on the trained batch; returns the new state and every
        update's host metrics (``name -> [one value per update]``)."""
        per_update: dict[str, list[float]] = {}
        for j in range(self.cfg.rl.num_iterations):
            state, m = self.fns.update(state, frozen, ro.batch, masks[j], old[j], ref[j], ro.advantages)
            for k, v in jax.device_get(m).items():
                per_update.setdefault(k, []).append(float(v))
        return state, per_update

    def step_metrics(self, step: int, ro: Rollouts, updates: dict[str, list[float]],
                     timings: dict[str, float]) -> dict:
        """The host metrics of step ``step``: rewards and completions of every rollout, the objective's
        metrics of its updates (:meth:`Objective.step_metrics`), the number of non-finite updates, timings."""
        rl, g = self.cfg.rl, self.cfg.rl.num_generations
        rewards = ro.rewards
        finite = updates.pop("finite")
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "zero_spread_groups": float(np.mean(rewards.reshape(-1, g).std(axis=1) == 0)),
            "zero_spread_groups_trained": float(np.mean(
                multihost.host_allgather(ro.trained_rewards).reshape(-1, g).std(axis=1) == 0)),
            "completion_length": float(ro.completion_lengths.mean()),
            "reward_failures": ro.reward_failures,
            "nonfinite_updates": sum(not f for f in finite),
            "lr": float(learning_rate(self.cfg.optim, step, rl.total_steps)),
        }
        metrics.update({f"reward/{name}": v for name, v in ro.reward_terms.items()})
        metrics.update(self.objective.step_metrics(updates))
        total = sum(timings.values())
        metrics.update(timings)
        metrics["tokens_per_second"] = float(rewards.shape[0] * ro.batch.sequences.shape[1] / max(total, 1e-9))
        # Rollout cost: model forwards per completion (fewer with parallel decoding), generated tokens per second
        # and the rollout's share of the step time (see docs/sampling.md, fast decoding).
        metrics["rollout_nfe"] = float(ro.nfe.mean())
        metrics["tokens_per_second_rollout"] = float(
            rewards.shape[0] * self.sampling_cfg.gen_length / max(timings["time_generation"], 1e-9))
        metrics["time_share_rollout"] = float(timings["time_generation"] / max(total, 1e-9))
        return metrics


def merged_policy_params(parts: ModelParts, trainable, frozen):
    """Full parameters of the current policy (LoRA merged in), e.g. for export or evaluation."""
    if parts.lora:
        return lora_lib.merge_lora(frozen, trainable, parts.lora_scale)
    return trainable
