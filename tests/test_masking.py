"""Forward (masking) processes: stratified counts, coupled complement, prompt untouched, determinism,
d1's one-step process and SPG's block-random masks, against NumPy references written from the spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.objectives import RolloutBatch, get_objective, masking, objective_config
from gdsd_jax.objectives.masking import d1_tokens, mask_ratio, masked_completion_tokens

# jitted once per shape: eager op-by-op dispatch would dominate the test time
coupled_masks = jax.jit(masking.coupled_masks, static_argnums=(1, 2, 3))
d1_masks = jax.jit(masking.d1_masks, static_argnums=(1, 2, 3))
stratified_counts = jax.jit(masking.stratified_counts, static_argnums=(1, 2))
spg_block_random_masks = jax.jit(masking.spg_block_random_masks, static_argnums=(2,),
                                 static_argnames=("num_t", "block_length", "min_t", "max_t", "mask_prompt",
                                                  "p_mask_prompt"))


def np_stratified(k: int, b: int, length: int) -> np.ndarray:
    """The official formula in float64: round(linspace(k, k + (b-1)(L+1)/b, b)) mod (L+1), half to even."""
    return np.round(np.linspace(k, k + (b - 1) * (length + 1) / b, b)).astype(np.int64) % (length + 1)


@pytest.mark.parametrize("b,length", [(1, 7), (2, 4), (3, 10), (4, 9), (8, 16), (5, 3)])
def test_stratified_counts_match_formula_for_every_offset(b, length):
    for k in range(length + 1):
        got = np.asarray(stratified_counts(jnp.asarray(k), b, length))
        np.testing.assert_array_equal(got, np_stratified(k, b, length), err_msg=f"offset k={k}")


@pytest.mark.parametrize("b,length,m", [(4, 12, 1), (3, 7, 2), (8, 5, 3)])
def test_coupled_masks_counts_stratified_and_complement(b, length, m):
    masks = coupled_masks(jax.random.key(3), b, length, m)
    is_mask = np.asarray(masks["is_mask"])
    x = np.asarray(masks["num_masked"])
    assert is_mask.shape == (b, m, length) and x.shape == (b, m)
    # the masked count of each row is x, and x is a stratified vector for some offset k, per draw
    np.testing.assert_array_equal(is_mask.sum(-1), x)
    for j in range(m):
        assert any(np.array_equal(x[:, j], np_stratified(k, b, length)) for k in range(length + 1)), x[:, j]
    # masked pass + complement pass cover every completion position exactly once
    cover = is_mask.astype(int) + (~is_mask).astype(int)
    assert (cover == 1).all()
    np.testing.assert_allclose(np.asarray(mask_ratio(masks["num_masked"], length)), x / (length + 1), rtol=1e-6)


def test_coupled_masks_same_key_same_masks_and_keys_differ():
    a = coupled_masks(jax.random.key(11), 6, 20, 2)
    b = coupled_masks(jax.random.key(11), 6, 20, 2)
    c = coupled_masks(jax.random.key(12), 6, 20, 2)
    np.testing.assert_array_equal(np.asarray(a["is_mask"]), np.asarray(b["is_mask"]))
    assert not np.array_equal(np.asarray(a["is_mask"]), np.asarray(c["is_mask"]))
    # the M draws are independent draws, not copies
    assert not np.array_equal(np.asarray(a["is_mask"][:, 0]), np.asarray(a["is_mask"][:, 1]))


def test_coupled_masks_offsets_and_positions_uniform():
    """Over many keys the offset covers {0..L} and every position is masked about equally often."""
    length, b, n = 6, 1, 700
    keys = jax.random.split(jax.random.key(0), n)
    out = jax.jit(jax.vmap(lambda k: masking.coupled_masks(k, b, length, 1)))(keys)
    x = np.asarray(out["num_masked"])[:, 0, 0]              # with B = 1, x = k ~ U{0..L}
    counts = np.bincount(x, minlength=length + 1)
    assert counts.min() > n / (length + 1) * 0.6, counts
    pos = np.asarray(out["is_mask"])[:, 0, 0].sum(0)        # expected n * E[x]/L = n/2 per position
    np.testing.assert_allclose(pos / n, 0.5, atol=0.08)


def test_masked_tokens_prompt_untouched():
    b, lp, length, m, mask_id = 3, 4, 6, 2, 99
    seq = jnp.arange(b * (lp + length), dtype=jnp.int32).reshape(b, lp + length) % 50
    masks = coupled_masks(jax.random.key(5), b, length, m)
    toks = np.asarray(masked_completion_tokens(seq, lp, masks["is_mask"], mask_id))
    comp = np.asarray(masked_completion_tokens(seq, lp, ~masks["is_mask"], mask_id))
    s = np.asarray(seq)
    for j in range(m):
        np.testing.assert_array_equal(toks[:, j, :lp], s[:, :lp])
        np.testing.assert_array_equal(comp[:, j, :lp], s[:, :lp])
        im = np.asarray(masks["is_mask"][:, j])
        np.testing.assert_array_equal(toks[:, j, lp:], np.where(im, mask_id, s[:, lp:]))
        np.testing.assert_array_equal(comp[:, j, lp:], np.where(im, s[:, lp:], mask_id))


def test_objective_draw_masks_deterministic_and_prompt_untouched():
    b, lp, length = 4, 3, 8
    seq = jax.random.randint(jax.random.key(0), (b, lp + length), 0, 40)
    batch = RolloutBatch.create(seq, jnp.ones((b, lp)), jnp.ones((b, length)))
    seq2 = np.asarray(seq)
    for name in ("gdsd", "spg"):
        cfg = objective_config(name=name, **({"num_mc": 2} if name == "gdsd" else {"block_length": 4}))
        obj = get_objective(name)
        draw = jax.jit(lambda k, bt: obj.draw_masks(k, bt, cfg))
        m1, m2 = draw(jax.random.key(7), batch), draw(jax.random.key(7), batch)
        m3 = draw(jax.random.key(8), batch)
        for key in m1:
            np.testing.assert_array_equal(np.asarray(m1[key]), np.asarray(m2[key]))
        assert any(not np.array_equal(np.asarray(m1[k]), np.asarray(m3[k])) for k in m1)
        if name == "gdsd":
            assert m1["is_mask"].shape == (b, 2, length)
            toks = np.asarray(masked_completion_tokens(seq, lp, m1["is_mask"], 99))
            assert (toks[:, :, :lp] == seq2[:, None, :lp]).all()


def test_d1_masks_rate_and_tokens():
    b, lp, length, p, mask_id = 64, 50, 5, 0.15, 77
    masks = d1_masks(jax.random.key(1), b, lp, p)
    pm = np.asarray(masks["prompt_is_mask"])
    assert pm.shape == (b, lp)
    assert abs(pm.mean() - p) < 0.03
    seq = jax.random.randint(jax.random.key(2), (b, lp + length), 0, 60)
    toks = np.asarray(d1_tokens(seq, lp, masks["prompt_is_mask"], mask_id))
    s = np.asarray(seq)
    np.testing.assert_array_equal(toks[:, lp:], mask_id)
    np.testing.assert_array_equal(toks[:, :lp], np.where(pm, mask_id, s[:, :lp]))
    again = d1_masks(jax.random.key(1), b, lp, p)
    np.testing.assert_array_equal(pm, np.asarray(again["prompt_is_mask"]))


def _check_spg_structure(is_mask, comp_mask, lp, bl, min_t, max_t, mask_prompt):
    """Check one SPG draw against the rule of the official block_random process (NumPy)."""
    b, t, total = is_mask.shape
    length = total - lp
    nb = length // bl
    for i in range(b):
        clen = max(int(comp_mask[i].sum()), 1)
        cnb = (clen - 1) // bl + 1
        for j in range(t):
            row = is_mask[i, j, lp:]
            # post-EOS always masked
            assert row[clen:].all()
            # the chosen block: the first block (within the completion) whose later blocks are all masked
            # and which has masked completion tokens: find idx such that blocks > idx fully masked
            candidates = []
            for idx in range(cnb):
                after_ok = all(row[q] for q in range((idx + 1) * bl, length))
                mlen = min(bl, clen - bl * idx)
                n = int(row[idx * bl: idx * bl + mlen].sum())
                lo = max(int(np.floor(mlen * min_t)), 1)
                hi = max(min(int(np.floor(mlen * max_t)), mlen), lo)
                if after_ok and lo <= n <= hi:
                    candidates.append(idx)
            assert candidates, (i, j, row)
            if not mask_prompt:
                # nothing before the chosen block is masked, the prompt is untouched
                idx = min(candidates)
                assert not is_mask[i, j, :lp].any()
                assert not row[: idx * bl].any()
    assert nb >= t


@pytest.mark.parametrize("mask_prompt", [False, True])
def test_spg_block_random_structure(mask_prompt):
    b, lp, length, bl, t = 6, 4, 16, 4, 3
    rng = np.random.default_rng(0)
    lens = rng.integers(1, length + 1, size=b)
    lens[0] = length
    comp = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    masks = spg_block_random_masks(jax.random.key(9), jnp.asarray(comp), lp, num_t=t, block_length=bl, min_t=0.0,
                                   max_t=1.0, mask_prompt=mask_prompt, p_mask_prompt=0.5)
    is_mask = np.asarray(masks["is_mask"])
    assert is_mask.shape == (b, t, lp + length)
    _check_spg_structure(is_mask, comp, lp, bl, 0.0, 1.0, mask_prompt)
    if mask_prompt:
        assert is_mask[:, :, :lp].any()   # with p = 0.5 over 72 prompt positions, some are masked
    again = spg_block_random_masks(jax.random.key(9), jnp.asarray(comp), lp, num_t=t, block_length=bl, min_t=0.0,
                                   max_t=1.0, mask_prompt=mask_prompt, p_mask_prompt=0.5)
    np.testing.assert_array_equal(is_mask, np.asarray(again["is_mask"]))


def test_spg_block_random_min_max_t_bounds():
    b, lp, length, bl = 16, 2, 24, 8
    comp = np.ones((b, length), np.int32)
    masks = spg_block_random_masks(jax.random.key(4), jnp.asarray(comp), lp, num_t=2, block_length=bl, min_t=0.5,
                                   max_t=0.75, mask_prompt=False, p_mask_prompt=0.0)
    _check_spg_structure(np.asarray(masks["is_mask"]), comp, lp, bl, 0.5, 0.75, False)


def test_spg_rejects_bad_block_length():
    with pytest.raises(ValueError, match="block_length"):
        spg_block_random_masks(jax.random.key(0), jnp.ones((2, 10)), 3, num_t=1, block_length=4, min_t=0.0,
                               max_t=1.0, mask_prompt=False, p_mask_prompt=0.0)
    with pytest.raises(ValueError, match="num_t"):
        spg_block_random_masks(jax.random.key(0), jnp.ones((2, 8)), 3, num_t=3, block_length=4, min_t=0.0,
                               max_t=1.0, mask_prompt=False, p_mask_prompt=0.0)
