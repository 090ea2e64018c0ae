"""Compiled cost and roofline (gdsd_jax/experiments/cost.py): the arithmetic against closed forms, the
cost reading against the FLOPs of a known matmul, the loop behaviour the method is built around, the depth
extrapolation against a directly compiled deeper model, and the ``plan --cost`` flag."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.experiments.cost import (
    CHIPS,
    Chip,
    Cost,
    CostRow,
    extrapolate_depth,
    format_cost_table,
    read_cost,
    roofline,
    step_counts,
    summary_lines,
)


def _cost(fn, *shapes):
    return read_cost(jax.jit(fn).lower(*shapes).compile())


def test_roofline_closed_form():
    chip = Chip("test", peak_flops=1e12, hbm_bandwidth=1e9, source="made up")
    compute = roofline(Cost(flops=3e12, bytes=2e9), chip)          # 3 s of compute, 2 s of memory
    assert (compute.compute_seconds, compute.memory_seconds, compute.seconds, compute.bound) == (3.0, 2.0, 3.0,
                                                                                                  "compute")
    memory = roofline(Cost(flops=1e12, bytes=5e9), chip)
    assert (memory.seconds, memory.bound) == (5.0, "memory")
    # Sums and scaling: (a + b) * k, optimal_seconds carried along (None stays None).
    c = (Cost(1.0, 2.0, 0.5) + Cost(3.0, 4.0, 0.25)).scale(2.0)
    assert (c.flops, c.bytes, c.optimal_seconds) == (8.0, 12.0, 1.5)
    assert (Cost(1.0, 1.0, None) + Cost(1.0, 1.0, 2.0)).optimal_seconds is None


def test_chip_table_states_the_published_figures():
    """One table, the figures of the Cloud TPU pages (bf16 TFLOP/s, HBM GB/s)."""
    got = {k: (c.peak_flops / 1e12, c.hbm_bandwidth / 1e9) for k, c in CHIPS.items()}
    assert got == {"v4": (275, 1200), "v5e": (197, 819), "v5p": (459, 2765), "v6e": (918, 1640)}
    assert all(str(int(c.peak_flops / 1e12)) in c.source for c in CHIPS.values())


def test_read_cost_counts_two_mnk_flops_for_a_matmul():
    m, k, n = 64, 48, 80
    c = _cost(jnp.dot, jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    assert c.flops == 2 * m * n * k
    assert c.bytes == 4 * (m * k + k * n + m * n)                  # read both operands, write the result


def test_a_loop_body_is_counted_once_whatever_the_trip_count():
    """Why the estimate multiplies trip counts itself: XLA's cost analysis does not."""
    x = jax.ShapeDtypeStruct((32, 32), jnp.float32)
    body = lambda c: jnp.tanh(c @ c)                                 # noqa: E731
    one = _cost(body, x)
    fori = _cost(lambda a: jax.lax.fori_loop(0, 10, lambda i, c: body(c), a), x)
    scan = _cost(lambda a: jax.lax.scan(lambda c, _: (body(c), None), a, None, length=10)[0], x)
    unrolled = _cost(lambda a: jax.lax.scan(lambda c, _: (body(c), None), a, None, length=10, unroll=True)[0], x)
    matmul = 2 * 32 ** 3
    assert one.flops == pytest.approx(matmul, rel=0.01)
    assert fori.flops == pytest.approx(matmul, rel=0.01) and scan.flops == pytest.approx(matmul, rel=0.01)
    assert unrolled.flops == pytest.approx(10 * matmul, rel=0.01)


def test_depth_extrapolation_equals_the_directly_compiled_deeper_model():
    from gdsd_jax.models import denoiser
    from gdsd_jax.models.config import tiny_llada

    def forward_cost(layers, scan):
        cfg = tiny_llada(num_layers=layers, scan_layers=scan)
        params = denoiser.abstract_params(cfg)
        tokens = jax.ShapeDtypeStruct((2, 24), jnp.int32)
        return _cost(lambda p, t: denoiser.logits(p, cfg, t), params, tokens)

    c2, c3, c5 = forward_cost(2, False), forward_cost(3, False), forward_cost(5, False)
    est = extrapolate_depth(c2, c3, 5)
    assert est.flops == pytest.approx(c5.flops, rel=1e-6)
    assert est.bytes == pytest.approx(c5.bytes, rel=1e-6)
    # The scanned model's cost analysis sees one layer: far below the real five.
    assert forward_cost(5, True).flops < 0.5 * c5.flops
    with pytest.raises(ValueError, match="num_layers"):
        extrapolate_depth(c2, c3, 1)


def test_step_counts_are_the_loops_trip_counts():
    from gdsd_jax.config_io import load_config, resolve_config_path
    from gdsd_jax.training.config import TrainConfig

    cfg = load_config(TrainConfig, resolve_config_path("configs/llada_8b_math.yaml"), []).validate()
    s, rl = cfg.sampling, cfg.rl
    n_micro = rl.prompts_per_step * rl.num_generations // rl.micro_batch_size          # 256 / 64
    counts = step_counts(cfg, needs_old=True, needs_ref=True)
    # 256 steps over 8 blocks of 32: the dual cache refreshes once per block and runs 31 cached steps.
    assert (s.steps, s.num_blocks, n_micro, rl.num_iterations) == (256, 8, 4, 8)
    assert counts == {"exact_step": 256, "full_step": 8, "cached_step": 8 * 31, "masks": 32, "statistics": 32,
                      "statistics_ref": 32, "update": 32}
    refresh = load_config(TrainConfig, resolve_config_path("configs/llada_8b_math.yaml"),
                          ["sampling.cache=dual", "sampling.cache_refresh_every=8"]).validate()
    c = step_counts(refresh, needs_old=False, needs_ref=True)
    assert (c["full_step"], c["cached_step"], c["statistics"]) == (8 * 4, 8 * 28, 0)


def _row(**phases):
    zero = Cost(0.0, 0.0, 0.0)
    ph = {k: phases.get(k, zero) for k in ("rollout_exact", "rollout_dual", "statistics", "update")}
    return CostRow(model="m", mode="lora", devices=8, mesh={"data": 1, "fsdp": 8, "tensor": 1}, target="v5p",
                   phases=ph, units={}, counts={}, rollout_tokens=1000, compile_seconds=0.0)


def test_table_and_summary_by_hand():
    chip = Chip("t", peak_flops=1e12, hbm_bandwidth=1e9, source="")
    row = _row(rollout_exact=Cost(4e12, 1e9, 3.0), rollout_dual=Cost(1e12, 2e9, 1.0),
               statistics=Cost(1e12, 1e9, 0.5), update=Cost(3e12, 1e9, 2.0))
    table = format_cost_table([row], chip).splitlines()
    exact = next(line.split() for line in table if "rollout_exact" in line)
    assert exact[3:] == ["4.00", "1.00", "4000", "4.000", "1.000", "4.000", "compute", "3.000"]
    dual = next(line.split() for line in table if "rollout_dual" in line)
    assert dual[-2] == "memory"
    step = next(line.split() for line in table if "(dual)" in line)
    # step (dual) = rollout_dual + statistics + update = 5e12 flops, 4e9 bytes: compute 5 s, memory 4 s.
    assert step[-5:] == ["5.000", "4.000", "5.000", "compute", "3.500"]
    (line,) = summary_lines([row], chip)
    # exact: 4 + 1 + 3 = 8 s, rollout 50%, 1000 tokens / 4 s; dual: 2 + 1 + 3 = 6 s, update 50%, 1000 / 2 s.
    assert line == ("8 chips lora: exact: step 8.00 s (rollout_exact 50%), rollout 250 tok/s; "
                    "dual: step 6.00 s (update 50%), rollout 500 tok/s")


def test_cost_without_a_tpu_target_fails_in_one_line():
    from gdsd_jax.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--devices", "8", "--cost"])
    msg = str(e.value)
    assert "--cost needs a TPU --target" in msg and "\n" not in msg


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (the TPU compiler, pip install \"gdsd-jax[tpu]\") for a deviceless compile")
def test_deviceless_tpu_compile_reports_per_device_flops_and_optimal_seconds():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from gdsd_jax.experiments.plan import tpu_devices

    mesh = Mesh(np.asarray(tpu_devices("v5p", 4)), ("x",))
    m, k, n = 1024, 512, 768
    a = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    b = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    c = _cost(jnp.dot, a, b)
    assert c.flops == pytest.approx(2 * m * n * k / 4, rel=0.01)     # rows split over 4 chips: per device
    assert c.optimal_seconds is not None and c.optimal_seconds > 0
