"""One GDSD RL step of a mid-size LLaDA-family model on the CPU: time split, tokens/s and model FLOPs utilisation.

Everything is measured in one process, back to back, so that the ratios are fair on a shared machine:

(a) the matmul peak: best of several large fp32 ``jnp.dot`` (2048^3, 4096^3) in GFLOP/s;
(b) one full RL step (:meth:`gdsd_jax.rl.trainer.RLTrainer.rl_step`) after a warm-up step: generation,
    reward, old/reference scoring, update; tokens/s as the trainer reports it (rows x (Lp + Lg) / step time);
    with ``--sampling KEY=VALUE ...`` (e.g. ``cache=dual``) also with that rollout sampler, the two alternating;
(c) the update step alone (the trainer's jitted ``fns.update``, :func:`gdsd_jax.rl.step.update`) repeated
    ``--update-repeats`` times: its model FLOPs (closed form, :func:`update_flops`) / time / peak = MFU;
(d) ratios: the jitted rollout sampler against the plain per-step loop of the tests (the baseline of
    ``benchmarks/sampling_throughput.py``), and the scoring pass (the trainer's ``fns.statistics``) with the
    chunked LM head against the unchunked full-logits log-likelihood (``vocab_chunk=None, seq_chunk=None``);
(e) ``--profile DIR``: a JAX profile of the update step, with the top ops by time aggregated from its
    Perfetto trace.

Model (default): 8 layers, width 512, 8 heads x 64 (MHA), SwiGLU MLP 1536, vocabulary 32000, fp32 parameters
and compute (60.1M parameters). Task: synthetic, 1 prompt of 64 random ids x G = 8 completions of 256 tokens
(rollout: LLaDA low-confidence remasking, 64 steps, blocks of 32, temperature 1); reward = fraction of
completion tokens with an even id (cheap, deterministic). Objective: GDSD (official settings: beta = 1e-3 so a
reference pass runs, mu = 1, one mask draw), full fine-tuning with AdamW, one micro-batch of 8 rows.

Usage::

    python benchmarks/rl_step.py                          # everything, default sizes
    python benchmarks/rl_step.py --profile /tmp/prof      # also profile the update step
    python benchmarks/rl_step.py --skip-loop --update-repeats 5
    python benchmarks/rl_step.py --unroll --step-only --sampling cache=dual   # exact vs dual-cache rollouts
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Timings are taken under tcmalloc when the machine has it, as the CLI runs (gdsd_jax/allocator.py);
# GDSD_JAX_ALLOCATOR=system measures glibc's malloc instead. Must run before JAX is imported.
from gdsd_jax.allocator import active_allocator, preload_tcmalloc  # noqa: E402

preload_tcmalloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# The per-step loop baseline lives with the sampling benchmark (which puts tests/ on the path).
import sampling_throughput  # noqa: E402

from gdsd_jax.config_io import build, parse_override  # noqa: E402
from gdsd_jax.distributed.mesh import make_mesh  # noqa: E402
from gdsd_jax.models.config import DenoiserConfig, tiny_llada  # noqa: E402
from gdsd_jax.models.denoiser import init_params  # noqa: E402
from gdsd_jax.objectives.config import objective_config  # noqa: E402
from gdsd_jax.objectives.types import RolloutBatch  # noqa: E402
from gdsd_jax.rl.trainer import RLTrainer  # noqa: E402
from gdsd_jax.sampling import SamplingConfig, generate_jit  # noqa: E402
from gdsd_jax.training.config import LoraSection, OptimSection, RLSection, TaskSection, TrainConfig  # noqa: E402
from gdsd_jax.training.task_adapter import Scores  # noqa: E402

# ---- model, task, trainer -----------------------------------------------------------------------

def model_config(args) -> DenoiserConfig:
    """LLaDA-family model of the requested size, fp32 parameters and compute."""
    v = args.vocab
    return tiny_llada(vocab_size=v, hidden_size=args.width, num_layers=args.layers, num_heads=args.heads,
                      num_kv_heads=args.heads, head_dim=args.width // args.heads, mlp_dim=args.mlp,
                      mask_token_id=v - 1, eos_token_id=v - 2, pad_token_id=v - 2, max_seq_len=4096,
                      remat=args.remat, scan_layers=not args.unroll)


class SyntheticAdapter:
    """Prompts are the examples' ``"ids"`` (no padding); reward = fraction of even completion ids."""

    def encode(self, examples):
        ids = np.stack([np.asarray(ex["ids"], np.int32) for ex in examples])
        return ids, np.ones_like(ids)

    def score(self, completion_ids, completion_mask, examples) -> Scores:
        r = np.mean(np.asarray(completion_ids) % 2 == 0, axis=1).astype(np.float32)
        return Scores(r, {"even": r.copy()}, 0)


def train_config(args, sampling: dict | None = None, **objective) -> TrainConfig:
    """The benchmark's run config; ``sampling`` replaces rollout settings (e.g. ``{"cache": "dual"}``)."""
    rows = args.prompts * args.group
    return TrainConfig(
        # The trainer gets the synthetic adapter above; the config names a registered task only to validate.
        task=TaskSection(name="sudoku", prompt_length=args.prompt_len),
        sampling=build(SamplingConfig, dict(gen_length=args.gen_len, steps=args.steps, block_length=args.block,
                                            temperature=1.0, remasking="low_confidence", **(sampling or {})),
                       "sampling"),
        objective=objective_config("gdsd", **objective),
        rl=RLSection(prompts_per_step=args.prompts, num_generations=args.group, num_iterations=1,
                     micro_batch_size=rows, total_steps=100),
        optim=OptimSection(lr=1e-5), lora=LoraSection(enabled=False), tensorboard=False,
    ).validate()


# ---- FLOPs --------------------------------------------------------------------------------------

def forward_flops(cfg: DenoiserConfig, rows: int, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one forward pass: 2 x (non-embedding matmul params) x tokens + attention
    4 x L^2 x (H Dh) per row and layer (QK^T and PV) + LM head 2 x D x V x head_positions."""
    d, h, kv, dh, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    per_layer = d * h * dh + 2 * d * kv * dh + h * dh * d + 3 * d * f
    dense = 2.0 * cfg.num_layers * per_layer * rows * seq_len
    attn = 4.0 * seq_len ** 2 * h * dh * cfg.num_layers * rows
    head = 2.0 * d * cfg.vocab_size * head_positions
    return dense + attn + head


def update_flops(cfg: DenoiserConfig, rows: int, lp: int, lg: int) -> float:
    """GDSD update: the masked and the complement pass (2 x rows sequences of Lp + Lg tokens), LM head on
    rows x Lg positions (each position scored in the pass where it is masked); forward + backward = 3 x forward.
    Recomputation (the chunked head's backward recomputes its logits) is not counted: these are model FLOPs."""
    return 3.0 * forward_flops(cfg, 2 * rows, lp + lg, rows * lg)


# ---- measurements -------------------------------------------------------------------------------

def matmul_peak(sizes=(2048, 4096), repeats: int = 3) -> float:
    """Best fp32 ``jnp.dot`` GFLOP/s over the sizes."""
    best = 0.0
    f = jax.jit(jnp.dot)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f(a, b).block_until_ready()
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = max(best, 2.0 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def step_split(trainer: RLTrainer, state, frozen, examples, rows: int, lg: int):
    """One RL step of ``trainer``: (new state, row) with its time split (s), total, tokens/s, completion
    tokens/s, mean reward, rollout forwards per row and the rollout's share of the step."""
    state, m = trainer.rl_step(state, frozen, examples)
    split = {k: m[f"time_{k}"] for k in ("generation", "reward", "scoring", "update")}
    total = sum(split.values())
    return state, dict(split, total=total, tokens_per_s=m["tokens_per_second"],
                       completion_tokens_per_s=rows * lg / total, reward_mean=m["reward_mean"],
                       rollout_nfe=m["rollout_nfe"], rollout_share=m["time_share_rollout"])


def print_split(label: str, r: dict) -> None:
    keys = ("generation", "reward", "scoring", "update")
    print(f"RL step{label}: " + ", ".join(f"{k} {r[k]:.2f} s ({100 * r[k] / r['total']:.0f}%)" for k in keys)
          + f"; total {r['total']:.2f} s; {r['tokens_per_s']:.1f} tokens/s "
          f"({r['completion_tokens_per_s']:.1f} completion tokens/s); rollout NFE {r['rollout_nfe']:.1f}",
          flush=True)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times), times


_WRAPPERS = ("PjitFunction", "while", "conditional", "call")


def top_ops(trace_dir: str, n: int = 15) -> list[tuple[str, float, int]]:
    """(name, total ms, count) of the ``n`` most expensive ops in the newest Perfetto trace under trace_dir."""
    files = sorted(glob.glob(trace_dir + "/**/*.json.gz", recursive=True), key=os.path.getmtime)
    ev = json.load(gzip.open(files[-1]))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    tot, cnt = collections.Counter(), collections.Counter()
    for e in ev:
        name = e.get("name", "")
        # Leaf XLA ops only: host-side wrappers and control-flow ops (while) span the ops they contain.
        if (e.get("ph") == "X" and "Thunk" not in name and "$" not in name and not name.startswith(_WRAPPERS)
                and "Execute" not in name):
            tot[name] += e.get("dur", 0)
            cnt[name] += 1
    return [(k, v / 1e3, cnt[k]) for k, v in tot.most_common(n)]


def finish(res: dict, json_path: str | None) -> int:
    """Record the load at the end, print it and write the results to ``json_path`` if given."""
    res["load_end"] = os.getloadavg()
    print(f"# load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64, help="rollout denoising steps")
    ap.add_argument("--block", type=int, default=32, help="rollout block length")
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--group", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--unroll", action="store_true", help="unrolled layers instead of lax.scan")
    ap.add_argument("--update-repeats", type=int, default=3)
    ap.add_argument("--score-repeats", type=int, default=2)
    ap.add_argument("--loop-batch", type=int, default=None,
                    help="rows of the sampler-vs-loop comparison (default: the RL step's rows)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the sampler-vs-loop comparison")
    ap.add_argument("--skip-step", action="store_true", help="skip the full RL step (update and scoring only)")
    ap.add_argument("--sampling", nargs="+", default=[], metavar="KEY=VALUE",
                    help="rollout sampler settings, e.g. cache=dual: the RL step is then measured with the exact "
                         "sampler and with this one, alternating (--step-rounds rounds)")
    ap.add_argument("--step-rounds", type=int, default=1, help="measured RL steps per sampler")
    ap.add_argument("--step-only", action="store_true",
                    help="only the RL step (b): skip the update, scoring and sampler-vs-loop measurements")
    ap.add_argument("--profile", default=None, help="write a JAX profile of the update step to this directory")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    res: dict = {}
    print(f"# jax {jax.__version__}, Python {platform.python_version()}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, allocator {active_allocator()}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start", flush=True)
    res["load_start"] = os.getloadavg()
    res["allocator"] = active_allocator()

    cfg = model_config(args)
    rows = args.prompts * args.group
    lp, lg = args.prompt_len, args.gen_len
    print(f"# model: {cfg.num_layers} layers, width {cfg.hidden_size}, {cfg.num_heads}x{cfg.head_dim} heads, "
          f"MLP {cfg.mlp_dim}, vocab {cfg.vocab_size}, {cfg.num_params() / 1e6:.1f}M params, fp32, "
          f"remat={cfg.remat}, scan_layers={cfg.scan_layers}; rows {rows} = {args.prompts} x G {args.group}, "
          f"Lp {lp} + Lg {lg}", flush=True)

    # (a) peak
    peak = matmul_peak()
    res["peak_gflops"] = peak
    print(f"matmul peak (fp32 jnp.dot, best of 2048^3/4096^3): {peak:.1f} GFLOP/s", flush=True)

    # trainer
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    params = init_params(cfg, jax.random.key(0), mesh)
    tcfg = train_config(args)
    trainer = RLTrainer(tcfg, cfg, params, mesh, SyntheticAdapter(), task=None)
    state, frozen = trainer.init_state()
    rng = np.random.default_rng(0)
    examples = [{"ids": rng.integers(0, cfg.vocab_size - 2, size=lp)} for _ in range(args.prompts)]

    # (b) RL steps after a warm-up step; with --sampling, the exact and the given rollout sampler alternate
    if not args.skip_step:
        variants = {"": (trainer, state, frozen)}
        if args.sampling:
            overrides = {".".join(path): value for path, value in map(parse_override, args.sampling)}
            # Its own copy of the weights: the update step donates the state's buffers.
            fast = RLTrainer(train_config(args, overrides), cfg, jax.tree.map(jnp.copy, params), mesh,
                             SyntheticAdapter(), task=None)
            variants[" " + " ".join(args.sampling)] = (fast, *fast.init_state())
        for label, (tr, st, fr) in variants.items():
            t0 = time.perf_counter()
            variants[label] = (tr, tr.rl_step(st, fr, examples)[0], fr)
            print(f"warm-up RL step{label} (includes compilation): {time.perf_counter() - t0:.1f} s", flush=True)
        rounds: dict[str, list[dict]] = {label: [] for label in variants}
        for _ in range(args.step_rounds):
            for label, (tr, st, fr) in variants.items():
                st, r = step_split(tr, st, fr, examples, rows, lg)
                variants[label] = (tr, st, fr)
                rounds[label].append(r)
                print_split(label, r)
        state = variants[""][1]
        res["step"] = rounds[""][-1]
        res["steps"] = {label.strip() or "exact": r for label, r in rounds.items()}
    if args.step_only:
        return finish(res, args.json)

    # inputs of the update step: one rollout
    pid = jnp.asarray(np.repeat(trainer.adapter.encode(examples)[0], args.group, axis=0))
    pmask = jnp.ones_like(pid)
    out = trainer.fns.rollout(state["trainable"], frozen, pid, pmask, jax.random.key(1), trainer.sampling_cfg)
    batch = RolloutBatch(sequences=out.sequences, prompt_mask=pmask, completion_mask=out.completion_mask,
                         prompt_len=lp)
    masks = trainer.fns.draw_masks(jax.random.key(2), batch)
    ref = trainer.fns.statistics(frozen, None, batch, masks)
    adv = jnp.asarray(np.linspace(-1, 1, rows), jnp.float32)

    # (c) the update step alone
    holder = {"state": state}

    def one_update():
        holder["state"], mu = trainer.fns.update(holder["state"], frozen, batch, masks, None, ref, adv)
        return mu["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(one_update())
    res["update_first_call_s"] = time.perf_counter() - t0
    peak2 = matmul_peak()
    upd_s, upd_all = timed(one_update, args.update_repeats)
    peak3 = matmul_peak()
    peak = max(peak, peak2, peak3)
    flops = update_flops(cfg, rows, lp, lg)
    res["update"] = dict(best_s=upd_s, all_s=upd_all, gflop=flops / 1e9, gflops=flops / upd_s / 1e9,
                         mfu=flops / upd_s / 1e9 / peak, peak_gflops=peak, peak_before_after=(peak2, peak3))
    print(f"update step: best {upd_s:.3f} s of {[round(t, 3) for t in upd_all]}; {flops / 1e9:.1f} GFLOP "
          f"-> {flops / upd_s / 1e9:.1f} GFLOP/s; peak (best of all runs) {peak:.1f} GFLOP/s "
          f"[just before {peak2:.1f}, just after {peak3:.1f}] -> MFU {100 * flops / upd_s / 1e9 / peak:.1f}%",
          flush=True)

    # (d1) scoring: chunked vs unchunked
    naive = RLTrainer(train_config(args, vocab_chunk=None, seq_chunk=None), cfg, params, mesh,
                      SyntheticAdapter(), task=None)
    score = lambda: trainer.fns.statistics(frozen, None, batch, masks)  # noqa: E731
    score_naive = lambda: naive.fns.statistics(frozen, None, batch, masks)  # noqa: E731
    jax.block_until_ready((score(), score_naive()))
    sc_s, _ = timed(score, args.score_repeats)
    scn_s, _ = timed(score_naive, args.score_repeats)
    diff = float(jnp.max(jnp.abs(score()["ell"] - score_naive()["ell"])))
    sflops = forward_flops(cfg, 2 * rows, lp + lg, rows * lg)
    res["scoring"] = dict(chunked_s=sc_s, unchunked_s=scn_s, ratio=scn_s / sc_s, max_abs_diff=diff,
                          chunked_mfu=sflops / sc_s / 1e9 / peak)
    print(f"scoring (statistics, one pass pair): chunked {sc_s:.3f} s (MFU {100 * sflops / sc_s / 1e9 / peak:.1f}%),"
          f" unchunked {scn_s:.3f} s -> unchunked/chunked {scn_s / sc_s:.2f}x; max |diff| {diff:.2e}", flush=True)

    # (d2) generation vs the per-step loop (temperature 0 so both produce the same tokens)
    if not args.skip_loop:
        nb = args.loop_batch or rows
        scfg = trainer.sampling_cfg.replace(temperature=0.0)
        ids = np.asarray(pid[:nb])
        pm = np.ones_like(ids)
        state_params = holder["state"]["trainable"]
        compiled = generate_jit.lower(state_params, cfg, jnp.asarray(ids), jnp.asarray(pm), jax.random.key(0), scfg).compile()
        run = lambda: compiled(state_params, jnp.asarray(ids), jnp.asarray(pm), jax.random.key(0))  # noqa: E731
        ours = jax.block_until_ready(run())
        gen_s, _ = timed(run, 1)
        fn = sampling_throughput.jax_logits_fn(state_params, cfg)
        fn(np.concatenate([ids, np.full((nb, lg), cfg.mask_token_id, np.int32)], 1), None)   # compile
        t0 = time.perf_counter()
        ref_x = sampling_throughput.llada_reference(fn, ids, pm, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                                    gen_length=lg, steps=scfg.steps,
                                                    block_length=scfg.llada_block_length)
        loop_s = time.perf_counter() - t0
        same = bool(np.array_equal(np.asarray(ours.sequences), ref_x))
        res["generation"] = dict(rows=nb, jitted_s=gen_s, loop_s=loop_s, speedup=loop_s / gen_s, same_tokens=same)
        print(f"generation ({nb} rows, temperature 0): jitted sampler {gen_s:.2f} s, per-step loop {loop_s:.2f} s "
              f"-> {loop_s / gen_s:.2f}x; same tokens: {same}", flush=True)

    # (e) profile of the update step
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            for _ in range(2):
                jax.block_until_ready(one_update())
        ops = top_ops(args.profile)
        total_ms = sum(t for _, t, _ in top_ops(args.profile, 10 ** 6))
        res["profile_top_ops"] = ops
        print(f"profile of 2 update steps: top ops by time (of {total_ms:.0f} ms of op time)")
        for name, ms, count in ops:
            print(f"  {ms:9.1f} ms  {100 * ms / total_ms:5.1f}%  x{count:<4d} {name}")

    return finish(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
