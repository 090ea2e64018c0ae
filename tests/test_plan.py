"""``gdsd-jax plan``: per-device memory of the RL step from ahead-of-time compilation on fake devices.

The state terms are checked against closed forms written here from the parameter layout and the logical
sharding rules (``embed`` -> fsdp, heads / mlp / vocab -> tensor, norms replicated; the LoRA rank over fsdp when divisible, else replicated),
not against the code's own accounting.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/sudoku_tiny.yaml"
# The sudoku_tiny architecture, pinned here: D 64, N 3 layers, H = KV = 4 heads of 16, MLP 256, vocabulary 8,
# learned absolute positions [64, D], fp32 parameters.
D, N, H, DH, F, V, MAXLEN = 64, 3, 4, 16, 256, 8, 64
MODEL = (f"model.overrides={{hidden_size: {D}, num_layers: {N}, num_heads: {H}, num_kv_heads: {H}, head_dim: {DH}, "
         f"mlp_dim: {F}, max_seq_len: {MAXLEN}, learned_positions: true, param_dtype: float32}}")
# 8 rows per step in one micro-batch: one row per device on the 8-device mesh (fast to compile).
SMALL = [MODEL, "rl.prompts_per_step=2", "rl.num_generations=4", "rl.micro_batch_size=8"]


def _plan(tmp_path, *argv) -> dict:
    from gdsd_jax.cli import main

    out = tmp_path / "plan.json"
    rc = main(["plan", "--config", str(TINY), "--json", str(out), "--no-progress", *argv])
    assert rc == 0
    return json.loads(out.read_text())


def _rows(plan: dict) -> dict:
    return {(r["mode"], r["remat"]): r for r in plan["rows"]}


def params_bytes_per_device(fsdp: int) -> int:
    """Every matrix is split over fsdp along its model dimension D; the norms are replicated."""
    # embed, lm_head, q k v o, gate up down, position embedding
    sharded = 2 * V * D + 4 * N * D * H * DH + 3 * N * D * F + MAXLEN * D
    replicated = 2 * N * D + D                                    # attn_norm, mlp_norm, final_norm
    assert sharded % fsdp == 0
    return 4 * (sharded // fsdp + replicated)


def lora_bytes_per_device(fsdp: int, r: int) -> int:
    """A [N, *in, r], B [N, r, *out]; only a D dimension is split (over fsdp), heads/MLP over tensor = 1."""
    on_d = 3 * N * D * r + 2 * N * D * r + 2 * N * r * D         # A of q,k,v and gate,up; B of o and down
    elsewhere = 3 * N * r * H * DH + 2 * N * r * F + N * H * DH * r + N * F * r   # B of q,k,v, gate,up; A of o, down
    return 4 * (on_d // fsdp + elsewhere)


def test_full_finetuning_bytes_match_closed_form_and_remat_lowers_temporaries(tmp_path):
    plan = _plan(tmp_path, "--devices", "8", "--full", "--remat", "none", "--remat", "full",
                 *SMALL, "objective.beta=0.01")
    rows = _rows(plan)
    assert set(rows) == {("full", "none"), ("full", "full")}
    expected = params_bytes_per_device(8)
    for row in rows.values():
        assert row["devices"] == 8 and row["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
        assert row["params"] == expected
        # beta != 0: a reference copy of the weights, sharded like them.
        assert row["reference"] == expected
        assert row["adapters"] == 0
        # AdamW: mu and nu shaped and sharded like the parameters (fp32), plus scalar step counters.
        assert 0 <= row["optimizer"] - 2 * expected <= 64
        assert row["peak"] >= row["params"] + row["optimizer"] + row["reference"]
    # Rematerialising the blocks stores one [B, L, D] carry per layer instead of every intermediate.
    assert rows[("full", "full")]["functions"]["update"]["temp"] < rows[("full", "none")]["functions"]["update"]["temp"]


def test_lora_bytes_match_closed_form(tmp_path):
    # Rank 4 does not divide fsdp = 8: the adapters' rank dims stay replicated, and the plan says so.
    with pytest.warns(UserWarning, match=r"lora\.rank=4 is not divisible by fsdp=8"):
        plan = _plan(tmp_path, "--devices", "8", "--lora", "--remat", "full", *SMALL, "lora.rank=4")
    (row,) = plan["rows"]
    assert row["mode"] == "lora"
    assert row["params"] == params_bytes_per_device(8)      # the frozen base
    assert row["adapters"] == lora_bytes_per_device(8, 4)
    assert row["reference"] == 0                            # the base with adapters off is the reference
    # The trainer's scaled copy of every B: B of o and down is [N, r, D] (split over fsdp), the others
    # [N, r, heads, Dh] or [N, r, F] (replicated).
    assert row["policy_copy"] == 4 * (2 * N * 4 * D // 8 + 3 * N * 4 * H * DH + 2 * N * 4 * F)
    assert 0 <= row["optimizer"] - 2 * row["adapters"] <= 64


@pytest.mark.slow
def test_rollout_kv_cache_is_counted(tmp_path):
    """sampling.cache=dual: k and v [N, B, L, KV, Dh] fp32, the 8 rollout rows split over fsdp = 8."""
    small = [*SMALL, "rl.rollout_prompts_per_step=2", "lora.rank=8"]    # 8 rollout rows, one per device
    plan = _plan(tmp_path, "--devices", "8", "--lora", "--remat", "full", *small,
                 "sampling.cache=dual", "sampling.block_length=8", "sampling.steps=16")
    (row,) = plan["rows"]
    expected = 2 * N * 1 * (17 + 16) * H * DH * 4          # prompt 17 + completion 16 positions
    assert row["kv_cache"] == expected
    assert row["functions"]["rollout"]["temp"] >= expected   # the cache lives inside the compiled rollout
    exact = _plan(tmp_path, "--devices", "8", "--lora", "--remat", "full", *small)
    assert exact["rows"][0]["kv_cache"] == 0


@pytest.mark.slow
def test_more_devices_than_this_process_runs_in_a_child(tmp_path):
    """This test process has 8 CPU devices; 16 needs a child process with its own device count."""
    import jax

    assert len(jax.devices()) < 16
    plan = _plan(tmp_path, "--devices", "16", "--lora", "--remat", "none", MODEL, "rl.prompts_per_step=4",
                 "rl.num_generations=4", "rl.micro_batch_size=16", "lora.rank=4")
    (row,) = plan["rows"]
    assert row["devices"] == 16 and row["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert row["params"] == params_bytes_per_device(16)
    assert row["adapters"] == lora_bytes_per_device(16, 4)


# ---- mesh and model resolution (no compilation) --------------------------------------------------

def _cfg(*overrides) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/llada_8b_sudoku.yaml", list(overrides)).validate()


def test_auto_mesh_splits_the_micro_batch_over_fsdp_then_tensor():
    from gdsd_jax.experiments.plan import auto_mesh
    from gdsd_jax.models.config import llada_8b

    cfg, model = _cfg(), llada_8b()          # micro-batch 32 rows, 32 heads
    assert auto_mesh(8, cfg, model) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert auto_mesh(32, cfg, model) == {"data": 1, "fsdp": 32, "tensor": 1}
    # 32 rows cannot be split 64 ways: the remaining factor 2 goes to the heads.
    assert auto_mesh(64, cfg, model) == {"data": 1, "fsdp": 32, "tensor": 2}
    with pytest.raises(ValueError, match="positive"):
        auto_mesh(0, cfg, model)


def test_mesh_that_does_not_split_the_batch_is_refused():
    from gdsd_jax.experiments.plan import mesh_from_spec
    from gdsd_jax.models.config import llada_8b

    with pytest.raises(ValueError, match="micro_batch_size=12"):
        mesh_from_spec("data=1,fsdp=8,tensor=1", 8, _cfg("rl.micro_batch_size=12", "rl.prompts_per_step=16"),
                       llada_8b())


def test_model_is_resolved_without_weights():
    from gdsd_jax.experiments.plan import resolve_model_config

    model, source = resolve_model_config(_cfg())      # checkpoint absent here: family from its name, bf16
    assert (model.family, model.num_layers, model.hidden_size, model.param_dtype) == ("llada", 32, 4096, "bfloat16")
    assert model.remat == "full" and "name" in source
    model, _ = resolve_model_config(_cfg(), preset_name="dream_7b", param_dtype="float32")
    assert (model.family, model.param_dtype) == ("dream", "float32")
    with pytest.raises(ConfigError, match="--preset"):
        resolve_model_config(_cfg("model.checkpoint=checkpoints/mystery"))
