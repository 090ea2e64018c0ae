"""Denoiser configuration: one frozen dataclass for both families, with presets.

The two families share one architecture (pre-norm RMSNorm transformer, split-half RoPE, grouped-query
bidirectional attention, SwiGLU MLP, untied LM head). They differ in:

* ``llada``: no biases, RoPE applied in fp32 then cast back, key-padding attention mask with positions
  ``0..L-1`` over the padded row, logits aligned (position i scores token i).
* ``dream``: q/k/v biases, RoPE cos/sin cast to the compute dtype, outer-AND padding mask with positions
  counted from the first real token, raw logits shifted by one (hidden state i predicts token i+1); the
  model undoes the shift so that the public forward is aligned like LLaDA's.

Numbers of the presets: LLaDA-8B and Dream-7B ``config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

Family = Literal["llada", "dream"]
FAMILIES: tuple[str, ...] = ("llada", "dream")

#: Named rematerialisation policies (MaxText style). ``none`` saves everything, ``full`` recomputes the
#: whole block in the backward pass, ``dots`` saves only matmul outputs without batch dimensions
#: (weights-stationary projections) and recomputes the cheap element-wise work.
REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots")

#: The attention core: ``"xla"`` differentiates the plain einsum/softmax/einsum composition with JAX's
#: autodiff (the portable reference); ``"custom_vjp"`` uses the hand-written backward of
#: :func:`gdsd_jax.models.denoiser.attention` (faster on XLA:CPU; reverse mode only); ``"splash"`` runs the
#: Pallas TPU kernel of :mod:`gdsd_jax.models.splash` (Pallas interpret mode off the TPU, for tests);
#: ``"auto"`` picks per backend (:data:`EXECUTION_DEFAULTS`).
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "custom_vjp", "splash")

#: The switches that ``"auto"`` resolves, and what it resolves them to on each backend (device platform).
#: CPU: the paths this project's CPU numbers were measured with (hand-written attention backward, merged
#: projections, merged token dims; docs/training.md explains each). TPU: the portable projections, which
#: the TPU compiler tiles as written, and the splash attention kernel. GPU: the portable reference (the
#: kernel is TPU-only). :func:`resolve_execution` is the one place these are applied.
EXECUTION_DEFAULTS: dict[str, dict[str, str | bool]] = {
    "cpu": {"attention_impl": "custom_vjp", "merge_projections": True, "merge_token_dims": True},
    "tpu": {"attention_impl": "splash", "merge_projections": False, "merge_token_dims": False},
    "gpu": {"attention_impl": "xla", "merge_projections": False, "merge_token_dims": False},
}

#: Fields that say how a model is stored and run, not which network it is: a run config's ``model.overrides``
#: applies these to a checkpoint as well; every other field describes an architecture, which a checkpoint
#: brings with it (``TrainConfig``'s ``ModelSection.split_overrides``).
EXECUTION_FIELDS: tuple[str, ...] = ("param_dtype", "compute_dtype", "remat", "scan_layers", "attention_impl",
                                     "merge_projections", "merge_token_dims")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def dtype_from_name(name: str):
    """Map ``"float32" | "bfloat16" | "fp32" | "bf16"`` to a JAX dtype, with a clear error otherwise."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenoiserConfig:
    """Shape and numerics of a masked-diffusion denoiser.

    Attributes:
      family: ``"llada"`` or ``"dream"`` (see module docstring for what differs).
      vocab_size: rows of the embedding and of the LM head (LLaDA's ``embedding_size``).
      hidden_size: model width ``d``.
      num_layers: transformer blocks.
      num_heads / num_kv_heads / head_dim: attention shape; query head ``h`` uses KV head
        ``h // (num_heads // num_kv_heads)``.
      mlp_dim: SwiGLU intermediate width.
      rope_theta: RoPE base.
      rms_eps: RMSNorm epsilon.
      qkv_bias: whether q/k/v projections carry a bias (Dream).
      mask_token_id / eos_token_id / pad_token_id: special ids.
      max_seq_len: longest sequence the sampler and trainer accept.
      param_dtype / compute_dtype: dtype names of stored parameters and of activations/matmuls.
      remat: one of :data:`REMAT_POLICIES`, applied per block.
      learned_positions: add a learned absolute position embedding ``[max_seq_len, D]`` to the token
        embedding (on top of RoPE). Not part of LLaDA or Dream (their checkpoints have no such tensor):
        an option for tiny models on fixed-layout inputs, where a token's absolute index carries structure
        (a grid's row/column/box) that relative (RoPE) positions only expose indirectly.

    Execution switches (the same function either way; docs/training.md, "Model execution switches"). The
    portable reference is ``attention_impl="xla"``, ``merge_projections=False``, ``merge_token_dims=False``,
    ``scan_layers=True``; each other value is a plain reformulation of the reference (tests compare outputs
    and gradients). The first three default to ``"auto"``, resolved by :func:`resolve_execution` from the
    devices the program runs on (:data:`EXECUTION_DEFAULTS`: on CPU exactly the paths the project's CPU
    numbers were measured with; on TPU the portable projections and the splash kernel):

      attention_impl: one of :data:`ATTENTION_IMPLS`. ``"custom_vjp"`` avoids the slow fused kernels
        XLA:CPU builds for the autodiff backward; ``"xla"`` lets the compiler differentiate the composition
        (forward-mode autodiff works, and a TPU / GPU compiler fuses it well); ``"splash"`` is the Pallas
        TPU flash-attention kernel (key-padding masks only, which is every mask the model builds).
      merge_projections: ``True``, ``False`` or ``"auto"``. Compute q/k/v (and gate/up) as one matmul
        against the concatenated weights, so the backward transposes the activations once (always off with
        a ``tensor`` mesh axis, where the concatenation would regather the split outputs).
      merge_token_dims: ``True``, ``False`` or ``"auto"``. Fold the batch and length dims into one before
        every projection: the weight gradient then contracts one dim, which avoids a strided transposed
        copy on XLA:CPU.
      scan_layers: run the blocks with ``lax.scan`` over stacked parameters (constant compile time in
        depth; default True). Parameters are always stored stacked ``[num_layers, ...]``; ``False`` unrolls
        a Python loop over the same arrays (faster for a few narrow layers on the CPU, where the scan's
        stacked residuals cost more than the layers; also useful for per-layer profiles).
    """

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    remat: str = "none"
    scan_layers: bool = True
    learned_positions: bool = False
    attention_impl: str = "auto"
    merge_projections: bool | str = "auto"
    merge_token_dims: bool | str = "auto"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"DenoiserConfig.family={self.family!r}; expected one of {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DenoiserConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DenoiserConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"DenoiserConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"DenoiserConfig.remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"DenoiserConfig.attention_impl={self.attention_impl!r}; expected one of "
                             f"{ATTENTION_IMPLS}")
        for name in ("scan_layers", "learned_positions"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DenoiserConfig.{name}={getattr(self, name)!r}; expected true or false")
        for name in ("merge_projections", "merge_token_dims"):
            if not (isinstance(getattr(self, name), bool) or getattr(self, name) == "auto"):
                raise ValueError(f"DenoiserConfig.{name}={getattr(self, name)!r}; expected true, false or auto")
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.compute_dtype)
        for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"DenoiserConfig.{name}={getattr(self, name)} outside [0, {self.vocab_size})")

    # ---- derived -------------------------------------------------------------------------------
    @property
    def execution_resolved(self) -> bool:
        """Whether no execution switch is left at ``"auto"`` (see :func:`resolve_execution`)."""
        return all(getattr(self, name) != "auto" for name in EXECUTION_DEFAULTS["cpu"])

    @property
    def shifted_logits(self) -> bool:
        """Whether the raw network predicts the next token (Dream) and must be re-aligned."""
        return self.family == "dream"

    @property
    def rope_in_fp32(self) -> bool:
        """LLaDA applies RoPE in fp32 (``rope_full_precision``); Dream casts cos/sin to the compute dtype."""
        return self.family == "llada"

    @property
    def dtype(self):
        return dtype_from_name(self.compute_dtype)

    @property
    def params_dtype(self):
        return dtype_from_name(self.param_dtype)

    def replace(self, **changes) -> "DenoiserConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DenoiserConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown DenoiserConfig field(s) {unknown}; expected a subset of {sorted(fields)}")
        return cls(**d)

    def num_params(self) -> int:
        """Closed-form parameter count (checked against ``jax.eval_shape`` in the tests)."""
        d, f, v, n = self.hidden_size, self.mlp_dim, self.vocab_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += q + 2 * kv
        pos = self.max_seq_len * d if self.learned_positions else 0
        return 2 * v * d + n * per_layer + d + pos


# ---- execution switches by backend --------------------------------------------------------------

def execution_platform(mesh: Mesh | None = None) -> str:
    """The platform the model's programs are compiled for: ``"cpu"``, ``"tpu"`` or ``"gpu"``.

    With a mesh, its devices' platform: under a deviceless TPU compile (``gdsd-jax plan --target v5p``,
    ``jax.experimental.topologies``) those are TPU devices although the default backend is the CPU. Without
    one, ``jax.default_backend()`` (the devices a mesh-less ``jit`` runs on). CUDA and ROCm count as ``gpu``.
    """
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return platform if platform in ("cpu", "tpu") else "gpu"


def resolve_execution(cfg: DenoiserConfig, platform: str) -> DenoiserConfig:
    """``cfg`` with every ``"auto"`` execution switch replaced by the value :data:`EXECUTION_DEFAULTS` gives
    ``platform`` (``"cpu" | "tpu" | "gpu"``, e.g. from :func:`execution_platform`); explicit values are kept.

    The single place ``"auto"`` is decided: every transformer block calls it with the devices it is compiled
    for, and a run calls it once (through :func:`execution_record`) to log and record the choice; an
    explicit ``"splash"`` on a GPU is refused here, so before a run builds anything.
    """
    if platform not in EXECUTION_DEFAULTS:
        raise ValueError(f"resolve_execution: unknown platform {platform!r}; expected one of "
                         f"{sorted(EXECUTION_DEFAULTS)}")
    if cfg.attention_impl == "splash" and platform == "gpu":
        raise ValueError("DenoiserConfig.attention_impl='splash' is a TPU kernel (Pallas interpret mode on the "
                         "CPU, for tests); on a GPU use 'xla' or 'auto'")
    if cfg.execution_resolved:
        return cfg
    defaults = EXECUTION_DEFAULTS[platform]
    return cfg.replace(**{k: v for k, v in defaults.items() if getattr(cfg, k) == "auto"})


def execution_record(cfg: DenoiserConfig, mesh: Mesh | None = None) -> dict[str, str | bool]:
    """What the model runs on ``mesh``'s devices: ``{"platform", "attention_impl", "merge_projections",
    "merge_token_dims", "scan_layers"}`` after :func:`resolve_execution` (what a run logs and records)."""
    platform = execution_platform(mesh)
    resolved = resolve_execution(cfg, platform)
    return {"platform": platform, **{name: getattr(resolved, name)
                                     for name in (*EXECUTION_DEFAULTS["cpu"], "scan_layers")}}


# ---- presets ------------------------------------------------------------------------------------

def llada_8b(**overrides) -> DenoiserConfig:
    """LLaDA-8B (Base/Instruct/1.5): 32 layers, d 4096, MHA 32 heads, MLP 12288, vocab 126464."""
    cfg = dict(family="llada", vocab_size=126464, hidden_size=4096, num_layers=32, num_heads=32,
               num_kv_heads=32, head_dim=128, mlp_dim=12288, rope_theta=500000.0, rms_eps=1e-5,
               qkv_bias=False, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
               max_seq_len=4096)
    cfg.update(overrides)
    return DenoiserConfig(**cfg)


def dream_7b(**overrides) -> DenoiserConfig:
    """Dream-v0-7B: 28 layers, d 3584, GQA 28/4 heads, MLP 18944, vocab 152064, q/k/v biases."""
    cfg = dict(family="dream", vocab_size=152064, hidden_size=3584, num_layers=28, num_heads=28,
               num_kv_heads=4, head_dim=128, mlp_dim=18944, rope_theta=1000000.0, rms_eps=1e-6,
               qkv_bias=True, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643,
               max_seq_len=2048)
    cfg.update(overrides)
    return DenoiserConfig(**cfg)


def tiny_llada(**overrides) -> DenoiserConfig:
    """A 2-layer LLaDA-layout model for tests (fp32)."""
    cfg = dict(family="llada", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
               head_dim=16, mlp_dim=96, rope_theta=500000.0, rms_eps=1e-5, qkv_bias=False,
               mask_token_id=250, eos_token_id=251, pad_token_id=251, max_seq_len=1024,
               param_dtype="float32", compute_dtype="float32")
    cfg.update(overrides)
    return DenoiserConfig(**cfg)


def tiny_dream(**overrides) -> DenoiserConfig:
    """A 2-layer Dream-layout model for tests (GQA 4/2, q/k/v biases, fp32)."""
    cfg = dict(family="dream", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=96, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True,
               mask_token_id=250, eos_token_id=251, pad_token_id=251, max_seq_len=1024,
               param_dtype="float32", compute_dtype="float32")
    cfg.update(overrides)
    return DenoiserConfig(**cfg)


PRESETS = {
    "llada_8b": llada_8b,
    "dream_7b": dream_7b,
    "tiny_llada": tiny_llada,
    "tiny_dream": tiny_dream,
}
