"""Per-device memory plans of an RL recipe, without weights: abstract inputs + ahead-of-time compilation.

The real functions of :class:`~gdsd_jax.rl.trainer.RLTrainer` (rollout, mask drawing, statistics, the
update step with its gradient-accumulation scan and AdamW) are lowered with ``jax.ShapeDtypeStruct``
inputs that carry the run's shardings (parameters per the logical rules of
:mod:`gdsd_jax.distributed.mesh`, data batches over ``(data, fsdp)``) and compiled ahead of time
(``jax.jit(f).lower(*abstract).compile()``). The compiled program is the per-device SPMD program, so
``compiled.memory_analysis()`` reports per-device bytes: arguments, outputs, aliased (donated) bytes and
temporaries (activations, gradients, gathered weights, collectives' buffers).

What is reported (all per device):

* ``params``: the model weights (full fine-tuning: the trainable tree; LoRA: the frozen base).
* ``adapters``: the LoRA ``A``/``B`` tree (0 for full fine-tuning).
* ``optimizer``: the AdamW state (``mu`` and ``nu`` in fp32 whatever the weights' dtype, counters).
* ``reference``: a second copy of the weights held as the KL reference (full fine-tuning with
  ``objective.beta != 0``; LoRA needs none: the reference is the base with the adapters off).
* ``buffer``: the rollout buffer kept on device during one RL step: the batch, and for each of the
  ``num_iterations`` inner iterations its masks and old/reference statistics.
* ``policy_copy``: LoRA only, the scaled ``B`` copy described below.
* ``kv_cache``: the rollout's block KV cache (``sampling.cache`` prefix / dual; 0 without): keys and values
  [layers, B, L, kv_heads, head_dim] in the compute dtype, sharded like the activations. It lives inside
  the compiled rollout, so it is part of the rollout's temporaries (and of the rollout phase); the column
  shows how much of them it is.
* per compiled function: ``argument``, ``output``, ``alias``, ``temp`` and ``live = argument + output -
  alias + temp`` (the per-device footprint of one call, the measure MaxText prints).

Step peak (the number compared with HBM), phase by phase, following :meth:`RLTrainer.rl_step`:

* rollout: ``optimizer + live(rollout)`` (weights and adapters are arguments of the rollout);
* scoring: ``resident + buffer + B copy + max temp(masks, statistics)`` (``resident`` = params +
  adapters + optimizer + reference + step/key; ``B copy`` is the LoRA ``B`` tree scaled by alpha / r
  that :meth:`ModelParts.policy` makes outside ``jit`` for the old statistics, when the objective needs
  them, and drops after them);
* update: ``live(update) + (num_iterations - 1) * (masks + old + reference statistics of one
  iteration)`` (the other iterations' statistics stay alive in the trainer's lists).

The step peak is the largest of the three.

Compilers (see ``docs/memory_plans.md``): with fake CPU devices the temporaries are XLA's CPU compiler's,
which computes the bf16 model in fp32 and so overestimates them (measured against the TPU compiler: the
forward-only functions 2.5-3x, the update step 10-30%). :func:`tpu_devices` gives abstract TPU devices
instead (deviceless compilation by the TPU compiler, needs the ``libtpu`` package, no TPU). The state
terms (params, adapters, optimizer, reference, buffer) are exact shard sizes either way.

Rematerialisation (``model.overrides.remat``) only changes the backward pass, so the forward-only
functions (rollout, statistics) are compiled once per mode and reused for every remat policy.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import is_params_checkpoint, read_config
from gdsd_jax.config_io import ConfigError
from gdsd_jax.convert.hf_checkpoint import HFCheckpoint, is_hf_checkpoint
from gdsd_jax.distributed.mesh import batch_sharding, make_mesh, parse_mesh_spec
from gdsd_jax.models.config import REMAT_POLICIES, DenoiserConfig, dtype_from_name
from gdsd_jax.models.denoiser import abstract_params
from gdsd_jax.models.lora import lora_shapes, lora_shardings
from gdsd_jax.objectives.types import RolloutBatch
from gdsd_jax.rl.trainer import RLTrainer
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.presets import model_preset

GIB = 2 ** 30

#: HBM per chip as Cloud TPU's system-architecture pages state it, in GB. Read as 10^9 bytes (the
#: conservative reading): 16 GB = 14.9 GiB. Plans are in GiB, so headrooms use :func:`hbm_gib`.
TPU_HBM_GB: dict[str, float] = {"v5e": 16.0, "v4": 32.0, "v6e": 32.0, "v5p": 95.0}


def hbm_gib(generation: str) -> float:
    """HBM per chip of a TPU generation in GiB."""
    return TPU_HBM_GB[generation] * 1e9 / GIB

MODES: tuple[str, ...] = ("lora", "full")

#: Compile targets: ``cpu`` (fake host devices) or a TPU generation compiled deviceless (needs libtpu).
TARGETS: tuple[str, ...] = ("cpu", "v4", "v5e", "v5p", "v6e")

# TPU topologies by chip count (one JAX device per chip on all four generations; v4 and v5p run as
# megacore). Names as ``jax.experimental.topologies.get_topology_desc`` takes them.
_TPU_TOPOLOGY = {
    "v4": ("v4", "megacore", {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}),
    "v5p": ("v5", "megacore", {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}),
    "v5e": ("v5e", "default", {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                               256: "16x16"}),
    "v6e": ("v6e", "default", {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
                               256: "16x16"}),
}


def require_libtpu(target: str) -> None:
    """Raise a clear error when ``target`` is a TPU generation and the TPU compiler (libtpu) is not installed."""
    if target == "cpu":
        return
    try:
        found = importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RuntimeError(f"--target {target} compiles with the TPU compiler, which comes with the libtpu package "
                           f"(no TPU needed): install it with pip install \"gdsd-jax[tpu]\" (jax[tpu], the libtpu "
                           f"matching this jax), or use --target cpu")


def tpu_devices(generation: str, num_devices: int, num_slices: int = 1) -> list:
    """Abstract devices of ``num_slices`` TPU slices with ``num_devices`` chips in all, for deviceless
    ahead-of-time compilation (``jax.experimental.topologies``; the TPU compiler comes from the ``libtpu``
    package, no TPU is needed). With several slices each device carries its ``slice_index``."""
    from jax.experimental.topologies import get_topology_desc  # lazy: only the TPU target plans need it

    if generation not in _TPU_TOPOLOGY:
        raise ValueError(f"TPU generation {generation!r}; expected one of {sorted(_TPU_TOPOLOGY)}")
    prefix, chip_config, shapes = _TPU_TOPOLOGY[generation]
    if num_slices < 1 or num_devices % num_slices or num_devices // num_slices not in shapes:
        raise ValueError(f"{generation} with {num_devices} chips in {num_slices} slice(s): supported slice sizes "
                         f"are {sorted(shapes)}")
    per_slice = num_devices // num_slices
    # No metadata server here: libtpu must not look for one. No TPU is opened either, so several
    # compiling processes may load libtpu at once (otherwise the second stops at libtpu's lockfile).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    require_libtpu(generation)
    topo = get_topology_desc(platform="tpu", topology_name=f"{prefix}:{shapes[per_slice]}",
                             chip_config_name=chip_config, chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
    devs = list(topo.devices)
    if len(devs) != num_devices:
        raise RuntimeError(f"{generation} topology {num_slices} x {shapes[per_slice]} gave {len(devs)} devices, "
                           f"expected {num_devices}")
    return devs


# ---- model and mesh resolution --------------------------------------------------------------------

def resolve_model_config(cfg: TrainConfig, *, preset_name: str | None = None,
                         param_dtype: str | None = None) -> tuple[DenoiserConfig, str]:
    """The architecture of a recipe's model without reading any weight.

    Order: ``preset_name`` (argument); then, as training does, the config stored with ``model.checkpoint``
    (a gdsd-jax params checkpoint or an upstream Hugging Face directory, headers only), else the family
    guessed from the checkpoint's name (``llada`` -> ``llada_8b``, ``dream`` -> ``dream_7b``) with bf16
    parameters, which is what ``gdsd-jax convert`` keeps for the upstream bf16 checkpoints; else
    ``model.preset``. ``model.overrides`` are applied last (to a checkpoint, only their execution fields:
    ``ModelSection.split_overrides``), then ``param_dtype`` if given.

    Returns:
      (model config, a short description of where it came from).
    """
    overrides, _ = cfg.model.split_overrides()
    if preset_name:
        base, source = model_preset(preset_name), f"preset {preset_name}"
        overrides = dict(cfg.model.overrides)
    elif not cfg.model.checkpoint:
        base, source = model_preset(cfg.model.preset), f"preset {cfg.model.preset}"
    else:
        ckpt = cfg.model.checkpoint
        base = None
        if ckpt and Path(ckpt).exists():
            if is_params_checkpoint(ckpt):
                base, source = read_config(ckpt), f"checkpoint {ckpt}"
            elif is_hf_checkpoint(ckpt):
                base, source = HFCheckpoint(ckpt).config(), f"Hugging Face config {ckpt}"
        if base is None:
            name = Path(str(ckpt)).name.lower()
            if "llada" in name:
                base = model_preset("llada_8b", param_dtype="bfloat16")
                source = "llada_8b (bf16, from the checkpoint name)"
            elif "dream" in name:
                base = model_preset("dream_7b", param_dtype="bfloat16")
                source = "dream_7b (bf16, from the checkpoint name)"
            else:
                raise ConfigError(f"model.checkpoint={ckpt!r} is not available here and its name names no known "
                                  "family; pass --preset (e.g. llada_8b or dream_7b)")
    if param_dtype is not None:
        dtype_from_name(param_dtype)
        overrides["param_dtype"] = param_dtype
    try:
        return (base.replace(**overrides) if overrides else base), source
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from None


def auto_mesh(num_devices: int, cfg: TrainConfig, model_cfg: DenoiserConfig) -> dict[str, int]:
    """The mesh the plans use by default: ``data`` = ``distributed.num_slices`` (1: one slice), the largest
    ``fsdp`` that divides the micro-batch (the batch is split over ``(data, fsdp)``), the remaining factor
    of each slice on ``tensor``.

    FSDP over all chips is the memory-optimal layout inside one slice (weights, gradients and optimizer
    state are split N ways; ``data`` would replicate them); ``tensor`` is used only when the micro-batch
    cannot be split further, and must divide the attention heads.
    """
    if num_devices <= 0:
        raise ValueError(f"--devices must be positive, got {num_devices}")
    slices = cfg.distributed.num_slices
    if num_devices % slices or cfg.rl.micro_batch_size % slices:
        raise ValueError(f"distributed.num_slices={slices} must divide --devices ({num_devices}) and the "
                         f"micro-batch ({cfg.rl.micro_batch_size} rows)")
    per_slice, micro = num_devices // slices, cfg.rl.micro_batch_size // slices
    for fsdp in sorted((d for d in range(1, per_slice + 1) if per_slice % d == 0), reverse=True):
        tensor = per_slice // fsdp
        if micro % fsdp == 0 and model_cfg.num_heads % tensor == 0 and model_cfg.num_kv_heads % tensor == 0:
            return {"data": slices, "fsdp": fsdp, "tensor": tensor}
    raise ValueError(f"no (fsdp, tensor) split of {per_slice} devices per slice divides both the micro-batch "
                     f"({micro} rows per slice) and the heads ({model_cfg.num_heads}/{model_cfg.num_kv_heads}); "
                     "pass --mesh")


def mesh_from_spec(spec: str | None, num_devices: int, cfg: TrainConfig, model_cfg: DenoiserConfig,
                   devices: Sequence | None = None) -> Mesh:
    """``"auto"``/None -> :func:`auto_mesh`; ``"recipe"`` -> ``distributed.mesh``; else ``data=..,fsdp=..``."""
    devs = list(devices if devices is not None else jax.devices())[:num_devices]
    if len(devs) < num_devices:
        raise ValueError(f"{num_devices} devices requested but only {len(devs)} are available")
    if spec in (None, "", "auto"):
        axes = auto_mesh(num_devices, cfg, model_cfg)
    elif spec == "recipe":
        axes = parse_mesh_spec(cfg.distributed.mesh)
    else:
        axes = parse_mesh_spec(spec)
    mesh = make_mesh(**axes, devices=devs, num_slices=cfg.distributed.num_slices)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.rl.micro_batch_size % rows_split:
        raise ValueError(f"mesh {dict(mesh.shape)}: data*fsdp={rows_split} does not divide "
                         f"rl.micro_batch_size={cfg.rl.micro_batch_size} (the batch is split over data and fsdp); "
                         "use a smaller fsdp with tensor > 1, or a larger micro-batch")
    return mesh


# ---- byte accounting -----------------------------------------------------------------------------

def per_device_bytes(tree) -> int:
    """Bytes one device holds for a tree of sharded ``ShapeDtypeStruct`` / arrays (max over devices of the
    shard size: shards of an evenly divisible ``NamedSharding`` are all the same size)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def kv_cache_bytes(model_cfg: DenoiserConfig, sampling_cfg, rows: int, length: int, mesh: Mesh) -> int:
    """Per-device bytes of the rollout's KV cache: k and v [N, rows, length, KV, Dh] in the compute dtype,
    sharded like the activations (batch over the data axes, kv heads over ``tensor``); 0 without a cache."""
    from gdsd_jax.distributed.mesh import named_sharding
    from gdsd_jax.models.denoiser import CACHE_AXES

    if sampling_cfg.cache == "none":
        return 0
    shape = (model_cfg.num_layers, rows, length, model_cfg.num_kv_heads, model_cfg.head_dim)
    one = jax.ShapeDtypeStruct(shape, model_cfg.dtype, sharding=named_sharding(mesh, CACHE_AXES, shape))
    return 2 * per_device_bytes(one)


def _with_shardings(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


@dataclasses.dataclass(frozen=True)
class FunctionMemory:
    """``compiled.memory_analysis()`` of one function, per device, in bytes."""
    argument: int
    output: int
    alias: int
    temp: int
    code: int
    compile_seconds: float

    @property
    def live(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "live": self.live}


def compile_abstract(fn, *args) -> tuple[Any, Any]:
    """Lower and compile ``fn`` (a ``jax.jit`` object) on abstract ``args``; returns the compiled program and
    its abstract outputs with the shardings the compiler chose (inputs for the next phase's compilation)."""
    lowered = fn.lower(*args)
    compiled = lowered.compile()
    return compiled, _with_shardings(lowered.out_info, compiled.output_shardings)


def _compile(fn, *args) -> tuple[FunctionMemory, Any]:
    """:func:`compile_abstract` with the compiled program's memory analysis in place of the program."""
    t0 = time.perf_counter()
    compiled, outs = compile_abstract(fn, *args)
    secs = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = FunctionMemory(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                         alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
                         code=int(m.generated_code_size_in_bytes), compile_seconds=secs)
    return mem, outs


@dataclasses.dataclass
class PlanRow:
    """Memory plan of one (mode, remat) combination on one mesh; all sizes are per-device bytes."""
    model: str
    mode: str
    remat: str
    devices: int
    mesh: dict
    param_dtype: str
    params: int
    adapters: int
    optimizer: int
    reference: int
    buffer: int
    policy_copy: int
    kv_cache: int
    functions: dict[str, FunctionMemory]
    phases: dict[str, int]

    @property
    def resident(self) -> int:
        return self.params + self.adapters + self.optimizer + self.reference

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def headroom(self) -> dict[str, float]:
        """TPU generation -> HBM minus the step peak, in GiB (negative: does not fit)."""
        return {gen: hbm_gib(gen) - self.peak / GIB for gen in TPU_HBM_GB}

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "functions"}
        d["functions"] = {k: v.to_dict() for k, v in self.functions.items()}
        d.update(resident=self.resident, peak=self.peak, peak_phase=self.peak_phase,
                 headroom_gib=self.headroom())
        return d


# ---- planning --------------------------------------------------------------------------------------

def mode_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    """``cfg`` with LoRA switched on (``"lora"``) or off (``"full"``)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; expected one of {MODES}")
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, enabled=(mode == "lora")))


def abstract_inputs(trainer, mesh: Mesh) -> dict:
    """Abstract (sharded) state, frozen tree, prompts, batch and advantages of ``trainer``'s RL step."""
    cfg, mcfg = trainer.cfg, trainer.model_cfg
    rep = NamedSharding(mesh, P())
    params = abstract_params(mcfg, mesh)
    if cfg.lora.enabled:
        shapes = lora_shapes(mcfg, cfg.lora.rank, cfg.lora.targets)
        shards = lora_shardings(mcfg, cfg.lora.rank, cfg.lora.targets, mesh)
        trainable = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh), shapes, shards,
                                 is_leaf=lambda x: isinstance(x, tuple))
        frozen = params
    else:
        trainable = params
        frozen = params if trainer.needs_ref else None
    # AdamW's moments are sharded like the trainable leaves they track, its counters replicated. (What
    # `jax.jit(tx.init)` alone returns is not this: with no input data dependence the compiler is free to
    # place the zeros anywhere, and places them on one device; see docs/memory_plans.md.)
    opt_shapes = jax.eval_shape(trainer.tx.init, trainable)
    opt_state = optax.tree_map_params(
        trainer.tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding), opt_shapes, trainable,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep))
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {"trainable": trainable, "opt_state": opt_state,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
             "key": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rep)}
    rows, lp, lg = trainer.rows, cfg.task.prompt_length, trainer.sampling_cfg.gen_length

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))

    key = jax.eval_shape(lambda: jax.random.key(0))
    gen_rows = trainer.rollout_rows
    return {
        "state": state, "frozen": frozen, "prompt_ids": i32(gen_rows, lp), "prompt_mask": i32(gen_rows, lp),
        "key": jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        "batch": RolloutBatch(sequences=i32(rows, lp + lg), prompt_mask=i32(rows, lp), completion_mask=i32(rows, lg),
                              prompt_len=lp),
        "adv": jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=batch_sharding(mesh, 1)),
    }


def plan_recipe(cfg: TrainConfig, model_cfg: DenoiserConfig, mesh: Mesh, *,
                modes: Sequence[str] = MODES, remats: Sequence[str] = ("none", "full"),
                model_name: str | None = None, progress: bool = True,
                log: Callable[[str], None] | None = None) -> list[PlanRow]:
    """Compile the RL step of ``cfg`` on ``mesh`` for every mode and remat policy; one row per combination.

    Args:
      cfg: a validated run config (its ``lora`` section is switched on/off per mode).
      model_cfg: the model architecture (its ``remat`` is replaced per row).
      mesh: a mesh of (fake) devices; the compiled programs are per-device SPMD programs.
      modes: subset of ``("lora", "full")``.
      remats: subset of :data:`~gdsd_jax.models.config.REMAT_POLICIES`.
      model_name: label of the rows (default: the model family).
      progress: tqdm bar over the compilations.
      log: called with one line per compiled function (name, seconds).
    """
    for r in remats:
        if r not in REMAT_POLICIES:
            raise ValueError(f"remat {r!r}; expected one of {REMAT_POLICIES}")
    if not modes or not remats:
        raise ValueError("plan_recipe needs at least one mode and one remat policy")
    rows: list[PlanRow] = []
    mu = cfg.rl.num_iterations
    n_dev = mesh.devices.size
    bar = tqdm(total=len(modes) * (3 + len(remats)), desc="compiling", unit="fn", disable=not progress)

    def note(name, mem):
        bar.update(1)
        if log:
            log(f"  compiled {name:<22s} {mem.compile_seconds:7.1f} s   temp {mem.temp / GIB:8.3f} GiB")

    for mode in modes:
        mcfg_mode = mode_config(cfg, mode)
        base_trainer = RLTrainer(mcfg_mode, model_cfg.replace(remat=remats[0]), None, mesh, adapter=None, task=None)
        inp = abstract_inputs(base_trainer, mesh)
        state, frozen, batch = inp["state"], inp["frozen"], inp["batch"]
        tr = base_trainer
        funcs: dict[str, FunctionMemory] = {}

        funcs["rollout"], _ = _compile(tr.fns.rollout, state["trainable"], frozen, inp["prompt_ids"],
                                       inp["prompt_mask"], inp["key"], tr.sampling_cfg)
        note("rollout", funcs["rollout"])
        kv_cache = kv_cache_bytes(tr.model_cfg, tr.sampling_cfg, inp["prompt_ids"].shape[0],
                                  inp["prompt_ids"].shape[1] + tr.sampling_cfg.gen_length, mesh)
        funcs["masks"], masks = _compile(tr.fns.draw_masks, inp["key"], batch)
        note("masks", funcs["masks"])
        old = ref = None
        if tr.needs_old:
            # ModelParts.policy: (base, adapters with the scale folded in; same shapes and shardings) or
            # (trainable, None).
            policy = (frozen, state["trainable"]) if tr.parts.lora else (state["trainable"], None)
            funcs["statistics"], old = _compile(tr.fns.statistics, *policy, batch, masks)
            note("statistics", funcs["statistics"])
        if tr.needs_ref:
            rparams, rlora = tr.parts.reference(state["trainable"], frozen)
            if not tr.parts.lora and tr.needs_old:
                # Same function on identically shaped and sharded arguments: the same program.
                funcs["statistics_ref"], ref = funcs["statistics"], old
            else:
                funcs["statistics_ref"], ref = _compile(tr.fns.statistics, rparams, rlora, batch, masks)
            note("statistics_ref", funcs["statistics_ref"])
        else:
            bar.update(1)
        if not tr.needs_old:
            bar.update(1)

        per_iter = per_device_bytes(masks) + per_device_bytes(old) + per_device_bytes(ref)
        buffer = per_device_bytes(batch) + mu * per_iter
        adapters = per_device_bytes(state["trainable"]) if tr.parts.lora else 0
        params = per_device_bytes(frozen if tr.parts.lora else state["trainable"])
        optimizer = per_device_bytes(state["opt_state"])
        reference = per_device_bytes(frozen) if (frozen is not None and not tr.parts.lora) else 0
        misc = per_device_bytes({"step": state["step"], "key": state["key"]})
        resident = params + adapters + optimizer + reference + misc
        # The old statistics are computed with the policy's scaled copy of every B (ModelParts.policy,
        # outside jit), alive during the scoring phase only.
        b_copy = per_device_bytes({t: ab["b"] for t, ab in state["trainable"].items()}) if tr.parts.lora else 0
        score_temp = max(funcs[k].temp for k in ("masks", "statistics", "statistics_ref") if k in funcs)

        for remat in remats:
            tr_r = RLTrainer(mcfg_mode, model_cfg.replace(remat=remat), None, mesh, adapter=None, task=None)
            upd, _ = _compile(tr_r.fns.update, state, frozen, batch, masks, old, ref, inp["adv"])
            note(f"update (remat={remat})", upd)
            f = dict(funcs, update=upd)
            phases = {
                "rollout": optimizer + misc + funcs["rollout"].live,
                "scoring": resident + buffer + (b_copy if tr.needs_old else 0) + score_temp,
                "update": upd.live + (mu - 1) * per_iter,
            }
            rows.append(PlanRow(model=model_name or model_cfg.family, mode=mode, remat=remat, devices=n_dev,
                                mesh=dict(mesh.shape), param_dtype=model_cfg.param_dtype, params=params,
                                adapters=adapters, optimizer=optimizer, reference=reference, buffer=buffer,
                                policy_copy=b_copy, kv_cache=kv_cache, functions=f, phases=phases))
    bar.close()
    return rows


# ---- formatting ------------------------------------------------------------------------------------

def table_unit(rows: Sequence[PlanRow]) -> tuple[str, int]:
    """GiB, or MiB when every peak is below 1 GiB (tiny test models)."""
    return ("GiB", GIB) if max((r.peak for r in rows), default=0) >= GIB else ("MiB", 2 ** 20)


def mesh_label(mesh: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def fits_label(row: PlanRow) -> str:
    """``v5p (+61.2)`` style list of the generations whose HBM holds the step peak, with headroom GiB."""
    ok = [f"{g} (+{h:.1f})" for g, h in sorted(row.headroom().items(), key=lambda kv: TPU_HBM_GB[kv[0]])
          if h > 0]
    return ", ".join(ok) if ok else "none"


def format_table(rows: Sequence[PlanRow], markdown: bool = False) -> str:
    """One line per row, per-device sizes in :func:`table_unit`: state terms, temporaries of rollout /
    statistics / update, the step peak and its phase, and the TPU generations that hold it."""
    unit, scale = table_unit(rows)
    head = ["devices", "mesh", "mode", "remat", "params", "adapters", "optimizer", "reference", "buffer",
            "rollout temp", "kv cache", "stats temp", "update temp", "update args", "peak", "peak phase", "fits (headroom GiB)"]
    lines = []

    def _gib(x: int) -> str:
        return f"{x / scale:.2f}"

    for r in rows:
        stats = max((r.functions[k].temp for k in ("statistics", "statistics_ref") if k in r.functions), default=0)
        lines.append([str(r.devices), mesh_label(r.mesh), r.mode, r.remat, _gib(r.params), _gib(r.adapters),
                      _gib(r.optimizer), _gib(r.reference), _gib(r.buffer), _gib(r.functions["rollout"].temp),
                      _gib(r.kv_cache), _gib(stats), _gib(r.functions["update"].temp), _gib(r.functions["update"].argument),
                      _gib(r.peak), r.peak_phase, fits_label(r)])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])
