"""The model's execution switches (``DenoiserConfig.attention_impl``, ``merge_projections``,
``merge_token_dims``, ``scan_layers``) against the portable reference path, in float32 on a tiny model.

Each switch reformulates the same function for XLA:CPU: its logits, and the gradients of a loss with respect
to the weights and to LoRA adapters, must equal the reference's up to float32 rounding (the reference is the
plain autodiff composition, one matmul per projection over ``[B, L, ...]`` activations, layers under
``lax.scan``). The model is a Dream-layout one (grouped-query heads, q/k/v biases) with left padding, so the
masked rows and the grouped heads are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.models.config import (
    EXECUTION_DEFAULTS,
    DenoiserConfig,
    execution_platform,
    execution_record,
    resolve_execution,
    tiny_dream,
)
from gdsd_jax.models.denoiser import attention, attention_reference, init_params, logits
from gdsd_jax.models.lora import init_lora

REFERENCE = dict(attention_impl="xla", merge_projections=False, merge_token_dims=False, scan_layers=True)
SWITCHES = [dict(attention_impl="custom_vjp"), dict(merge_projections=True), dict(merge_token_dims=True),
            dict(scan_layers=False),
            dict(attention_impl="custom_vjp", merge_projections=True, merge_token_dims=True, scan_layers=False)]
RTOL, ATOL = 2e-5, 2e-6


def _model(**switches) -> DenoiserConfig:
    # head_dim 12: 1/sqrt(12) is not a power of two, so the attention core divides the scores itself.
    return tiny_dream(vocab_size=64, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
                      mlp_dim=40, mask_token_id=60, eos_token_id=61, pad_token_id=61, max_seq_len=32,
                      **{**REFERENCE, **switches})


def _inputs():
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 60)
    mask = jnp.ones((3, 9), bool).at[1, :3].set(False).at[2, :1].set(False)     # left padding
    weights = jax.random.normal(jax.random.key(2), (3, 9, 64))
    return tokens, mask, weights


def _params_and_lora(cfg: DenoiserConfig):
    params = init_params(cfg, jax.random.key(0), std=0.2)
    lora = init_lora(cfg, jax.random.key(3), rank=2, targets=("q", "k", "v", "o", "gate", "up", "down"))
    # B is zero at init; random values make the adapters change the forward pass too.
    leaves, tree = jax.tree.flatten(lora)
    lora = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(jax.random.key(10 + i), x.shape)
                                     for i, x in enumerate(leaves)])
    return params, lora


def _outputs(cfg: DenoiserConfig, params, lora):
    tokens, mask, weights = _inputs()

    def loss(params, lora):
        out = logits(params, cfg, tokens, mask, lora=lora, lora_scale=0.5)
        return jnp.sum(jax.nn.log_softmax(out) * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, lora)
    return out, grads


@pytest.fixture(scope="module")
def reference():
    """The weights, adapters and the portable path's logits and gradients (computed once)."""
    params, lora = _params_and_lora(_model())
    return params, lora, *_outputs(_model(), params, lora)


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_a_switch_matches_the_portable_path(reference, switches):
    params, lora, want_out, want_grads = reference
    out, grads = _outputs(_model(**switches), params, lora)
    np.testing.assert_allclose(out, want_out, rtol=RTOL, atol=ATOL)
    flat_want = jax.tree.flatten_with_path(want_grads)[0]
    flat_got = jax.tree.leaves(grads)
    assert len(flat_want) == len(flat_got)
    for (path, want), got in zip(flat_want, flat_got):
        scale = float(np.max(np.abs(want)))
        assert scale > 0, f"{jax.tree_util.keystr(path)}: a zero gradient compares nothing"
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * max(scale, 1.0),
                                   err_msg=jax.tree_util.keystr(path))


def test_the_portable_attention_supports_forward_mode():
    """The reason to pick ``attention_impl="xla"`` besides the compiler: ``jax.jvp`` works through it."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, h, 4)) for i, h in ((0, 4), (1, 2), (2, 2)))
    _, jvp = jax.jvp(lambda q: attention_reference(q, k, v, None), (q,), (jnp.ones_like(q),))
    assert np.all(np.isfinite(jvp)) and np.any(jvp != 0)
    with pytest.raises(TypeError):      # the hand-written backward is reverse mode only
        jax.jvp(lambda q: attention(q, k, v, None), (q,), (jnp.ones_like(q),))


def test_the_defaults_resolve_to_the_cpu_paths_and_old_configs_load():
    """The switches default to ``auto``, which on the CPU is exactly the paths the CPU numbers were measured
    with; a checkpoint's config written before the switches existed loads with them."""
    cfg = tiny_dream()
    assert (cfg.attention_impl, cfg.merge_projections, cfg.merge_token_dims, cfg.scan_layers) == \
        ("auto", "auto", "auto", True)
    cpu = resolve_execution(cfg, "cpu")
    assert (cpu.attention_impl, cpu.merge_projections, cpu.merge_token_dims, cpu.scan_layers) == \
        ("custom_vjp", True, True, True)
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("attention_impl", "merge_projections", "merge_token_dims")}
    assert DenoiserConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="attention_impl='flash'"):
        cfg.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="merge_token_dims='yes'"):
        cfg.replace(merge_token_dims="yes")


def test_auto_on_the_cpu_is_bitwise_the_cpu_paths(reference):
    """The CPU defaults did not move: ``auto`` compiles to the same program as the explicit CPU switches."""
    params, lora, _, _ = reference
    auto = _model(attention_impl="auto", merge_projections="auto", merge_token_dims="auto")
    explicit = _model(**EXECUTION_DEFAULTS["cpu"])
    assert jax.default_backend() == "cpu"
    for got, want in zip(jax.tree.leaves(_outputs(auto, params, lora)),
                         jax.tree.leaves(_outputs(explicit, params, lora))):
        np.testing.assert_array_equal(got, want)


def test_auto_resolution_per_backend_and_explicit_values_win():
    cfg = tiny_dream()
    tpu = resolve_execution(cfg, "tpu")
    assert (tpu.attention_impl, tpu.merge_projections, tpu.merge_token_dims) == ("splash", False, False)
    assert resolve_execution(cfg, "gpu").attention_impl == "xla"
    pinned = cfg.replace(attention_impl="xla", merge_token_dims=True)
    tpu = resolve_execution(pinned, "tpu")
    assert (tpu.attention_impl, tpu.merge_projections, tpu.merge_token_dims) == ("xla", False, True)
    assert execution_platform(None) == "cpu"
    assert execution_record(cfg, jax.make_mesh((8,), ("fsdp",))) == dict(
        platform="cpu", attention_impl="custom_vjp", merge_projections=True, merge_token_dims=True,
        scan_layers=True)
    with pytest.raises(ValueError, match="unknown platform 'metal'"):
        resolve_execution(cfg, "metal")
    with pytest.raises(ValueError, match="'splash' is a TPU kernel"):
        resolve_execution(cfg.replace(attention_impl="splash"), "gpu")
