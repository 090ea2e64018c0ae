"""LoRA adapters on the mesh: both factors of every pair split over fsdp, and a sharded LoRA update equals the
same update on one device.

Expected shard shapes are written here from the layout (A [N, *in, r], B [N, r, *out]) and the rule "fsdp
goes to the first of (embed dim, rank) in axis order, heads / MLP go to tensor", not read from the code.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.distributed.mesh import make_mesh
from gdsd_jax.models.config import tiny_llada

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _expected_shards(cfg, r: int, fsdp: int, tensor: int) -> dict:
    n, d, h, kv, dh, f = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          cfg.mlp_dim)
    assert d % fsdp == 0 and r % fsdp == 0 and h % tensor == 0 and kv % tensor == 0 and f % tensor == 0
    return {
        # A keeps D first (split over fsdp), so its rank is whole; B has no D, so its rank is split.
        "q": {"a": (n, d // fsdp, r), "b": (n, r // fsdp, h // tensor, dh)},
        "k": {"a": (n, d // fsdp, r), "b": (n, r // fsdp, kv // tensor, dh)},
        "v": {"a": (n, d // fsdp, r), "b": (n, r // fsdp, kv // tensor, dh)},
        "gate": {"a": (n, d // fsdp, r), "b": (n, r // fsdp, f // tensor)},
        "up": {"a": (n, d // fsdp, r), "b": (n, r // fsdp, f // tensor)},
        # o and down: A has no D (rank split); in B the rank comes before D and takes fsdp first.
        "o": {"a": (n, h // tensor, dh, r // fsdp), "b": (n, r // fsdp, d)},
        "down": {"a": (n, f // tensor, r // fsdp), "b": (n, r // fsdp, d)},
    }


@pytest.mark.parametrize("fsdp,tensor", [(8, 1), (4, 2)])
def test_every_adapter_factor_is_split_over_fsdp(fsdp, tensor):
    from gdsd_jax.models.lora import init_lora

    cfg = tiny_llada()
    r = 16
    mesh = make_mesh(data=1, fsdp=fsdp, tensor=tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # divisible rank: no replication warning
        lora = init_lora(cfg, jax.random.key(0), r, TARGETS, mesh)
    expected = _expected_shards(cfg, r, fsdp, tensor)
    for t in TARGETS:
        for f in ("a", "b"):
            x = lora[t][f]
            shapes = {tuple(s.data.shape) for s in x.addressable_shards}
            assert shapes == {expected[t][f]}, (t, f, shapes)
            # Each device holds 1 / (fsdp * tensor-split) of the factor: nothing replicated over fsdp.
            assert "fsdp" in str(x.sharding.spec)


def test_rank_not_divisible_by_fsdp_is_replicated_with_a_warning():
    from gdsd_jax.models.lora import lora_shapes, lora_shardings

    cfg = tiny_llada()
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    with pytest.warns(UserWarning, match=r"B of q.*replicated over the fsdp axis.*lora.rank=4 is not divisible by "
                                         r"fsdp=8"):
        shard = lora_shardings(cfg, 4, ("q", "o"), mesh)
    shapes = lora_shapes(cfg, 4, ("q", "o"))
    n, d = cfg.num_layers, cfg.hidden_size
    assert shard["q"]["b"].shard_shape(shapes["q"]["b"]) == shapes["q"]["b"]          # replicated
    assert shard["q"]["a"].shard_shape(shapes["q"]["a"]) == (n, d // 8, 4)            # still split on D
    assert shard["o"]["b"].shard_shape(shapes["o"]["b"]) == (n, 4, d // 8)            # falls back to D


def test_sharded_lora_update_equals_the_single_device_update(tmp_path):
    """One LoRA RL update (rollout batch, masks, old/ref statistics, AdamW) on the 8-device mesh equals the
    same update on a 1-device mesh, to fp32 round-off of the differently ordered reductions."""
    from gdsd_jax.objectives.advantages import compute_advantages
    from gdsd_jax.objectives.types import RolloutBatch
    from gdsd_jax.rl.trainer import RLTrainer
    from gdsd_jax.training.setup import build_model, build_task_and_adapter
    from tests.test_rl_trainer import tiny_cfg

    cfg = tiny_cfg(tmp_path, "lora.enabled=true", "lora.rank=8", "objective.beta=0.01", "rl.micro_batch_size=16")
    results = []
    for mesh in (make_mesh(data=1, fsdp=8, tensor=1), make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        model_cfg, params = build_model(cfg, mesh)
        task, adapter, _ = build_task_and_adapter(cfg, model_cfg)
        trainer = RLTrainer(cfg, model_cfg, params, mesh, adapter, task)
        state, frozen = trainer.init_state()
        # Make B non-zero so that the adapters change the policy (B = 0 at init).
        state["trainable"] = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size, dtype=x.dtype)
                                                                        ).reshape(x.shape).astype(x.dtype),
                                          state["trainable"])
        examples = list(task.examples("train"))[:4]
        rows = [ex for ex in examples for _ in range(4)]
        pids, pmask = adapter.encode(rows)
        if not results:          # the rollout of the sharded run, reused by both (sampling is not compared)
            out = trainer.fns.rollout(state["trainable"], frozen, pids, pmask, jax.random.key(3), trainer.sampling_cfg)
            seqs, cmask = np.asarray(out.sequences), np.asarray(out.completion_mask)
            rewards = adapter.score(seqs[:, pids.shape[1]:], cmask, rows).rewards
        batch = RolloutBatch(sequences=jnp.asarray(seqs), prompt_mask=jnp.asarray(pmask),
                             completion_mask=jnp.asarray(cmask), prompt_len=pids.shape[1])
        masks = trainer.fns.draw_masks(jax.random.key(4), batch)
        # One micro-batch of all 16 rows: masks and statistics are already grouped as the update wants them.
        old = (trainer.fns.statistics(*trainer.parts.policy(state["trainable"], frozen), batch, masks)
               if trainer.needs_old else None)
        ref = trainer.fns.statistics(*trainer.parts.reference(state["trainable"], frozen), batch, masks)
        adv = compute_advantages(jnp.asarray(rewards), 4)
        before = jax.tree.map(np.asarray, state["trainable"])
        new_state, m = trainer.fns.update(state, frozen, batch, masks, old, ref, adv)
        results.append((before, jax.tree.map(np.asarray, new_state["trainable"]), float(m["loss"]),
                        new_state["trainable"]))
    (b0, p0, l0, sharded), (b1, p1, l1, _) = results
    for a, b in zip(jax.tree.leaves(b0), jax.tree.leaves(b1)):
        np.testing.assert_array_equal(a, b)                         # same starting adapters
    assert "fsdp" in str(sharded["q"]["b"].sharding.spec)           # the update kept B of q split
    assert l0 == pytest.approx(l1, rel=1e-5, abs=1e-7)
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(b0)))
    assert moved > 1e-6
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
