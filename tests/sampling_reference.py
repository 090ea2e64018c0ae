"""Plain NumPy per-step reference of both samplers, written from the upstream pseudo-code.

A straightforward Python loop: every step calls ``logits_fn(x, attention_mask)`` (the model's aligned
logits as a NumPy array [B, L, V]), then does the rest in float64 NumPy with per-row loops, the way LLaDA's
``generate.py`` and Dream's ``diffusion_generate`` are written: full-length sequence, mask index recomputed
from the tokens every step, ``-inf`` confidence beyond the current block, per-row top-k, the Dream ``k``
recomputed from the live mask count and ``np.linspace(..., dtype=float32)`` timesteps.

The mask token is an ordinary outcome, as upstream (a position that draws it stays masked);
``ban_mask_token=True`` sets its logit to -inf before sampling and confidence. Deliberate rules shared with
the package (documented in docs/sampling.md): ``confidence_eos_eot_inf`` masks EOS and EoT in the confidence
softmax at every temperature, and top-k ties go to the lower position.

Randomness: pass ``rng`` (a ``numpy.random.Generator``) to sample, or ``transfer_steps`` [B, Lg] (the step at
which each completion token was revealed, e.g. from the package) to replay the random position choice of
``random`` remasking, Dream ``origin`` or ``alg_temp > 0`` and check every token chosen at temperature 0.

Used by the parity tests and by ``benchmarks/sampling_throughput.py`` (as the per-step baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

LogitsFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _topk_rows(conf: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array (ties: lower index first)."""
    return np.argsort(-conf, kind="stable")[:k]


def _sample(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """LLaDA's add_gumbel_noise + argmax, in float64 as upstream's docstring intends."""
    if temperature == 0:
        return np.argmax(logits, axis=-1)
    u = rng.random(logits.shape)
    with np.errstate(divide="ignore", over="ignore"):
        noisy = np.exp(logits) / (-np.log(u)) ** temperature
    return np.argmax(noisy, axis=-1)


def _initial(prompt: np.ndarray, prompt_mask: np.ndarray | None, mask_id: int, gen_length: int):
    """The prompt followed by ``gen_length`` masks [B, Lp + Lg], and its attention mask (or None)."""
    b, lp = prompt.shape
    x = np.full((b, lp + gen_length), mask_id, dtype=np.int64)
    x[:, :lp] = prompt
    am = None
    if prompt_mask is not None:
        am = np.concatenate([prompt_mask, np.ones((b, gen_length), prompt_mask.dtype)], axis=1)
    return x, am


def llada_reference(logits_fn: LogitsFn, prompt: np.ndarray, prompt_mask: np.ndarray | None, *, mask_id: int,
                    eos_id: int, gen_length: int, steps: int, block_length: int, temperature: float = 0.0,
                    cfg_scale: float = 0.0, remasking: str = "low_confidence", logits_eos_inf: bool = False,
                    confidence_eos_eot_inf: bool = False, eot_id: int | None = None, ban_mask_token: bool = False,
                    rng=None, transfer_steps: np.ndarray | None = None) -> np.ndarray:
    """LLaDA ``generate``: returns x [B, Lp + Lg]."""
    b, lp = prompt.shape
    x, am = _initial(prompt, prompt_mask, mask_id, gen_length)
    prompt_index = x != mask_id
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    spb = steps // num_blocks
    for nb in range(num_blocks):
        s0, s1 = lp + nb * block_length, lp + (nb + 1) * block_length
        block_mask_index = x[:, s0:s1] == mask_id
        n = block_mask_index.sum(1)
        num_transfer = np.zeros((b, spb), dtype=np.int64)
        for r in range(b):
            num_transfer[r, :] = n[r] // spb
            num_transfer[r, : n[r] % spb] += 1
        for i in range(spb):
            g = nb * spb + i
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.copy()
                un_x[prompt_index] = mask_id
                am2 = None if am is None else np.concatenate([am, am])
                both = np.asarray(logits_fn(np.concatenate([x, un_x]), am2), dtype=np.float64)
                logits, un_logits = both[:b], both[b:]
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = np.asarray(logits_fn(x, am), dtype=np.float64)
            logits = logits.copy()
            if ban_mask_token:
                logits[:, :, mask_id] = -np.inf
            if logits_eos_inf:
                logits[:, :, eos_id] = -np.inf
            x0 = _sample(logits, temperature, rng)
            if remasking == "low_confidence":
                cl = logits.copy()
                if confidence_eos_eot_inf:
                    cl[:, :, eos_id] = -np.inf
                    if eot_id is not None:
                        cl[:, :, eot_id] = -np.inf
                p = _softmax(cl)
                x0_p = np.take_along_axis(p, x0[..., None], -1)[..., 0]
            elif remasking == "random":
                x0_p = rng.random(x0.shape) if transfer_steps is None else np.zeros(x0.shape)
            else:
                raise ValueError(remasking)
            x0_p[:, s1:] = -np.inf
            x0 = np.where(mask_index, x0, x)
            confidence = np.where(mask_index, x0_p, -np.inf)
            for r in range(b):
                k = int(num_transfer[r, i])
                if transfer_steps is not None and remasking == "random":
                    idx = lp + np.nonzero(transfer_steps[r] == g)[0]
                    assert len(idx) == k, (r, g, len(idx), k)
                    assert np.all(mask_index[r, idx]) and np.all(idx < s1) and np.all(idx >= s0)
                else:
                    idx = _topk_rows(confidence[r], k)
                x[r, idx] = x0[r, idx]
    return x


def dream_timesteps_numpy(steps: int, eps: float) -> np.ndarray:
    return np.linspace(1, eps, steps + 1, dtype=np.float32)


def _top_p_logits(logits: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, -1)
    cum = np.cumsum(_softmax(sorted_logits), axis=-1)
    remove_sorted = cum > top_p
    remove_sorted[..., 1:] = remove_sorted[..., :-1].copy()
    remove_sorted[..., 0] = False
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    return np.where(remove, np.finfo(np.float32).min, logits)


def _top_k_logits(logits: np.ndarray, top_k: int) -> np.ndarray:
    top_k = min(top_k, logits.shape[-1])
    kth = np.sort(logits, axis=-1)[..., -top_k][..., None]
    return np.where(logits < kth, np.finfo(np.float32).min, logits)


def dream_sample_tokens(logits: np.ndarray, temperature: float = 0.0, top_p=None, top_k=None,
                        margin_confidence=False, neg_entropy=False, rng=None):
    """Dream's ``sample_tokens`` on [M, V] float64 logits -> (confidence [M], x0 [M])."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p_logits(logits, top_p)
    if top_k is not None:
        logits = _top_k_logits(logits, top_k)
    probs = _softmax(logits)
    if temperature > 0:
        cdf = np.cumsum(probs, axis=-1)
        u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
        x0 = np.minimum((cdf < u).sum(-1), probs.shape[-1] - 1)
        confidence = probs[np.arange(len(x0)), x0]
    else:
        x0 = np.argmax(probs, axis=-1)
        confidence = probs[np.arange(len(x0)), x0]
    if margin_confidence:
        sp = -np.sort(-probs, axis=-1)
        confidence = sp[:, 0] - sp[:, 1]
    if neg_entropy:
        confidence = np.sum(probs * np.log(probs + 1e-10), axis=-1)
    return confidence, x0


def dream_reference(logits_fn: LogitsFn, prompt: np.ndarray, prompt_mask: np.ndarray | None, *, mask_id: int,
                    gen_length: int, steps: int, eps: float = 1e-3, alg: str = "entropy", alg_temp=None,
                    temperature: float = 0.0, top_p=None, top_k=None, ban_mask_token: bool = False, rng=None,
                    transfer_steps: np.ndarray | None = None) -> np.ndarray:
    """Dream ``diffusion_generate``: returns x [B, Lp + Lg]."""
    b, lp = prompt.shape
    x, am = _initial(prompt, prompt_mask, mask_id, gen_length)
    timesteps = dream_timesteps_numpy(steps, eps)
    for i in range(steps):
        mask_index = x == mask_id
        logits = np.asarray(logits_fn(x, am), dtype=np.float64).copy()
        if ban_mask_token:
            logits[:, :, mask_id] = -np.inf
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        if alg == "origin":
            p_transfer = np.float32(1) - np.float32(s / t) if i < steps - 1 else 1
            x0 = np.full(mask_logits.shape[0], mask_id, dtype=np.int64)
            if transfer_steps is not None:
                rows, cols = np.nonzero(mask_index)
                sel = transfer_steps[rows, cols - lp] == i
            else:
                sel = rng.random(mask_logits.shape[0]) < p_transfer
            _, x0[sel] = dream_sample_tokens(mask_logits[sel], temperature, top_p, top_k, rng=rng)
            x[mask_index] = x0
        else:
            conf, x0 = dream_sample_tokens(mask_logits, temperature, top_p, top_k,
                                           margin_confidence=alg == "topk_margin", neg_entropy=alg == "entropy",
                                           rng=rng)
            num_mask_token = np.float32(mask_index.sum() / b)
            k = int(num_mask_token * (np.float32(1) - np.float32(s / t))) if i < steps - 1 else int(num_mask_token)
            full_conf = np.full(x.shape, -np.inf)
            full_conf[mask_index] = conf
            if k > 0:
                x_ = np.full(x.shape, mask_id, dtype=np.int64)
                x_[mask_index] = x0
                for r in range(b):
                    if alg_temp is None or alg_temp == 0:
                        idx = _topk_rows(full_conf[r], k)
                    elif transfer_steps is not None:
                        idx = lp + np.nonzero(transfer_steps[r] == i)[0]
                        assert len(idx) == k and np.all(mask_index[r, idx]), (r, i, len(idx), k)
                    else:
                        w = _softmax(full_conf[r] / alg_temp)
                        idx = rng.choice(len(w), size=k, replace=False, p=w)
                    x[r, idx] = x_[r, idx]
    return x


def threshold_reference(logits_fn: LogitsFn, prompt: np.ndarray, prompt_mask: np.ndarray | None, *, mask_id: int,
                        gen_length: int, block_length: int, threshold: float | None = None,
                        factor: float | None = None, ban_mask_token: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Fast-dLLM's confidence-aware parallel decoding, greedy, a full forward every step (both families: the
    confidence is the probability of the argmax token). Returns (x [B, Lp + Lg], forwards per row [B]).

    Per block and row: while the row's block has a mask, reveal every masked position whose confidence is
    >= threshold and at least the most confident one (ties: lower position); or, with ``factor``, walk the
    masked positions from the most confident down and reveal the first, then each next one whose
    confidence is >= 1 - factor / (rank + 1) (rank 1-based), stopping at the first that is not. A row whose
    block is done waits (no forward counted) for the others. A block gets at most ``block_length`` steps: a
    revealed mask id (the mask token is an ordinary outcome unless ``ban_mask_token``) leaves its position
    masked, so a row may end a block with masks left.
    """
    b, lp = prompt.shape
    x, am = _initial(prompt, prompt_mask, mask_id, gen_length)
    nfe = np.zeros(b, dtype=np.int64)
    for nb in range(gen_length // block_length):
        s0, s1 = lp + nb * block_length, lp + (nb + 1) * block_length
        for _ in range(block_length):
            if not (x[:, s0:s1] == mask_id).any():
                break
            logits = np.asarray(logits_fn(x, am), dtype=np.float64)[:, s0:s1].copy()
            if ban_mask_token:
                logits[:, :, mask_id] = -np.inf
            x0 = np.argmax(logits, axis=-1)
            conf = np.take_along_axis(_softmax(logits), x0[..., None], -1)[..., 0]
            for r in range(b):
                cand = np.nonzero(x[r, s0:s1] == mask_id)[0]
                if len(cand) == 0:
                    continue
                nfe[r] += 1
                if factor is None:
                    reveal = [j for j in cand if conf[r, j] >= threshold]
                    reveal = set(reveal) | {cand[np.argmax(conf[r, cand])]}
                else:
                    ranked = sorted(cand, key=lambda j: (-conf[r, j], j))
                    n = 1
                    while n < len(ranked) and conf[r, ranked[n]] >= 1.0 - factor / (n + 2):
                        n += 1
                    reveal = ranked[:n]
                for j in reveal:
                    x[r, s0 + j] = x0[r, j]
    return x, nfe


def jax_logits_fn(params, cfg, *, lora=None, lora_scale: float = 1.0, mesh=None) -> LogitsFn:
    """The model's aligned logits as a NumPy callable ``(tokens [B, L], mask [B, L] | None) -> [B, L, V]``:
    one jitted forward per call, driven from Python (the per-step loop's only use of JAX)."""
    import jax
    import jax.numpy as jnp

    from gdsd_jax.models.denoiser import logits

    fwd = jax.jit(lambda p, t, m, lo: logits(p, cfg, t, m, mesh=mesh, lora=lo, lora_scale=lora_scale))

    def fn(tokens: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        m = None if mask is None else jnp.asarray(mask, jnp.int32)
        return np.asarray(fwd(params, jnp.asarray(tokens, jnp.int32), m, lora), dtype=np.float32)

    return fn


def random_params(cfg, seed: int = 0, std: float = 0.3) -> dict:
    """A params tree for ``cfg`` drawn with NumPy (no compilation): normal(std) matrices, norms 1 +- 0.1,
    biases normal(std) (non-trivial norms and biases so that every term of the forward pass matters)."""
    from gdsd_jax.models.denoiser import param_shapes

    rng = np.random.default_rng(seed)

    def make(name, shape):
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    shapes = param_shapes(cfg)
    return {
        "embed": make("embed", shapes["embed"]),
        "layers": {k: make(k, s) for k, s in shapes["layers"].items()},
        "final_norm": make("final_norm", shapes["final_norm"]),
        "lm_head": make("lm_head", shapes["lm_head"]),
    }
