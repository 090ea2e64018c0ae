"""Objective settings: one small frozen dataclass per method, each holding only the fields its method reads.

:func:`objective_config` (and :meth:`ObjectiveConfig.from_dict`, and the ``objective`` section of a run
config) picks the class by ``name``. A field the chosen method does not have is an error naming the field,
the method and the methods that do have it, so a GDSD run cannot carry an SPG-only setting that nothing reads.

Every default is the method's **official value** (from the released code of each method; see
``docs/objectives.md``); the defaults that differ between methods:

=====================  ======  ========  ==========  ======  ===============  ===============  ===============
field                  gdsd    gdsd_tlc  gdsd_logit  espo    spg              d1               wd1
=====================  ======  ========  ==========  ======  ===============  ===============  ===============
beta                   1e-3    1e-3      1e-3        1e-3    (no KL)          0.04             (no KL)
epsilon_low/high       4e-4    4e-4      —           4e-4    —                0.2              —
kl_estimator           k2      k2        —           k2      —                k3               —
score_positions        all     all       all         all     completion_mask  completion_mask  completion_mask
use_attention_mask     False   False     False       False   True             False            False
=====================  ======  ========  ==========  ======  ===============  ===============  ===============

The classes share fields through small bases (``_Reference``: a KL / teacher weight to the reference model;
``_Clipped``: a clip band and a KL estimator; ``_MonteCarlo``: M mask draws; ``_Regression``: the GDSD
target scale ψ and the reduction over M; ``_OneStep``: prompt masking of the one-step estimators).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from gdsd_jax.config_io import check_ranges, ranged

CLIP_MODES = ("sequence", "token", "none")
MC_REDUCES = ("sum", "mean")
SCORE_POSITIONS = ("all", "completion_mask")
KL_ESTIMATORS = ("k1", "k2", "k3")
TLC_CENTRINGS = ("detached_logits", "eq8", "none")
LOGP_ESTIMATIONS = ("elbo", "eubo", "mix", "zero")
TEACHER_HEADS = ("current", "own")


def _fail(cfg: Any, field: str, expected: str) -> None:
    raise ValueError(f"{type(cfg).__name__}.{field}={getattr(cfg, field)!r}: expected {expected}")


def _choice(cfg: Any, field: str, choices: tuple[str, ...]) -> None:
    if getattr(cfg, field) not in choices:
        _fail(cfg, field, f"one of {choices}")


def _flag(cfg: Any, field: str) -> None:
    if not isinstance(getattr(cfg, field), bool):
        _fail(cfg, field, "true or false")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """Settings every objective has; the base of the per-method classes (build one with
    :func:`objective_config`, never this class itself).

      name: the method (one of :data:`OBJECTIVE_NAMES`); fixed by the class.
      score_positions: ``"all"`` (official GDSD/ESPO: every one of the L completion positions is scored,
        EOS padding included, and L is the length) or ``"completion_mask"`` (only positions up to the first
        EOS; the length becomes the number of such positions per sequence).
      use_attention_mask: pass ``[prompt_mask, 1...1]`` as the attention mask to the denoiser. The official
        GDSD/ESPO/d1/wd1 losses pass none (pads are attended); SPG passes it.
      vocab_chunk / seq_chunk: chunk sizes of the LM head + log-softmax (vocabulary columns, completion
        positions). ``None`` for both gives the naive full-logits computation (tests, benchmarks).
    """

    name: str = ""
    score_positions: str = "all"
    use_attention_mask: bool = False
    vocab_chunk: int | None = ranged(8192, gt=0, why="None: no chunking")
    seq_chunk: int | None = ranged(128, gt=0, why="None: no chunking")

    def __post_init__(self):
        if type(self) not in CONFIG_CLASSES.values():
            raise TypeError(f"{type(self).__name__} is not an objective's config class; build one with "
                            f"objective_config(name=...), name one of {OBJECTIVE_NAMES}")
        self._validate()

    def _validate(self) -> None:
        own = _class_name(type(self))
        if self.name != own:
            raise ValueError(f"{type(self).__name__}.name={self.name!r}: this class holds the settings of "
                             f"{own!r}; build other methods' settings with objective_config(name=...)")
        check_ranges(self, type(self).__name__)       # every numeric field, by its declared range
        _choice(self, "score_positions", SCORE_POSITIONS)
        _flag(self, "use_attention_mask")

    # ---- helpers -------------------------------------------------------------------------------
    def replace(self, **changes) -> "ObjectiveConfig":
        """A copy of the same method's settings with ``changes`` (validated)."""
        unknown = sorted(set(changes) - set(field_names(self.name)))
        if unknown:
            raise ValueError(_not_a_field_message(self.name, unknown))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "ObjectiveConfig":
        """Build the settings of ``d["name"]`` (default ``"gdsd"``) from a mapping (YAML)."""
        return objective_config(**d)

    @classmethod
    def select_class(cls, data: Mapping) -> type:
        """The class of the method a mapping (a run config's ``objective`` section) describes; a key the
        method does not have raises ``ValueError`` naming the key and the method (see
        :func:`gdsd_jax.config_io.build`)."""
        name = data.get("name", DEFAULT_OBJECTIVE)
        concrete = config_class(name)
        unknown = sorted(set(data) - set(field_names(name)))
        if unknown:
            raise ValueError(_not_a_field_message(name, unknown))
        return concrete


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Reference(ObjectiveConfig):
    """beta: weight β of the KL to the reference (GDSD-logit: the reference weight in the teacher)."""

    beta: float = ranged(1e-3, ge=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Clipped(_Reference):
    """epsilon_low / epsilon_high: clip band; GDSD clamps Δ into [log(1-ε_low), log(1+ε_high)], ESPO/d1 clip
    the ratio into [1-ε_low, 1+ε_high]. ``epsilon_high=None`` means ``epsilon_low`` (trl), resolved at
    construction. kl_estimator: ``"k1" | "k2" | "k3"`` (:mod:`gdsd_jax.objectives.kl`)."""

    epsilon_low: float = ranged(4e-4, gt=0, lt=1, why="log(1-eps) must exist")
    epsilon_high: float | None = ranged(None, gt=0, why="None: epsilon_low")
    kl_estimator: str = "k2"

    def _validate(self) -> None:
        super()._validate()
        if self.epsilon_high is None:
            object.__setattr__(self, "epsilon_high", self.epsilon_low)
        _choice(self, "kl_estimator", KL_ESTIMATORS)

    @property
    def clip_bounds(self) -> tuple[float, float]:
        """(log(1 - ε_low), log(1 + ε_high)): the GDSD clamp band on the log-ratio."""
        return math.log1p(-self.epsilon_low), math.log1p(self.epsilon_high)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _MonteCarlo(ObjectiveConfig):
    """num_mc: M, mask draws per sequence (each with its own key, stratified over the B rows)."""

    num_mc: int = ranged(1, ge=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Regression(_MonteCarlo):
    """psi: advantage scale ψ of the GDSD target (per-token target ψ·A; official yaml 1.0, gsm8k/math
    scripts 10). mc_reduce: ``"sum"`` (official: the squared error is summed over M) or ``"mean"``."""

    psi: float = ranged(1.0, gt=0, why="the target is psi times the advantage: psi <= 0 removes or reverses the signal")
    mc_reduce: str = "sum"

    def _validate(self) -> None:
        super()._validate()
        _choice(self, "mc_reduce", MC_REDUCES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _OneStep(ObjectiveConfig):
    """p_mask_prompt: each prompt token masked with this probability (d1, wd1; SPG with
    ``spg_mask_prompt``)."""

    score_positions: str = "completion_mask"
    p_mask_prompt: float = ranged(0.15, ge=0, le=1)


def _redefault(base: type, field: str, default: Any) -> Any:
    """``base``'s field with another method's official default (its declared range kept)."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[field].metadata)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDSDConfig(_Clipped, _Regression):
    """GDSD. clip_mode: ``"sequence"`` (official): clamp the un-normalised Δ = ℓθ - ℓold, then divide by L;
    ``"token"``: clamp Δ/L (the per-token log-ratio); ``"none"``: no clamp."""

    name: str = "gdsd"
    clip_mode: str = "sequence"

    def _validate(self) -> None:
        super()._validate()
        _choice(self, "clip_mode", CLIP_MODES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDSDTLCConfig(GDSDConfig):
    """GDSD-TLC. tlc_centring: ``"detached_logits"``: z - stop_grad(mean_v z) before the log-softmax (one
    released version of the official TLC trainer; a no-op, see docs); ``"eq8"``: the centred
    log-probability log p(y) - mean_v log p(v) = z_y - mean_v z (another official version, not a no-op);
    ``"none"``. tlc_topk: with ``"eq8"``: 0 uses the full-vocabulary mean, k > 0 the mean of the top-k
    logits."""

    name: str = "gdsd_tlc"
    tlc_centring: str = "detached_logits"
    tlc_topk: int = ranged(0, ge=0, why="0 = full vocabulary")

    def _validate(self) -> None:
        super()._validate()
        _choice(self, "tlc_centring", TLC_CENTRINGS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GDSDLogitConfig(_Reference, _Regression):
    """GDSD logit matching. logit_teacher_head: ``"current"``: the teacher's logits use the current LM head
    on the old/ref hidden states (exact when the head is not trained, as with LoRA); ``"own"``: statistics
    also carry each model's head (full fine-tuning)."""

    name: str = "gdsd_logit"
    logit_teacher_head: str = "current"

    def _validate(self) -> None:
        super()._validate()
        _choice(self, "logit_teacher_head", TEACHER_HEADS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ESPOConfig(_Clipped, _MonteCarlo):
    """ESPO (it always averages ℓ over the M draws before its ratio: its own definition)."""

    name: str = "espo"


@dataclasses.dataclass(frozen=True, kw_only=True)
class D1Config(_Clipped, _OneStep):
    """diffu-GRPO / d1: the completion fully masked, prompt tokens masked with ``p_mask_prompt``."""

    name: str = "d1"
    score_positions: str = "completion_mask"
    beta: float = _redefault(_Clipped, "beta", 0.04)
    epsilon_low: float = _redefault(_Clipped, "epsilon_low", 0.2)
    kl_estimator: str = "k3"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WD1Config(_OneStep):
    """wd1 (no KL, no ratio). wd1_negative: keep wd1's negative-sample term."""

    name: str = "wd1"
    wd1_negative: bool = True

    def _validate(self) -> None:
        super()._validate()
        _flag(self, "wd1_negative")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPGConfig(_OneStep):
    """SPG (arXiv 2510.09541; no KL term): num_t block-random masks per sequence with t in [min_t, max_t]
    over blocks of block_length; logp_estimation, the negative-advantage estimate (``"elbo" | "eubo" |
    "mix" | "zero"``), with mix_weight and eubo_beta; spg_mask_prompt also masks clean tokens before the
    chosen block with ``p_mask_prompt``."""

    name: str = "spg"
    use_attention_mask: bool = True
    num_t: int = ranged(2, ge=1)
    min_t: float = ranged(0.0, ge=0, le=1)
    max_t: float = ranged(1.0, ge=0, le=1)
    logp_estimation: str = "mix"
    mix_weight: float = ranged(0.5, ge=0, le=1)
    eubo_beta: float = ranged(1.5, gt=0)
    block_length: int = ranged(32, ge=1)
    spg_mask_prompt: bool = True

    def _validate(self) -> None:
        super()._validate()
        if self.max_t < self.min_t:
            _fail(self, "max_t", f">= min_t={self.min_t}")
        _choice(self, "logp_estimation", LOGP_ESTIMATIONS)
        _flag(self, "spg_mask_prompt")


def _class_name(cls: type) -> str:
    return next((n for n, c in CONFIG_CLASSES.items() if c is cls), "")


#: method name -> its settings class.
CONFIG_CLASSES: dict[str, type[ObjectiveConfig]] = {
    "gdsd": GDSDConfig, "gdsd_tlc": GDSDTLCConfig, "gdsd_logit": GDSDLogitConfig, "espo": ESPOConfig,
    "spg": SPGConfig, "d1": D1Config, "wd1": WD1Config}
OBJECTIVE_NAMES: tuple[str, ...] = tuple(CONFIG_CLASSES)
DEFAULT_OBJECTIVE = "gdsd"


def config_class(name: str) -> type[ObjectiveConfig]:
    """The settings class of objective ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return CONFIG_CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown objective name={name!r}; expected one of {OBJECTIVE_NAMES}") from None


def field_names(name: str) -> tuple[str, ...]:
    """The settings of objective ``name`` (``name`` included)."""
    return tuple(f.name for f in dataclasses.fields(config_class(name)))


def _not_a_field_message(name: str, keys: list[str]) -> str:
    parts = []
    for key in keys:
        owners = [n for n in OBJECTIVE_NAMES if key in field_names(n)]
        where = f"a setting of {', '.join(owners)} only" if owners else "not a setting of any objective"
        parts.append(f"{key!r} ({where})")
    return (f"objective {name!r} has no setting {', '.join(parts)}; delete it or choose the method it belongs "
            f"to; {name}'s settings: {sorted(field_names(name))}. To switch a config's method, replace the whole "
            f"section: 'objective={{name: {name}}}' (with {name}'s own settings, if any, inside the "
            f"braces)")


def objective_config(name: str = DEFAULT_OBJECTIVE, **fields) -> ObjectiveConfig:
    """The validated settings of objective ``name``; a field the method does not have raises ``ValueError``
    naming it and the methods that have it."""
    concrete = ObjectiveConfig.select_class({"name": name, **fields})
    return concrete(name=name, **fields)
