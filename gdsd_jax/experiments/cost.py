"""Compiled cost of an RL step and a roofline step-time estimate, per device, without weights or a TPU.

Each phase of one GDSD RL step is compiled ahead of time on abstract sharded inputs (as
:mod:`gdsd_jax.experiments.plan` does for memory) and ``compiled.cost_analysis()`` is read: ``flops``,
``bytes accessed`` and, from the TPU compiler, its own ``optimal_seconds``. The compiled program is the
per-device SPMD program, so all three are per device. A phase's time is then bounded below by the roofline

    t = max(flops / peak_flops, bytes / hbm_bandwidth)

with the chip's published bf16 peak and HBM bandwidth (:data:`CHIPS`, the one table of those figures).

**Loops.** XLA's cost analysis counts the body of a ``while`` loop once, whatever its trip count (checked on
the CPU and TPU compilers, ``tests/test_cost.py``). Every loop of the step is therefore taken out of the
compiled program and its trip count multiplied in here:

* the layer stack (``lax.scan`` over stacked weights): the model is compiled with ``scan_layers=False``
  (a Python loop, straight-line code) at depth 2 and 3, and the cost at depth ``N`` is
  ``c(2) + (N - 2) (c(3) - c(2))`` (:func:`extrapolate_depth`). Depths 2 and 3, not 1 and 2: the first
  layer fuses differently with the embedding (its bytes differ from an interior layer's, by ~20% on a test
  model), while every further layer adds the same cost (``tests/test_cost.py`` checks depth 5 exactly);
* the denoising loop of a rollout: one denoising step's forward is compiled and multiplied by the number of
  steps (exact sampler: ``sampling.steps`` forwards over the full row; dual cache: per block one full
  forward that refreshes the cache and ``steps_per_block - 1`` forwards of the block against the cache);
* the micro-batch loops (``lax.map`` of the statistics, ``lax.scan`` of the update's gradient
  accumulation): compiled for one micro-batch and multiplied by the number of micro-batches;
* the chunked LM head of the scoring passes (a scan over positions and vocabulary chunks): compiled
  unchunked (``objective.vocab_chunk`` / ``seq_chunk`` = None), the same products in one program.

What is left out, and so not counted: the samplers' per-step selection (gumbel argmax, confidences, top-k /
top-p over the step's logits), mask drawing, and the collectives' time (the roofline uses HBM traffic
only; FSDP's all-gathers of the weights travel over ICI, which these figures do not model). Each update is
counted with its AdamW step once per micro-batch (an upper bound on that small term).

These are compiled estimates, not measurements: a lower bound on a phase's time when the compiler's
counts are right and the chip runs at its peak.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import batch_sharding, named_sharding
from gdsd_jax.experiments.plan import MODES, abstract_inputs, compile_abstract, mode_config
from gdsd_jax.models import denoiser
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.objectives.types import RolloutBatch
from gdsd_jax.rl.step import StepContext, compile_step
from gdsd_jax.rl.trainer import RLTrainer
from gdsd_jax.training.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Chip:
    """Peak figures of one chip: dense bf16 matmul FLOP/s and HBM bytes/s."""
    name: str
    peak_flops: float
    hbm_bandwidth: float
    source: str


#: The chips' figures, the one place they are stated. TPU: Cloud TPU's system-architecture pages ("peak
#: compute per chip (bf16)", "HBM bandwidth"), per chip (v4 and v5p: both TensorCores of the megacore chip,
#: which is one JAX device). cpu: the measured reference of the CPU cross-check (benchmarks/step_time.py
#: --cpu-check measures both on the machine it runs on and uses those; these are the figures measured on the
#: project's 2-core build machine, fp32 ``jnp.dot`` of 4096^3 and a 256 MiB ``x + 1`` read + write).
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 275e12, 1200e9, "Cloud TPU v4 system architecture: 275 TFLOPS bf16, 1200 GB/s HBM2"),
    "v5e": Chip("v5e", 197e12, 819e9, "Cloud TPU v5e system architecture: 197 TFLOPS bf16, 819 GB/s HBM2"),
    "v5p": Chip("v5p", 459e12, 2765e9, "Cloud TPU v5p system architecture: 459 TFLOPS bf16, 2765 GB/s HBM2e"),
    "v6e": Chip("v6e", 918e12, 1640e9, "Cloud TPU v6e system architecture: 918 TFLOPS bf16, 1640 GB/s HBM"),
}


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per-device cost of one compiled program (or a sum of them): FLOPs, HBM bytes accessed and the TPU
    compiler's own time estimate (``None`` where the compiler does not give one, e.g. XLA:CPU)."""
    flops: float
    bytes: float
    optimal_seconds: float | None = None

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes, _opt(self.optimal_seconds,
                                                                             other.optimal_seconds, 1.0))

    def __sub__(self, other: "Cost") -> "Cost":
        return Cost(self.flops - other.flops, self.bytes - other.bytes, _opt(self.optimal_seconds,
                                                                             other.optimal_seconds, -1.0))

    def scale(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.bytes * k, None if self.optimal_seconds is None else self.optimal_seconds * k)

    def roofline(self, chip: Chip) -> "Roofline":
        return roofline(self, chip)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _opt(a: float | None, b: float | None, sign: float) -> float | None:
    return None if a is None or b is None else a + sign * b


ZERO = Cost(0.0, 0.0, 0.0)


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Roofline of a cost on a chip: compute time, memory time, their max and which bounds it."""
    compute_seconds: float
    memory_seconds: float

    @property
    def seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_seconds >= self.memory_seconds else "memory"


def roofline(cost: Cost, chip: Chip) -> Roofline:
    """``flops / peak`` and ``bytes / bandwidth`` of ``cost`` on ``chip`` (seconds)."""
    return Roofline(cost.flops / chip.peak_flops, cost.bytes / chip.hbm_bandwidth)


def read_cost(compiled) -> Cost:
    """The cost analysis of a compiled program (``jax.jit(f).lower(...).compile()``): per-device FLOPs, bytes
    accessed and the TPU compiler's ``optimal_seconds`` (None when absent). Loop bodies count once (module
    docstring)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):        # older jax: one dict per computation
        ca = ca[0] if ca else {}
    if not ca or "flops" not in ca:
        raise RuntimeError("the compiler gave no cost analysis (flops) for this program")
    opt = ca.get("optimal_seconds")
    return Cost(float(ca["flops"]), float(ca.get("bytes accessed", 0.0)), None if opt is None else float(opt))


#: The two depths compiled for :func:`extrapolate_depth`.
PROBE_DEPTHS: tuple[int, int] = (2, 3)


def extrapolate_depth(c2: Cost, c3: Cost, num_layers: int) -> Cost:
    """Cost of an ``num_layers``-layer model from its 2- and 3-layer compilations: ``c2 + (N - 2)(c3 - c2)``."""
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 to extrapolate from depths 2 and 3, got {num_layers}")
    return c2 + (c3 - c2).scale(num_layers - 2)


# ---- the phases ------------------------------------------------------------------------------------

#: Phases in table order: the two rollout samplers, scoring (old and reference statistics), update.
PHASES: tuple[str, ...] = ("rollout_exact", "rollout_dual", "statistics", "update")


@dataclasses.dataclass
class CostRow:
    """Per-device cost of one RL step of a recipe on one mesh, per phase (whole step: every loop's trip
    count multiplied in), with the unit programs and counts it was built from."""
    model: str
    mode: str
    devices: int
    mesh: dict
    target: str
    phases: dict[str, Cost]
    units: dict[str, Cost]              # one call of each unit program (full depth)
    counts: dict[str, float]            # calls of each unit program per step
    rollout_tokens: int                 # generated tokens per step (global)
    compile_seconds: float

    def step(self, rollout: str) -> Cost:
        """Cost of the whole RL step with the ``rollout_exact`` or ``rollout_dual`` sampler."""
        return self.phases[rollout] + self.phases["statistics"] + self.phases["update"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["phases"] = {k: v.to_dict() for k, v in self.phases.items()}
        d["units"] = {k: v.to_dict() for k, v in self.units.items()}
        return d


def _cost_config(cfg: TrainConfig, mode: str) -> TrainConfig:
    """The mode's config with the scoring's LM head unchunked (its chunk loops would count once)."""
    c = mode_config(cfg, mode)
    return dataclasses.replace(c, objective=dataclasses.replace(c.objective, vocab_chunk=None, seq_chunk=None))


def _micro_inputs(tr: RLTrainer, mesh: Mesh) -> dict:
    """Abstract inputs of one micro-batch (``rl.micro_batch_size`` rows) for the statistics and update."""
    inp = abstract_inputs(tr, mesh)
    rows, lp, lg = tr.cfg.rl.micro_batch_size, tr.cfg.task.prompt_length, tr.sampling_cfg.gen_length

    def i32(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding(mesh, len(shape)))

    inp["batch"] = RolloutBatch(sequences=i32(rows, lp + lg), prompt_mask=i32(rows, lp),
                                completion_mask=i32(rows, lg), prompt_len=lp)
    inp["adv"] = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=batch_sharding(mesh, 1))
    return inp


def _unit_costs(cfg: TrainConfig, model_cfg: DenoiserConfig, mesh: Mesh,
                note: Callable[[str, float], None]) -> dict[str, Cost]:
    """Cost of one call of each unit program for ``model_cfg`` (loop-free: ``scan_layers=False``)."""
    tr = RLTrainer(cfg, model_cfg, None, mesh, adapter=None, task=None)
    one = compile_step(StepContext(tr.parts, tr.objective, tr.obj_cfg, tr.tx, mesh, 1))
    inp = _micro_inputs(tr, mesh)
    state, frozen, batch = inp["state"], inp["frozen"], inp["batch"]
    scfg = tr.sampling_cfg
    lp, lg, blk = cfg.task.prompt_length, scfg.gen_length, scfg.llada_block_length
    lead = denoiser.context_lead(model_cfg)
    head = lg if model_cfg.family == "dream" and not scfg.blockwise else blk   # logits per exact step
    rows = tr.rollout_rows
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    tokens = jax.ShapeDtypeStruct((rows, lp + lg), jnp.int32, sharding=batch_sharding(mesh, 2))
    am = tokens
    cache_shape = (model_cfg.num_layers, rows, lp + lg, model_cfg.num_kv_heads, model_cfg.head_dim)
    kv = jax.ShapeDtypeStruct(cache_shape, model_cfg.dtype,
                              sharding=named_sharding(mesh, denoiser.CACHE_AXES, cache_shape))
    cache = denoiser.KVCache(kv, kv)
    start = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    parts, mesh_kw = tr.parts, dict(mesh=mesh)

    def pos(n, s):
        return jnp.broadcast_to(s + jnp.arange(n, dtype=jnp.int32), (rows, n))

    def exact_step(trainable, frozen, x, am, s):
        params, lora = parts.policy(trainable, frozen)
        return denoiser.logits(params, model_cfg, x, am, positions=pos(head, s), lora=lora, **mesh_kw)

    def full_step(trainable, frozen, x, am, s):
        params, lora = parts.policy(trainable, frozen)
        return denoiser.logits_and_cache(params, model_cfg, x, am, positions=pos(blk, s), lora=lora, **mesh_kw)

    def cached_step(trainable, frozen, c, x, am, s):
        params, lora = parts.policy(trainable, frozen)
        return denoiser.cached_logits(params, model_cfg, c, x, am, s + lead, blk, blk, lora=lora, **mesh_kw)

    units: dict[str, Cost] = {}

    def run(name, fn, *args):
        t0 = time.perf_counter()
        compiled, outs = compile_abstract(fn, *args)
        units[name] = read_cost(compiled)
        note(name, time.perf_counter() - t0)
        return outs

    run("exact_step", jax.jit(exact_step), state["trainable"], frozen, tokens, am, start)
    run("full_step", jax.jit(full_step), state["trainable"], frozen, tokens, am, start)
    run("cached_step", jax.jit(cached_step), state["trainable"], frozen, cache, tokens, am, start)
    masks = run("masks", one.draw_masks, inp["key"], batch)
    old = ref = None
    if tr.needs_old:
        # ModelParts.policy on abstract leaves: same shapes and shardings, the scale folded in (plan.py).
        policy = (frozen, state["trainable"]) if parts.lora else (state["trainable"], None)
        old = run("statistics", one.statistics, *policy, batch, masks)
    if tr.needs_ref:
        ref = run("statistics_ref", one.statistics, *parts.reference(state["trainable"], frozen), batch, masks)
    run("update", one.update, state, frozen, batch, masks, old, ref, inp["adv"])
    return units


def step_counts(cfg: TrainConfig, needs_old: bool, needs_ref: bool) -> dict[str, float]:
    """Calls of each unit program per RL step (the loops' trip counts): exact rollout ``steps`` forwards;
    dual-cache rollout per block ``ceil(spb / refresh)`` full forwards and the rest against the cache; per
    inner iteration, one statistics pass per micro-batch for the old and the reference policy, one update
    per micro-batch (and ``mask`` draws, counted but cheap)."""
    s = cfg.sampling
    nb, spb = s.num_blocks, s.steps_per_block
    refresh = s.cache_refresh_every or spb
    full = math.ceil(spb / refresh)
    rl = cfg.rl
    n_micro = rl.prompts_per_step * rl.num_generations // rl.micro_batch_size
    per_iter = rl.num_iterations * n_micro
    return {"exact_step": float(s.steps), "full_step": float(nb * full), "cached_step": float(nb * (spb - full)),
            "masks": float(per_iter), "statistics": float(per_iter if needs_old else 0),
            "statistics_ref": float(per_iter if needs_ref else 0), "update": float(per_iter)}


def cost_recipe(cfg: TrainConfig, model_cfg: DenoiserConfig, mesh: Mesh, *, target: str,
                modes: Sequence[str] = MODES, model_name: str | None = None,
                log: Callable[[str], None] | None = None) -> list[CostRow]:
    """Per-device cost of one RL step of ``cfg`` on ``mesh``, per phase, for every mode.

    Args:
      cfg: a validated run config (its ``lora`` section is switched per mode; the rollout's sampler settings
        give the trip counts of both rollouts).
      model_cfg: the full model (its depth is extrapolated from 2- and 3-layer compilations).
      mesh: mesh of (fake CPU or abstract TPU) devices.
      target: label of the compiler (``cpu`` or a TPU generation).
      log: called with one line per compiled program.
    """
    rows: list[CostRow] = []
    for mode in modes:
        mcfg = _cost_config(cfg, mode)
        t0 = time.perf_counter()

        def note(name, secs, depth=None):
            if log:
                log(f"  compiled {mode} {name:<15s} (depth {depth}) {secs:6.1f} s")

        per_depth = []
        for depth in PROBE_DEPTHS:
            small = model_cfg.replace(num_layers=depth, scan_layers=False)
            per_depth.append(_unit_costs(mcfg, small, mesh, lambda n, s, d=depth: note(n, s, d)))
        units = {k: extrapolate_depth(per_depth[0][k], per_depth[1][k], model_cfg.num_layers) for k in per_depth[0]}
        tr = RLTrainer(mcfg, model_cfg, None, mesh, adapter=None, task=None)
        counts = step_counts(mcfg, tr.needs_old, tr.needs_ref)
        tot = {k: units[k].scale(counts[k]) if k in units else ZERO for k in counts}
        phases = {"rollout_exact": tot["exact_step"], "rollout_dual": tot["full_step"] + tot["cached_step"],
                  "statistics": tot["masks"] + tot["statistics"] + tot["statistics_ref"], "update": tot["update"]}
        rows.append(CostRow(model=model_name or model_cfg.family, mode=mode, devices=mesh.devices.size,
                            mesh=dict(mesh.shape), target=target, phases=phases, units=units, counts=counts,
                            rollout_tokens=tr.rollout_rows * cfg.sampling.gen_length,
                            compile_seconds=time.perf_counter() - t0))
    return rows


# ---- formatting ------------------------------------------------------------------------------------

def format_cost_table(rows: Sequence[CostRow], chip: Chip, markdown: bool = False) -> str:
    """One line per (row, phase): TFLOP and GB per device, the roofline time and its bound, the compiler's
    ``optimal_seconds``; then per row the step time (exact / dual rollout) and rollout tokens/s."""
    head = ["devices", "mode", "phase", "TFLOP/dev", "GB/dev", "flop/byte", "compute s", "memory s", "roofline s",
            "bound", "compiler s"]
    lines = []
    for r in rows:
        entries = list(r.phases.items()) + [("step (exact)", r.step("rollout_exact")),
                                             ("step (dual)", r.step("rollout_dual"))]
        for name, c in entries:
            rf = c.roofline(chip)
            lines.append([str(r.devices), r.mode, name, f"{c.flops / 1e12:.2f}", f"{c.bytes / 1e9:.2f}",
                          f"{c.flops / max(c.bytes, 1.0):.0f}", f"{rf.compute_seconds:.3f}",
                          f"{rf.memory_seconds:.3f}", f"{rf.seconds:.3f}", rf.bound,
                          "-" if c.optimal_seconds is None else f"{c.optimal_seconds:.3f}"])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


def rollout_tokens_per_second(row: CostRow, chip: Chip, rollout: str) -> float:
    """Generated tokens per second of the whole slice at the roofline time of ``rollout``."""
    return row.rollout_tokens / row.phases[rollout].roofline(chip).seconds


def summary_lines(rows: Sequence[CostRow], chip: Chip) -> list[str]:
    """Per row: step time with each rollout, the dominant phase and the rollout's generated tokens/s."""
    out = []
    for r in rows:
        parts = []
        for ro in ("rollout_exact", "rollout_dual"):
            times = {k: r.phases[k].roofline(chip).seconds for k in (ro, "statistics", "update")}
            top = max(times, key=times.get)
            parts.append(f"{ro.split('_')[1]}: step {sum(times.values()):.2f} s ({top} {times[top] / sum(times.values()):.0%}), "
                         f"rollout {rollout_tokens_per_second(r, chip, ro):.0f} tok/s")
        out.append(f"{r.devices} chips {r.mode}: " + "; ".join(parts))
    return out


__all__ = ["CHIPS", "Chip", "Cost", "CostRow", "PHASES", "Roofline", "cost_recipe", "extrapolate_depth",
           "format_cost_table", "read_cost", "roofline", "rollout_tokens_per_second", "step_counts",
           "summary_lines"]
