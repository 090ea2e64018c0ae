"""Settings of the diffusion samplers: one frozen, hashable dataclass (a static argument of ``jit``)."""

from __future__ import annotations

import dataclasses

from gdsd_jax.config_io import check_ranges, ranged

REMASKING: tuple[str, ...] = ("low_confidence", "random")
ALGORITHMS: tuple[str, ...] = ("origin", "maskgit_plus", "topk_margin", "entropy")
SAMPLERS: tuple[str, ...] = ("auto", "llada", "dream")
#: top_k of the official Dream rollouts and evaluations. They call ``diffusion_generate`` without ``top_k``;
#: under transformers 4.x (the official code's) the generation config it builds from Dream's model config
#: then carries transformers' legacy default ``top_k = 50``. The Dream recipes set it; ``gdsd-jax eval``
#: uses it for Dream models.
DREAM_OFFICIAL_TOP_K = 50
CACHES: tuple[str, ...] = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to generate ``gen_length`` tokens after a prompt.

    Shared settings:
      gen_length: completion length ``Lg`` (tokens generated per prompt).
      steps: denoising steps (model calls; twice the batch with LLaDA's classifier-free guidance).
      temperature: 0 is greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
      sampler: ``"auto"`` picks by the model family, or ``"llada"`` / ``"dream"`` to force an algorithm
        (both work with either family: the model's logits are aligned).
      stop_at_eos: the completion mask covers tokens up to and including the first EOS (as the RL
        trainers do for rewards and lengths); ``False`` gives an all-ones mask.
      return_unmask_step: also return, for every completion token, the step at which it was revealed.
      ban_mask_token: never sample the mask token (its logit is -inf before sampling and confidence). Off by
        default, as upstream LLaDA ``generate`` and Dream ``diffusion_generate``: there a sampled mask id
        leaves its position masked for a later step (and masked at the end if chosen at the last one).

    LLaDA settings (``generate.py`` of LLaDA):
      block_length: semi-autoregressive block size; ``None`` means one block of ``gen_length``. Must divide
        ``gen_length``, and the number of blocks must divide ``steps``.
      remasking: ``"low_confidence"`` (reveal the tokens whose sampled token has the highest un-tempered
        probability) or ``"random"``.
      cfg_scale: classifier-free guidance ``un + (cfg_scale + 1) * (cond - un)``, where the unconditional
        pass sees the prompt replaced by mask tokens; 0 disables it (one model call per step).
      logits_eos_inf: forbid EOS (its logit is set to -inf before sampling and confidence).
      confidence_eos_eot_inf: EOS and ``eot_token_id`` (if given) are excluded from the confidence softmax
        (their confidence becomes 0) but may still be sampled. This is the intent of upstream's flag; its
        chained assignment only masks EoT (and EOS at temperature 0): we mask both at every temperature.
      eot_token_id: end-of-turn id for ``confidence_eos_eot_inf`` (LLaDA-8B-Instruct: 126348).

    Dream settings (``diffusion_generate`` of Dream):
      alg: ``"origin"`` (each masked token is revealed with probability ``1 - s/t``), ``"maskgit_plus"``
        (confidence = probability of the sampled token), ``"topk_margin"`` (top-1 minus top-2 probability)
        or ``"entropy"`` (negative entropy). The default is ``"entropy"``, what GDSD trains and evaluates with.
      alg_temp: ``None`` or 0 reveals the top-k confidences; > 0 draws the k positions without replacement
        from ``softmax(confidence / alg_temp)``.
      top_p / top_k: nucleus / top-k filtering of the tempered logits (``None`` disables them; ``top_p=1``
        is the same as ``None``). Applied also at temperature 0, where they change the confidences.
      eps: final timestep of ``linspace(1, eps, steps + 1)``.

    Fast decoding (Fast-dLLM, arXiv 2505.22618; both samplers, off by default, see docs/sampling.md). These
    decode block by block (``block_length``; ``None`` is one block) with ``steps // num_blocks`` steps per
    block (the Dream schedule runs per block), and do not support ``cfg_scale > 0``:
      cache: ``"none"`` (every step is a full forward), ``"prefix"`` (a full forward at the start of each
        block caches the keys/values of every position; the other steps run the layers on the current block
        and the masked suffix after it, attending to the cached prefix) or ``"dual"`` (the steps run the
        layers on the block only, attending to the cached prefix and suffix). With one block (``block_length``
        None or ``gen_length``) the two coincide: only the prompt is cached.
      cache_refresh_every: recompute the cache every k steps inside a block (``None``: once per block, at its
        first step). 1 recomputes it at every step, which is the exact sampler.
      threshold: confidence-aware parallel decoding: each step reveals every masked position of the block
        whose confidence (probability of its sampled token) is ``>= threshold``, and at least the most
        confident one; a block ends when no mask is left (at most ``block_length`` steps per block).
        ``None`` keeps the fixed schedule of ``steps``.
      factor: Fast-dLLM's factor rule instead of a fixed threshold: each step reveals the ``n`` most
        confident masked positions of the block, ``n`` the largest count for which the ``i``-th most
        confident has confidence ``>= 1 - factor / (i + 1)`` for every ``i <= n`` (always at least one).
        The bar rises with ``n``: the more tokens revealed together, the surer each must be. Blocks end
        as with ``threshold``; at most one of the two is set.
    """

    gen_length: int = ranged(256, gt=0)
    steps: int = ranged(128, gt=0)
    block_length: int | None = ranged(None, gt=0, why="None: one block")
    temperature: float = ranged(0.0, ge=0, why="0 = greedy")
    remasking: str = "low_confidence"
    cfg_scale: float = ranged(0.0, ge=0, why="0 = no guidance")
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eot_token_id: int | None = ranged(None, ge=0, why="a token id")
    alg: str = "entropy"
    alg_temp: float | None = ranged(None, ge=0)
    top_p: float | None = ranged(None, gt=0, le=1)
    top_k: int | None = ranged(None, gt=0)
    eps: float = ranged(1e-3, gt=0, lt=1)
    sampler: str = "auto"
    stop_at_eos: bool = True
    return_unmask_step: bool = False
    cache: str = "none"
    cache_refresh_every: int | None = ranged(None, ge=1, why="None: once per block")
    threshold: float | None = ranged(None, gt=0, le=1)
    factor: float | None = ranged(None, gt=0)
    ban_mask_token: bool = False

    def __post_init__(self):
        def fail(name: str, expected: str):
            raise ValueError(f"SamplingConfig.{name}={getattr(self, name)!r}: expected {expected}")

        check_ranges(self, "SamplingConfig")          # the numeric fields, by the ranges declared above
        for name, choices in (("remasking", REMASKING), ("alg", ALGORITHMS), ("sampler", SAMPLERS)):
            if getattr(self, name) not in choices:
                fail(name, f"one of {choices}")
        self._check_fast_decoding(fail)
        if self.sampler == "llada" or self.blockwise:
            self.check_blocks()

    def _check_fast_decoding(self, fail) -> None:
        if self.cache not in CACHES:
            fail("cache", f"one of {CACHES}")
        if self.cache_refresh_every is not None and self.cache == "none":
            fail("cache_refresh_every", "None when cache='none' (there is no cache to refresh)")
        if self.threshold is not None and self.factor is not None:
            fail("factor", f"None when threshold={self.threshold!r} is set (one parallel-decoding rule at a time)")
        for name in ("threshold", "factor"):
            if getattr(self, name) is None:
                continue
            if self.remasking != "low_confidence":
                fail(name, f"None with remasking='random' (a {name} rule needs a confidence)")
            if self.alg_temp:
                fail(name, f"None with alg_temp > 0 (a {name} rule reveals by confidence, not by a draw)")
        if self.blockwise and self.cfg_scale > 0:
            fail("cfg_scale", f"0 with cache={self.cache!r} / threshold={self.threshold!r} / factor={self.factor!r} "
                              "(classifier-free guidance is only supported by the exact samplers)")

    @property
    def parallel(self) -> bool:
        """Whether confidence decides how many positions a step reveals (``threshold`` or ``factor`` set)."""
        return self.threshold is not None or self.factor is not None

    @property
    def blockwise(self) -> bool:
        """Whether the fast block-wise decoder runs (a cache or a parallel-decoding rule is set)."""
        return self.cache != "none" or self.parallel

    @property
    def max_steps_per_block(self) -> int:
        """Loop bound of one block: ``block_length`` with parallel decoding, else ``steps_per_block``."""
        return self.llada_block_length if self.parallel else self.steps_per_block

    # ---- block layout (LLaDA, and both samplers when decoding fast) ------------------------------------------------------------------------
    @property
    def llada_block_length(self) -> int:
        return self.gen_length if self.block_length is None else self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.llada_block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    def check_blocks(self) -> None:
        """Raise if the block layout is invalid (errors name the setting)."""
        blk = self.llada_block_length
        if self.gen_length % blk:
            raise ValueError(f"SamplingConfig.gen_length={self.gen_length} is not divisible by "
                             f"block_length={blk}: the sampler decodes whole blocks")
        nb = self.gen_length // blk
        if self.steps < nb:
            raise ValueError(f"SamplingConfig.steps={self.steps} is less than the number of blocks "
                             f"{nb} (gen_length={self.gen_length} / block_length={blk}): every block needs a step")
        if self.steps % nb:
            raise ValueError(f"SamplingConfig.steps={self.steps} is not divisible by the number of blocks {nb} "
                             f"(gen_length={self.gen_length} / block_length={blk})")

    def resolve_sampler(self, family: str) -> str:
        """``"llada"`` or ``"dream"``: the explicit ``sampler`` or, for ``"auto"``, the model family."""
        if self.sampler != "auto":
            return self.sampler
        if family not in ("llada", "dream"):
            raise ValueError(f"cannot pick a sampler for model family {family!r}; set SamplingConfig.sampler")
        return family

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)
