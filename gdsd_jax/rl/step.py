"""The RL step's device functions: rollout, mask drawing, statistics and the update.

These are the pieces :meth:`gdsd_jax.rl.trainer.RLTrainer.rl_step` composes, and the public seam through
which the memory planner, the benchmarks and the tests drive one part of a step. Each is a pure function
of a :class:`StepContext` (what the run fixes: the model parts, the objective and its config, the
optimizer, the mesh, the micro-batch count) and arrays; :func:`compile_step` turns them into the
``jax.jit`` objects the trainer holds (so ``.lower(...)`` and ``jax.eval_shape`` work on them).

Shapes: ``B`` rows per step (``rl.prompts_per_step * rl.num_generations``), ``n`` micro-batches
(``B / rl.micro_batch_size``), ``Lp`` the padded prompt length. Masks and statistics carry a leading
``[n, B / n, ...]`` (one entry per micro-batch); their trailing shapes are the objective's
(:mod:`gdsd_jax.objectives.registry`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from gdsd_jax.checkpoint.integrity import all_finite
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.objectives.config import ObjectiveConfig
from gdsd_jax.objectives.registry import Objective
from gdsd_jax.objectives.types import RolloutBatch
from gdsd_jax.sampling import SampleOutput, SamplingConfig, generate


def cast_floats(tree, dtype):
    """The tree with its floating-point leaves cast to ``dtype`` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def split_micro(tree, n_micro: int):
    """Leading axis [B, ...] -> [n_micro, B / n_micro, ...] on every array leaf."""
    return jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), tree)


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


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a run fixes for every step: the model parts, the objective, the optimizer, the mesh and the
    number ``n_micro`` of micro-batches a step's ``B`` rows are split into."""
    parts: ModelParts
    objective: Objective
    obj_cfg: ObjectiveConfig
    tx: optax.GradientTransformation
    mesh: Mesh
    n_micro: int


def rollout(ctx: StepContext, trainable, frozen, prompt_ids: jax.Array, prompt_mask: jax.Array, key: jax.Array,
            scfg: SamplingConfig) -> SampleOutput:
    """Completions of the current policy: ``prompt_ids`` / ``prompt_mask`` [B, Lp] (each prompt repeated
    ``G`` times, prompt-major) -> :class:`SampleOutput` with ``sequences`` [B, Lp + gen_length]."""
    params, lora = ctx.parts.policy(trainable, frozen)
    return generate(params, ctx.parts.model_cfg, prompt_ids, prompt_mask, key, scfg, mesh=ctx.mesh, lora=lora)


def draw_masks(ctx: StepContext, key: jax.Array, batch: RolloutBatch) -> Any:
    """The objective's masks for one inner iteration: one key per micro-batch (split from ``key``), leaves
    [n, B / n, ...]. The same masks serve the old, reference and current statistics."""
    keys = jax.random.split(key, ctx.n_micro)
    return jax.lax.map(lambda kb: ctx.objective.draw_masks(kb[0], kb[1], ctx.obj_cfg),
                       (keys, split_micro(batch, ctx.n_micro)))


def statistics(ctx: StepContext, params, lora, batch: RolloutBatch, masks) -> Any:
    """The objective's statistics of the model ``(params, lora)`` (the old policy: ``parts.policy``; the
    reference: ``parts.reference``) under ``masks``, without gradients; leaves [n, B / n, ...]."""
    mcfg = ctx.parts.model_cfg
    return jax.lax.map(
        lambda xs: ctx.objective.statistics(params, mcfg, xs[0], xs[1], ctx.obj_cfg, lora=lora, mesh=ctx.mesh),
        (split_micro(batch, ctx.n_micro), masks))


def update(ctx: StepContext, state: dict, frozen, batch: RolloutBatch, masks, old, ref,
           adv: jax.Array) -> tuple[dict, dict]:
    """One optimizer update on the whole batch: gradients accumulated over the ``n`` micro-batches
    (``lax.scan``), the summed loss numerators divided by the summed denominators, so the result equals the
    full-batch loss exactly. ``old`` / ``ref`` are :func:`statistics` outputs or ``None`` (on-policy / no
    reference term); ``adv`` [B]. An update whose loss, gradient norm, parameters or optimizer state is not
    finite is not applied (``metrics["finite"]`` is false). Returns the new state and device metrics: the
    objective's (averaged over micro-batches), ``loss``, ``grad_norm``, ``finite``."""
    parts, objective, ocfg, n_micro = ctx.parts, ctx.objective, ctx.obj_cfg, ctx.n_micro
    trainable = state["trainable"]

    def micro(carry, xs):
        gsum, nsum, dsum = carry
        b, m, o, r, a = xs

        def f(tr):
            params, lora = parts.policy(tr, frozen)
            out = objective.loss(params, parts.model_cfg, b, m, o, r, a, ocfg, lora=lora, mesh=ctx.mesh)
            return out.numerator, out

        (num, out), g = jax.value_and_grad(f, has_aux=True)(trainable)
        gsum = jax.tree.map(jnp.add, gsum, g)
        return (gsum, nsum + num, dsum + out.denominator), out.metrics

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    (gsum, nsum, dsum), metrics = jax.lax.scan(
        micro, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
        (split_micro(batch, n_micro), masks, old, ref, adv.reshape(n_micro, -1)))
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) / dsum, gsum)
    loss = nsum / dsum
    gnorm = optax.tree.norm(grads)
    updates, new_opt = ctx.tx.update(grads, state["opt_state"], cast_floats(trainable, jnp.float32))
    new_trainable = optax.apply_updates(trainable, updates)
    # A finite loss and gradient can still give a non-finite update (an overflowing learning rate,
    # Adam moments): the updated parameters and optimizer state are checked themselves.
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm) & all_finite((new_trainable, new_opt))
    keep = lambda new, old_: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old_)  # noqa: E731
    new_state = dict(state, trainable=keep(new_trainable, trainable), opt_state=keep(new_opt, state["opt_state"]))
    out_metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    out_metrics.update(loss=loss, grad_norm=gnorm, finite=finite)
    return new_state, out_metrics


@dataclasses.dataclass
class StepFunctions:
    """The compiled step functions of one run (``jax.jit`` objects; the context bound)."""
    rollout: Callable[..., SampleOutput]                  # (trainable, frozen, prompt_ids, prompt_mask, key, scfg)
    draw_masks: Callable[..., Any]                        # (key, batch)
    statistics: Callable[..., Any]                        # (params, lora, batch, masks)
    update: Callable[..., tuple[dict, dict]]              # (state, frozen, batch, masks, old, ref, adv); donates state


def _bind(fn, ctx: StepContext, **jit_kwargs):
    # A partial (not functools.wraps, whose __wrapped__ would put ``ctx`` back into the signature jit reads
    # to name the static and donated arguments), carrying the function's name and docstring.
    bound = functools.partial(fn, ctx)
    bound.__name__, bound.__doc__ = fn.__name__, fn.__doc__
    return jax.jit(bound, **jit_kwargs)


def compile_step(ctx: StepContext) -> StepFunctions:
    """:func:`rollout`, :func:`draw_masks`, :func:`statistics` and :func:`update` jitted with ``ctx`` bound
    (the sampling config of :func:`rollout` is static; :func:`update` donates the state)."""
    return StepFunctions(rollout=_bind(rollout, ctx, static_argnums=(5,)), draw_masks=_bind(draw_masks, ctx),
                         statistics=_bind(statistics, ctx), update=_bind(update, ctx, donate_argnums=(0,)))


def old_and_reference(fns: StepFunctions, parts: ModelParts, trainable, frozen, batch: RolloutBatch,
                      masks: list, *, needs_old: bool, needs_ref: bool) -> tuple[list, list]:
    """The old and reference statistics for every inner iteration's masks (``None`` entries when the
    objective does not need them), all computed before any update."""
    none = [None] * len(masks)
    old = ref = none
    if needs_old:
        params, lora = parts.policy(trainable, frozen)
        old = [fns.statistics(params, lora, batch, m) for m in masks]
    if needs_ref:
        params, lora = parts.reference(trainable, frozen)
        ref = [fns.statistics(params, lora, batch, m) for m in masks]
    return old, ref

