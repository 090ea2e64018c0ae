"""The denoiser: parameter counts of the real presets, and the forward pass against a float64 NumPy
reference written from the upstream forward pass (LLaDA ``modeling_llada.py``, Dream ``modeling_dream.py``),
consuming weights in the upstream (Hugging Face) layout and names."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from helpers_hf import make_hf_dir

import gdsd_jax
from gdsd_jax.models.config import dream_7b, llada_8b, tiny_dream, tiny_llada
from gdsd_jax.models.denoiser import init_params, logits, raw_logits

# ---- parameter counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_fn,expected", [(llada_8b, 8_015_581_184), (dream_7b, 7_615_616_512)])
def test_eval_shape_parameter_count(cfg_fn, expected):
    cfg = cfg_fn()
    shapes = jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n == expected            # the index files' total_size / 2 bytes (bf16)
    assert cfg.num_params() == expected


# ---- float64 reference --------------------------------------------------------------------------

def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, pos, theta):
    """Split-half RoPE: x [B, L, H, Dh], pos [B, L]."""
    dh = x.shape[-1]
    inv = theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
    f = pos[..., None].astype(np.float64) * inv
    emb = np.concatenate([f, f], -1)[:, :, None, :]
    rot = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * np.cos(emb) + rot * np.sin(emb)


def reference_logits(family, t, conf, tok, am=None, aligned=True):
    """Upstream forward in float64 from the HF tensors ``t`` (name -> array) and config.json ``conf``."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    b, length = tok.shape
    if family == "llada":
        n, heads, kv, eps, theta = conf["n_layers"], conf["n_heads"], conf["n_kv_heads"], conf["rms_norm_eps"], conf["rope_theta"]
        pre = "model.transformer."
        emb, final, head = t[pre + "wte.weight"], t[pre + "ln_f.weight"], t[pre + "ff_out.weight"]

        def w(i, k):
            names = dict(an="attn_norm", q="q_proj", k="k_proj", v="v_proj", o="attn_out", mn="ff_norm",
                         g="ff_proj", u="up_proj", d="ff_out")
            return t[f"{pre}blocks.{i}.{names[k]}.weight"]
    else:
        n, heads, kv = conf["num_hidden_layers"], conf["num_attention_heads"], conf["num_key_value_heads"]
        eps, theta = conf["rms_norm_eps"], conf["rope_theta"]
        emb, final, head = t["model.embed_tokens.weight"], t["model.norm.weight"], t["lm_head.weight"]

        def w(i, k):
            names = dict(an="input_layernorm", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
                         o="self_attn.o_proj", mn="post_attention_layernorm", g="mlp.gate_proj",
                         u="mlp.up_proj", d="mlp.down_proj")
            return t[f"model.layers.{i}.{names[k]}.weight"]
    d = emb.shape[1]
    dh = d // heads
    real = np.ones((b, length), bool) if am is None else am.astype(bool)
    if family == "llada":
        pos = np.broadcast_to(np.arange(length), (b, length))
        allowed = np.broadcast_to(real[:, None, :], (b, length, length))          # key padding only
    else:
        pos = np.where(real, np.cumsum(real, -1) - 1, 1) if am is not None else np.broadcast_to(np.arange(length), (b, length))
        allowed = real[:, :, None] & real[:, None, :]                            # outer AND
    h = emb[tok]
    for i in range(n):
        x = _rms(h, w(i, "an"), eps)
        q, k, v = x @ w(i, "q").T, x @ w(i, "k").T, x @ w(i, "v").T
        if family == "dream":
            q = q + t[f"model.layers.{i}.self_attn.q_proj.bias"]
            k = k + t[f"model.layers.{i}.self_attn.k_proj.bias"]
            v = v + t[f"model.layers.{i}.self_attn.v_proj.bias"]
        q = _rope(q.reshape(b, length, heads, dh), pos, theta)
        k = _rope(k.reshape(b, length, kv, dh), pos, theta)
        v = v.reshape(b, length, kv, dh)
        rep = heads // kv
        k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)               # query head j -> kv j // rep
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        s = np.where(allowed[:, None], s, -1e30)
        s = np.exp(s - s.max(-1, keepdims=True))
        p = s / s.sum(-1, keepdims=True)
        a = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, length, heads * dh)
        h = h + a @ w(i, "o").T
        x = _rms(h, w(i, "mn"), eps)
        g = x @ w(i, "g").T
        h = h + ((g / (1 + np.exp(-g))) * (x @ w(i, "u").T)) @ w(i, "d").T
    out = _rms(h, final, eps) @ head.T
    if family == "dream" and aligned:
        out = np.concatenate([out[:, :1], out[:, :-1]], axis=1)
    return out


@pytest.fixture(scope="module", params=["llada", "dream"])
def tiny(request, tmp_path_factory):
    """A tiny converted model plus its logits on one padded batch (one compile per family)."""
    fam = request.param
    hf, conf, tensors = make_hf_dir(tmp_path_factory.mktemp(fam), fam, seed=11, vocab=192, mask=180, eos=181)
    model = gdsd_jax.load_denoiser(hf, compute_dtype="float32")
    tok = np.random.default_rng(0).integers(0, 180, size=(3, 20))
    am = np.ones_like(tok)
    am[1, :4] = 0
    am[2, :9] = 0
    return dict(fam=fam, conf=conf, tensors=tensors, model=model, tok=tok, am=am,
                logits=np.asarray(model(tok, attention_mask=am)))


def test_forward_matches_float64_reference(tiny):
    fam, tok, am, got = tiny["fam"], tiny["tok"], tiny["am"], tiny["logits"]
    want = reference_logits(fam, tiny["tensors"], tiny["conf"], tok, am)
    assert got.shape == (3, 20, 192) and got.dtype == np.float32
    if fam == "llada":
        rows = np.ones_like(am, bool)            # padded queries are well defined for LLaDA
    else:                                        # Dream: real rows whose shifted source row is real too
        rows = (am == 1) & np.concatenate([am[:, :1] == 1, am[:, :-1] == 1], axis=1)
    np.testing.assert_allclose(got[rows], want[rows], rtol=0, atol=1e-4)
    # row 0 has no padding: it must equal the unmasked reference
    np.testing.assert_allclose(got[0], reference_logits(fam, tiny["tensors"], tiny["conf"], tok[:1])[0],
                               rtol=0, atol=1e-4)


def test_positions_select_lm_head_rows(tiny):
    model, tok, am, full = tiny["model"], tiny["tok"], tiny["am"], tiny["logits"]
    pos = np.array([[0, 5, 19], [3, 3, 7], [10, 11, 12]])
    part = np.asarray(model(tok, attention_mask=am, positions=pos))
    assert part.shape == (3, 3, 192)
    np.testing.assert_allclose(part, np.take_along_axis(full, pos[..., None], axis=1), rtol=0, atol=1e-6)


def test_aligned_vs_raw_logits(tiny):
    fam, model, tok, am, aligned = tiny["fam"], tiny["model"], tiny["tok"], tiny["am"], tiny["logits"]
    raw = np.asarray(jax.jit(raw_logits, static_argnums=1)(model.params(), model.config, tok, am))
    want = reference_logits(fam, tiny["tensors"], tiny["conf"], tok, am, aligned=False)
    np.testing.assert_allclose(raw[am == 1], want[am == 1], rtol=0, atol=1e-4)
    if fam == "llada":
        np.testing.assert_array_equal(aligned, raw)
    else:   # Dream: the raw state at i-1 predicts token i; position 0 keeps its own row
        np.testing.assert_array_equal(aligned[:, 1:], raw[:, :-1])
        np.testing.assert_array_equal(aligned[:, 0], raw[:, 0])
        assert np.abs(aligned[:, 1:] - raw[:, 1:]).max() > 1e-3


def test_bidirectional(tiny):
    model, tok, am, base = tiny["model"], tiny["tok"], tiny["am"], tiny["logits"]
    tok2 = tok.copy()
    tok2[:, -1] = (tok[:, -1] + 7) % 180            # change only the last token of every row
    other = np.asarray(model(tok2, attention_mask=am))
    assert np.abs(other[0, :6] - base[0, :6]).max() > 1e-4   # earlier positions see the later token


def _random_params(cfg, seed):
    """Random params tree with norms near 1 and non-zero biases."""
    from gdsd_jax.models.denoiser import param_shapes

    rng = np.random.default_rng(seed)

    def make(path, shape):
        base = 1.0 if path[-1].key.endswith("norm") else 0.0
        return (base + 0.1 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def test_remat_and_unrolled_layers_agree():
    """Remat policies change neither the loss nor its gradient; the unrolled layer loop gives the same logits."""
    cfg = tiny_dream()
    params = _random_params(cfg, 4)
    tok = np.random.default_rng(4).integers(0, 240, size=(2, 9))
    am = np.ones_like(tok)
    am[1, :3] = 0

    def loss(p, c):
        return logits(p, c, tok, am).std()

    vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v0, g0 = vg(params, cfg)
    for change in (dict(remat="full"), dict(remat="dots")):
        v1, g1 = vg(params, cfg.replace(**change))
        np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6, err_msg=str(change))
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6, err_msg=str(change))
    fwd = jax.jit(logits, static_argnums=1)
    np.testing.assert_allclose(np.asarray(fwd(params, cfg.replace(scan_layers=False), tok, am)),
                               np.asarray(fwd(params, cfg, tok, am)), rtol=0, atol=1e-5)


def test_bf16_compute_close_to_fp32():
    cfg = tiny_llada()
    params = _random_params(cfg, 6)
    tok = np.random.default_rng(5).integers(0, 240, size=(2, 8))
    f32 = np.asarray(jax.jit(logits, static_argnums=1)(params, cfg, tok))
    b16 = jax.jit(logits, static_argnums=1)(params, cfg.replace(compute_dtype="bfloat16"), tok)
    assert b16.dtype == jax.numpy.bfloat16
    b16 = np.asarray(b16).astype(np.float32)
    assert np.isfinite(b16).all()
    assert np.abs(b16 - f32).max() < 0.05 * max(1.0, np.abs(f32).max())
