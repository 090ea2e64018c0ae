"""The objective registry: ``get_objective(name) -> Objective``.

An :class:`Objective` bundles an objective's forward process and its statistics with its loss:

* ``draw_masks(key, batch, cfg) -> masks``: a pytree of arrays; the same key gives the same masks. Draw
  once per micro-batch and inner iteration and reuse it for the old, reference and current models.
* ``statistics(params, model_cfg, batch, masks, cfg, *, lora=None, mesh=None) -> stats``: what the old
  and reference models contribute (computed without gradients at rollout time).
* ``loss(params, model_cfg, batch, masks, old_stats, ref_stats, advantages, cfg, *, lora=None, mesh=None)
  -> LossOutput``: recomputes the current statistics itself, so ``jax.grad`` of the numerator with
  respect to ``params`` or ``lora`` works. ``old_stats=None`` means on-policy (stop-gradient of the
  current statistics, as the official code for ``num_iterations == 1``); ``ref_stats`` may be ``None``
  when β = 0. By default it is ``statistics`` followed by ``reduce(batch, masks, current, old_stats,
  ref_stats, advantages, cfg)``, the method's loss on the current statistics, which subclasses implement.
* ``needs_old(cfg, num_iterations)``, ``needs_ref(cfg)``: which statistics the trainer must precompute
  (none for a method that reads neither, ``uses_old_and_ref = False``).
* ``advantage_method`` / ``advantage_scale_std``: the advantages each method's code uses
  (:func:`~gdsd_jax.objectives.advantages.compute_advantages`).
* ``step_metrics(updates) -> dict``: a step's metrics from its inner updates' ``LossOutput.metrics``; the
  objective names the ones also reported per inner iteration (``iteration_metrics``).

Statistics per objective (B rows, M draws, L completion length, D width, T SPG draws):

============  ===========================================================================
gdsd          ``{"ell": [B, M]}``  two-pass pseudo-log-likelihood, ½(masked + complement)
gdsd_tlc      ``{"ell": [B, M]}``  1/t-weighted coupled ELBO (with ``tlc_centring``)
espo          ``{"ell": [B, M]}``  coupled ELBO without centring (averaged over M in the loss)
gdsd_logit    ``{"hidden": [B, M, L, D]}`` (+ ``"lm_head": [D, V]`` with ``logit_teacher_head="own"``)
d1, wd1       ``{"logp": [B, L]}`` one-step per-token log-probs
spg           ``{"logp": [B, T, L]}`` per-token log-probs under the T block-random masks
============  ===========================================================================

gdsd_logit's statistics are the final hidden states at the scored positions (the pass in which each
position is masked), not logits: the loss rebuilds the old/reference logits chunk by chunk from them
with the LM head, so nothing of size [B, L, V] is stored (the hidden states are V/D ≈ 31x smaller at
LLaDA/Dream scale) and no extra transformer pass of the old/reference models runs inside the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh

from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.objectives import losses
from gdsd_jax.objectives.config import OBJECTIVE_NAMES, ObjectiveConfig
from gdsd_jax.objectives.loglik import (
    coupled_hidden,
    coupled_statistic,
    multi_mask_logprobs,
    one_step_logprobs,
    position_weights,
    scored_length,
)
from gdsd_jax.objectives.masking import coupled_masks, d1_masks, spg_block_random_masks
from gdsd_jax.objectives.teacher import logit_match_sqdist
from gdsd_jax.objectives.types import LossOutput, RolloutBatch


class Objective:
    """Base class; subclasses define the forward process, the statistics and the loss."""

    name: str = ""
    description: str = ""
    advantage_method: str = "loo"
    advantage_scale_std: bool = False
    #: metrics of the loss also reported per inner iteration (``name/iter{j}``) when a step makes several
    #: updates: how far the policy has moved from the rollout policy at each of them.
    iteration_metrics: tuple[str, ...] = ()
    #: whether the loss reads the old policy's and the reference model's statistics at all (wd1 and SPG
    #: have neither a ratio to the old policy nor a KL to the reference).
    uses_old_and_ref: bool = True

    # ---- contract ------------------------------------------------------------------------------
    def draw_masks(self, key: jax.Array, batch: RolloutBatch, cfg: ObjectiveConfig) -> dict:
        raise NotImplementedError

    def statistics(self, params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, masks: Mapping,
                   cfg: ObjectiveConfig, *, lora: Mapping | None = None, mesh: Mesh | None = None) -> dict:
        raise NotImplementedError

    def loss(self, params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, masks: Mapping,
             old_stats: Mapping | None, ref_stats: Mapping | None, advantages: jax.Array, cfg: ObjectiveConfig,
             *, lora: Mapping | None = None, mesh: Mesh | None = None) -> LossOutput:
        self._check(cfg, batch, advantages)
        current = self.statistics(params, model_cfg, batch, masks, cfg, lora=lora, mesh=mesh)
        return self.reduce(batch, masks, current, old_stats, ref_stats, advantages, cfg)

    def reduce(self, batch: RolloutBatch, masks: Mapping, current: Mapping, old_stats: Mapping | None,
               ref_stats: Mapping | None, advantages: jax.Array, cfg: ObjectiveConfig) -> LossOutput:
        """The loss from the current statistics (differentiable) and the old / reference ones (as in
        :meth:`loss`)."""
        raise NotImplementedError

    def needs_old(self, cfg: ObjectiveConfig, num_iterations: int) -> bool:
        self._check(cfg)
        return self.uses_old_and_ref and num_iterations > 1

    def needs_ref(self, cfg: ObjectiveConfig) -> bool:
        self._check(cfg)
        return self.uses_old_and_ref and cfg.beta != 0.0

    def step_metrics(self, updates: Mapping[str, Sequence[float]]) -> dict[str, float]:
        """A step's metrics from its inner updates' (``name -> one value per update``): the mean of each
        and, with more than one update, every :attr:`iteration_metrics` name per update as ``name/iter{j}``."""
        out = {k: float(np.mean(v)) for k, v in updates.items()}
        for k in self.iteration_metrics:
            if k in updates and len(updates[k]) > 1:
                out.update({f"{k}/iter{j}": float(v) for j, v in enumerate(updates[k])})
        return out

    # ---- helpers -------------------------------------------------------------------------------
    def _check(self, cfg: ObjectiveConfig, batch: RolloutBatch | None = None,
               advantages: jax.Array | None = None) -> None:
        if not isinstance(cfg, ObjectiveConfig):
            raise ValueError(f"{self.name}: expected an ObjectiveConfig, got {type(cfg).__name__}")
        if cfg.name != self.name:
            raise ValueError(f"objective {self.name!r} called with ObjectiveConfig(name={cfg.name!r}); "
                             f"use get_objective(cfg.name) or objective_config(name={self.name!r})")
        if batch is not None:
            batch.validate()
        if advantages is not None and tuple(advantages.shape) != (batch.batch_size,):
            raise ValueError(f"{self.name}: advantages must be [B] = ({batch.batch_size},), "
                             f"got {tuple(advantages.shape)}")

    def __repr__(self) -> str:
        return f"Objective({self.name!r})"


def _old_and_ref(old_stats: Mapping | None, ref_stats: Mapping | None, cfg: ObjectiveConfig,
                 name: str) -> tuple[jax.Array | None, jax.Array | None]:
    """The old and reference statistic ``name`` a loss reads: None on-policy (no old statistics) and for the
    reference at β = 0."""
    old = None if old_stats is None else old_stats[name]
    ref = None if (ref_stats is None or cfg.beta == 0.0) else ref_stats[name]
    return old, ref


# ---- GDSD family and ESPO -----------------------------------------------------------------------

class _CoupledMasks(Objective):
    """Objectives on the official stratified coupled masks (M draws per sequence)."""

    def draw_masks(self, key, batch, cfg):
        self._check(cfg, batch)
        return coupled_masks(key, batch.batch_size, batch.completion_len, cfg.num_mc)


class _Coupled(_CoupledMasks):
    """Objectives on the coupled masks and the per-sequence statistic ℓ(b, m)."""

    weighting = "none"
    iteration_metrics = ("inside_clip_frac", "mean_abs_delta")

    def _score(self, cfg: ObjectiveConfig) -> dict:
        return dict(kind="logprob", centring=None, topk=0)

    def statistics(self, params, model_cfg, batch, masks, cfg, *, lora=None, mesh=None):
        self._check(cfg, batch)
        ell = coupled_statistic(params, model_cfg, batch, masks, weighting=self.weighting,
                                score_positions=cfg.score_positions, use_attention_mask=cfg.use_attention_mask,
                                vocab_chunk=cfg.vocab_chunk, seq_chunk=cfg.seq_chunk, lora=lora, mesh=mesh,
                                **self._score(cfg))
        return {"ell": ell}

    def reduce(self, batch, masks, current, old_stats, ref_stats, advantages, cfg):
        old, ref = _old_and_ref(old_stats, ref_stats, cfg, "ell")
        length = scored_length(batch, cfg.score_positions)
        return self._ell_loss(current["ell"], old, ref, advantages, length, cfg)

    def _ell_loss(self, ell, old, ref, advantages, length, cfg) -> LossOutput:
        return losses.gdsd_loss(ell, old, ref, advantages, length, psi=cfg.psi, beta=cfg.beta,
                                epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                                clip_mode=cfg.clip_mode, mc_reduce=cfg.mc_reduce, kl_estimator=cfg.kl_estimator)


class GDSD(_Coupled):
    name = "gdsd"
    description = ("GDSD (gdsd_trainer_batchll.py): squared regression of the clamped per-token log-ratio of "
                   "the two-pass denoiser pseudo-log-likelihood onto psi*A, plus a k2 KL to the reference")
    weighting = "none"


class GDSDTLC(_Coupled):
    name = "gdsd_tlc"
    description = ("GDSD-TLC (gdsd_trainer_tlc.py): the GDSD loss on the 1/t-weighted coupled ELBO with token "
                   "logit centralisation (tlc_centring)")
    weighting = "elbo"

    def _score(self, cfg):
        if cfg.tlc_centring == "detached_logits":
            return dict(kind="logprob", centring="detached_logits", topk=0)
        if cfg.tlc_centring == "eq8":
            return dict(kind="centred_logprob", centring=None, topk=cfg.tlc_topk)
        return dict(kind="logprob", centring=None, topk=0)


class ESPO(_Coupled):
    name = "espo"
    description = ("ESPO (espo_trainer.py): PPO on exp((ELBO_theta - ELBO_old)/L) of the coupled ELBO averaged "
                   "over the M draws, plus k2 KL")
    weighting = "elbo"
    iteration_metrics = ("inside_clip_frac", "clip_frac", "mean_abs_delta")

    def _ell_loss(self, ell, old, ref, advantages, length, cfg):
        return losses.espo_loss(ell, old, ref, advantages, length, beta=cfg.beta, epsilon_low=cfg.epsilon_low,
                                epsilon_high=cfg.epsilon_high, kl_estimator=cfg.kl_estimator)


class GDSDLogit(_CoupledMasks):
    name = "gdsd_logit"
    description = ("GDSD logit matching (reconstruction of the paper's normalisation-free reading): squared "
                   "distance between the student's centred logits and the self-teacher's")

    def statistics(self, params, model_cfg, batch, masks, cfg, *, lora=None, mesh=None):
        self._check(cfg, batch)
        b, m, length = masks["is_mask"].shape
        h = coupled_hidden(params, model_cfg, batch, masks["is_mask"], use_attention_mask=cfg.use_attention_mask,
                           lora=lora, mesh=mesh)
        out = {"hidden": h.reshape(b, m, length, h.shape[-1])}
        if cfg.logit_teacher_head == "own":
            out["lm_head"] = params["lm_head"]
        return out

    def loss(self, params, model_cfg, batch, masks, old_stats, ref_stats, advantages, cfg, *, lora=None,
             mesh=None):
        self._check(cfg, batch, advantages)
        losses.check_ref(cfg.beta, ref_stats)
        is_mask = masks["is_mask"]
        b, m, length = is_mask.shape
        w = params["lm_head"]
        h = coupled_hidden(params, model_cfg, batch, is_mask, use_attention_mask=cfg.use_attention_mask, lora=lora,
                           mesh=mesh)                                                           # [B*M, L, D]
        own = cfg.logit_teacher_head == "own"
        if old_stats is None:
            h_old, w_old = lax.stop_gradient(h), w
        else:
            h_old = old_stats["hidden"].reshape(h.shape).astype(h.dtype)
            w_old = old_stats["lm_head"] if own else w
        # Separate teacher terms (one matmul each) keep the β-weighted reference exact in bf16, where
        # mixing the hidden states first would round β·h_ref away.
        teachers = [(1.0 - cfg.beta, h_old, w_old)]
        if cfg.beta != 0.0:
            teachers.append((cfg.beta, ref_stats["hidden"].reshape(h.shape).astype(h.dtype),
                             ref_stats["lm_head"] if own else w))
        n = scored_length(batch, cfg.score_positions)                                           # [B]
        energy = cfg.psi * advantages.astype(jnp.float32) / n                                  # ψ A / L
        energy = jnp.broadcast_to(jnp.repeat(energy, m)[:, None], (b * m, length))
        targets = jnp.broadcast_to(batch.completion[:, None, :], (b, m, length)).reshape(b * m, length)
        d = logit_match_sqdist(h, w, teachers, targets, energy, vocab_chunk=cfg.vocab_chunk,
                               seq_chunk=cfg.seq_chunk, mesh=mesh).reshape(b, m, length)
        return losses.logit_match_loss(d, position_weights(batch, cfg.score_positions), n,
                                       mc_reduce=cfg.mc_reduce)


# ---- one-step (d1 / wd1) and SPG ---------------------------------------------------------------

class D1(Objective):
    name = "d1"
    description = ("diffu-GRPO / d1 (arXiv 2504.12216): per-token PPO on one-step masked log-probs "
                   "(completion fully masked, prompt tokens masked with p_mask_prompt) plus k3 KL")
    advantage_method = "group_mean"
    advantage_scale_std = True
    iteration_metrics = ("inside_clip_frac", "clip_frac", "mean_abs_delta")

    def draw_masks(self, key, batch, cfg):
        self._check(cfg, batch)
        return d1_masks(key, batch.batch_size, batch.prompt_len, cfg.p_mask_prompt)

    def statistics(self, params, model_cfg, batch, masks, cfg, *, lora=None, mesh=None):
        self._check(cfg, batch)
        logp = one_step_logprobs(params, model_cfg, batch, masks, use_attention_mask=cfg.use_attention_mask,
                                 vocab_chunk=cfg.vocab_chunk, seq_chunk=cfg.seq_chunk, lora=lora, mesh=mesh)
        return {"logp": logp}

    def reduce(self, batch, masks, current, old_stats, ref_stats, advantages, cfg):
        old, ref = _old_and_ref(old_stats, ref_stats, cfg, "logp")
        return losses.d1_loss(current["logp"], old, ref, advantages, position_weights(batch, cfg.score_positions),
                              beta=cfg.beta, epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high,
                              kl_estimator=cfg.kl_estimator)


class WD1(D1):
    name = "wd1"
    description = ("wd1 (arXiv 2507.08838): one-step masked log-likelihood weighted by softmax(A) over the "
                   "micro-batch, minus the softmax(-A)-weighted one (no ratio, no old policy)")
    advantage_method = "group_mean"
    advantage_scale_std = False
    iteration_metrics = ()
    uses_old_and_ref = False

    def reduce(self, batch, masks, current, old_stats, ref_stats, advantages, cfg):
        return losses.wd1_loss(current["logp"], advantages, position_weights(batch, cfg.score_positions),
                               negative=cfg.wd1_negative)


class SPG(Objective):
    name = "spg"
    description = ("SPG (arXiv 2510.09541): policy gradient on an ELBO for positive and an EUBO/mix/ELBO/zero "
                   "estimate for non-positive advantages, block-random masks")
    advantage_method = "group_mean"
    advantage_scale_std = False
    uses_old_and_ref = False

    def draw_masks(self, key, batch, cfg):
        self._check(cfg, batch)
        return spg_block_random_masks(key, batch.completion_mask, batch.prompt_len, num_t=cfg.num_t,
                                      block_length=cfg.block_length, min_t=cfg.min_t, max_t=cfg.max_t,
                                      mask_prompt=cfg.spg_mask_prompt, p_mask_prompt=cfg.p_mask_prompt)

    def statistics(self, params, model_cfg, batch, masks, cfg, *, lora=None, mesh=None):
        self._check(cfg, batch)
        logp = multi_mask_logprobs(params, model_cfg, batch, masks["is_mask"],
                                   use_attention_mask=cfg.use_attention_mask, vocab_chunk=cfg.vocab_chunk,
                                   seq_chunk=cfg.seq_chunk, lora=lora, mesh=mesh)
        return {"logp": logp}

    def reduce(self, batch, masks, current, old_stats, ref_stats, advantages, cfg):
        is_mask = masks["is_mask"][..., batch.prompt_len:]
        return losses.spg_loss(current["logp"], is_mask, position_weights(batch, cfg.score_positions), batch.completion_mask,
                               advantages, logp_estimation=cfg.logp_estimation, mix_weight=cfg.mix_weight,
                               eubo_beta=cfg.eubo_beta)


_REGISTRY: dict[str, Objective] = {o.name: o for o in (GDSD(), GDSDTLC(), GDSDLogit(), ESPO(), SPG(), D1(), WD1())}
assert tuple(sorted(_REGISTRY)) == tuple(sorted(OBJECTIVE_NAMES))


def objective_names() -> tuple[str, ...]:
    """Names accepted by :func:`get_objective` (and ``ObjectiveConfig.name``)."""
    return OBJECTIVE_NAMES


def get_objective(name: str) -> Objective:
    """The objective registered as ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective {name!r}; expected one of {OBJECTIVE_NAMES}") from None
