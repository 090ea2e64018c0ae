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

from gdsd_jax.checkpoint.integrity import all_finite
from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import batch_sharding
from gdsd_jax.errors import UserError
from gdsd_jax.models import lora as lora_lib
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.objectives import get_objective
from gdsd_jax.objectives.advantages import compute_advantages
from gdsd_jax.objectives.types import RolloutBatch
from gdsd_jax.rl.dynamic_sampling import group_rows, groups_by_spread
from gdsd_jax.sampling import generate
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


def learning_rate(optim, step, total_steps: int):
    """Learning rate of RL step ``step`` (an int or a traced count)."""
    if optim.schedule == "constant":
        return optim.lr
    # warmup_steps = 0: no warm-up, step 0 already runs at the peak rate.
    if optim.schedule == "constant_with_warmup":
        return optim.lr if optim.warmup_steps == 0 else optim.lr * jnp.minimum(1.0, step / optim.warmup_steps)
    if optim.warmup_steps == 0:
        return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1))(step)
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps, total_steps)(step)


def _cast_floats(tree, dtype):
    """The tree with its floating-point leaves cast to ``dtype`` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _fp32(tree):
    return _cast_floats(tree, jnp.float32)


def _opt_init(tx: optax.GradientTransformation, trainable):
    """Optimizer state with fp32 moments whatever the trained weights' dtype (bf16 weights keep fp32 Adam
    statistics; ``optax.apply_updates`` casts each update back to its weight's dtype)."""
    return tx.init(_fp32(trainable))


@dataclasses.dataclass
class ModelParts:
    """The model as the trainer holds it: ``trainable`` is optimised; ``frozen`` is the base (LoRA) or the
    reference copy (full fine-tuning with a KL term); ``lora_scale`` is alpha / rank."""
    model_cfg: DenoiserConfig
    lora: bool
    lora_scale: float

    def policy(self, trainable, frozen):
        """(params, lora) of the current policy. The LoRA scale is folded into ``B`` here
        (``s (x A) B = (x A)(s B)``) so downstream functions take adapters at scale 1."""
        if not self.lora:
            return trainable, None
        return frozen, {t: {"a": ab["a"], "b": ab["b"] * self.lora_scale} for t, ab in trainable.items()}

    def reference(self, trainable, frozen):
        """(params, lora) of the reference policy: base weights with the adapters off, or the frozen copy."""
        return (frozen, None) if self.lora else (frozen if frozen is not None else trainable, None)


def _split_micro(tree, n_micro: int):
    """Leading axis [B, ...] -> [n_micro, B / n_micro, ...] on every array leaf."""
    return jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), tree)


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
        self._build_functions()

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
                trainable = _cast_floats(trainable, jnp.dtype(cfg.optim.param_dtype))
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

    # ---- compiled functions -----------------------------------------------------------------------
    def _build_functions(self) -> None:
        parts, mcfg, mesh = self.parts, self.model_cfg, self.mesh
        objective, ocfg = self.objective, self.obj_cfg
        tx = self.tx
        n_micro = self.n_micro

        def rollout(trainable, frozen, prompt_ids, prompt_mask, key, scfg):
            params, lora = parts.policy(trainable, frozen)
            return generate(params, mcfg, prompt_ids, prompt_mask, key, scfg, mesh=mesh, lora=lora)

        self._rollout = jax.jit(rollout, static_argnums=(5,))

        def draw_masks(key, batch):
            mb = _split_micro(batch, n_micro)
            keys = jax.random.split(key, n_micro)
            return jax.lax.map(lambda kb: objective.draw_masks(kb[0], kb[1], ocfg), (keys, mb))

        self._draw_masks = jax.jit(draw_masks)

        def statistics(params, lora, batch, masks):
            mb = _split_micro(batch, n_micro)
            return jax.lax.map(
                lambda xs: objective.statistics(params, mcfg, xs[0], xs[1], ocfg, lora=lora, mesh=mesh),
                (mb, masks))

        self._statistics = jax.jit(statistics)

        def update(state, frozen, batch, masks, old, ref, adv):
            trainable = state["trainable"]
            mb = _split_micro(batch, n_micro)
            adv_mb = adv.reshape(n_micro, -1)

            def micro(carry, xs):
                gsum, nsum, dsum = carry
                b, m, o, r, a = xs

                def f(tr):
                    params, lora = parts.policy(tr, frozen)
                    out = objective.loss(params, mcfg, b, m, o, r, a, ocfg, lora=lora, mesh=mesh)
                    return out.numerator, out

                (num, out), g = jax.value_and_grad(f, has_aux=True)(trainable)
                gsum = jax.tree.map(jnp.add, gsum, g)
                return (gsum, nsum + num, dsum + out.denominator), out.metrics

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (gsum, nsum, dsum), metrics = jax.lax.scan(
                micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                (mb, masks, old, ref, adv_mb))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32) / dsum, gsum)
            loss = nsum / dsum
            gnorm = optax.tree.norm(grads)
            updates, new_opt = tx.update(grads, state["opt_state"], _fp32(trainable))
            new_trainable = optax.apply_updates(trainable, updates)
            # A finite loss and gradient can still give a non-finite update (an overflowing learning rate,
            # Adam moments): the updated parameters and optimizer state are checked themselves.
            finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & all_finite((new_trainable, new_opt))
            keep = lambda new, old_: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old_)  # noqa: E731
            new_state = dict(state, trainable=keep(new_trainable, trainable), opt_state=keep(new_opt, state["opt_state"]))
            out_metrics = {k: jnp.mean(v) for k, v in metrics.items()}
            out_metrics.update(loss=loss, grad_norm=gnorm, finite=finite)
            return new_state, out_metrics

        self._update = jax.jit(update, donate_argnums=(0,))

    # ---- one RL step ------------------------------------------------------------------------------
    def rl_step(self, state: dict, frozen, examples: list[dict]) -> tuple[dict, dict]:
        """Run one RL step on this process's rollout prompts (``cfg.rollout_prompts`` in all; with dynamic
        sampling the ``rl.prompts_per_step`` groups of largest reward spread are trained on); returns the
        new state and host metrics."""
        rl = self.cfg.rl
        g = rl.num_generations
        step = int(state["step"])
        base_key = jax.random.wrap_key_data(state["key"])
        step_key = jax.random.fold_in(base_key, step)
        gen_key, mask_key = jax.random.split(step_key)
        timings = {}

        # ``examples`` are this process's prompts. Rows are prompt-major (the G completions of a prompt
        # are consecutive) and every process owns a contiguous block of rows, so a group never straddles
        # processes: rewards and advantages are computed where the completions were generated.
        t0 = time.perf_counter()
        prompt_ids, prompt_mask = self.adapter.encode(examples)
        prompt_ids = np.repeat(prompt_ids, g, axis=0)
        prompt_mask = np.repeat(prompt_mask, g, axis=0)
        rows_examples = [ex for ex in examples for _ in range(g)]
        sharding = batch_sharding(self.mesh, 2)
        pid = multihost.global_batch(prompt_ids, sharding)
        pmask = multihost.global_batch(prompt_mask, sharding)
        out = self._rollout(state["trainable"], frozen, pid, pmask, gen_key, self.sampling_cfg)
        seqs = multihost.local_rows(out.sequences)
        cmask = multihost.local_rows(out.completion_mask)
        nfe = multihost.host_allgather(multihost.local_rows(out.nfe))
        timings["time_generation"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        lp = prompt_ids.shape[1]
        scores = self.adapter.score(seqs[:, lp:], cmask, rows_examples)
        rewards = multihost.host_allgather(scores.rewards)        # for metrics only: every rollout
        comp_len = multihost.host_allgather(cmask.sum(axis=1))   # likewise, before dynamic sampling subsets
        trained_rewards = scores.rewards
        if self.cfg.rollout_prompts != rl.prompts_per_step:
            # Dynamic sampling, per process (its groups are local): keep its share of the trained groups.
            local_keep = len(examples) * rl.prompts_per_step // self.cfg.rollout_prompts
            keep = groups_by_spread(scores.rewards, g, local_keep)
            rows = group_rows(keep, g)
            seqs, cmask, trained_rewards = seqs[rows], cmask[rows], scores.rewards[rows]
            pmask = multihost.global_batch(prompt_mask[rows], sharding)
        adv = np.asarray(compute_advantages(jnp.asarray(trained_rewards), g, method=self.advantage_method,
                                            scale_std=self.advantage_scale_std))
        timings["time_reward"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        batch = RolloutBatch(sequences=multihost.global_batch(seqs, sharding), prompt_mask=pmask,
                             completion_mask=multihost.global_batch(cmask, sharding), prompt_len=lp)
        adv_dev = multihost.global_batch(adv.astype(np.float32), batch_sharding(self.mesh, 1))
        masks = [self._draw_masks(jax.random.fold_in(mask_key, j), batch) for j in range(rl.num_iterations)]
        params, lora = self.parts.policy(state["trainable"], frozen)
        old = ([self._statistics(params, lora, batch, m) for m in masks] if self.needs_old
               else [None] * rl.num_iterations)
        if self.needs_ref:
            rparams, rlora = self.parts.reference(state["trainable"], frozen)
            ref = [self._statistics(rparams, rlora, batch, m) for m in masks]
        else:
            ref = [None] * rl.num_iterations
        jax.block_until_ready((old, ref))
        timings["time_scoring"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics_acc: dict[str, list[float]] = {}
        nonfinite = 0
        for j in range(rl.num_iterations):
            state, m = self._update(state, frozen, batch, masks[j], old[j], ref[j], adv_dev)
            m = jax.device_get(m)
            if not bool(m["finite"]):
                nonfinite += 1
            for k, v in m.items():
                metrics_acc.setdefault(k, []).append(float(v))
        timings["time_update"] = time.perf_counter() - t0
        state = dict(state, step=state["step"] + 1)

        groups = rewards.reshape(-1, g)
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "zero_spread_groups": float(np.mean(groups.std(axis=1) == 0)),
            "zero_spread_groups_trained": float(np.mean(
                multihost.host_allgather(trained_rewards).reshape(-1, g).std(axis=1) == 0)),
            "completion_length": float(comp_len.mean()),
            "reward_failures": int(multihost.host_allgather(np.asarray([scores.failures])).sum()),
            "nonfinite_updates": nonfinite,
            "lr": float(learning_rate(self.cfg.optim, step, rl.total_steps)),
        }
        for name, vals in scores.per_fn.items():
            metrics[f"reward/{name}"] = float(np.mean(multihost.host_allgather(np.asarray(vals))))
        for k, v in metrics_acc.items():
            if k == "finite":
                continue
            metrics[k] = float(np.mean(v))
            if rl.num_iterations > 1 and k in ("clip_fraction", "in_band_fraction", "mean_abs_delta"):
                for j, vj in enumerate(v):
                    metrics[f"{k}/iter{j}"] = vj
        total = sum(timings.values())
        metrics.update(timings)
        metrics["tokens_per_second"] = float(rewards.shape[0] * seqs.shape[1] / max(total, 1e-9))
        # Rollout cost: model forwards per completion (fewer with a threshold), generated tokens per second
        # and the rollout's share of the step time (see docs/sampling.md, fast decoding).
        metrics["rollout_nfe"] = float(nfe.mean())
        metrics["tokens_per_second_rollout"] = float(
            rewards.shape[0] * self.sampling_cfg.gen_length / max(timings["time_generation"], 1e-9))
        metrics["time_share_rollout"] = float(timings["time_generation"] / max(total, 1e-9))
        return state, metrics


def merged_policy_params(parts: ModelParts, trainable, frozen):
    """Full parameters of the current policy (LoRA merged in), e.g. for export or evaluation."""
    if parts.lora:
        return lora_lib.merge_lora(frozen, trainable, parts.lora_scale)
    return trainable
