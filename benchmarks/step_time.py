"""Compiled cost and roofline step time of the 8B recipes (``docs/memory_plans.md``, "Step time"), and the
CPU cross-check of the method.

Sweep: for every (config, number of chips, mode) it runs ``gdsd-jax plan --cost --target T`` in a child
process and stores the rows in a JSON file, keyed by the overrides too (``-- KEY=VALUE ...`` is passed to
every run, e.g. ``model.overrides.attention_impl=xla``), so one command regenerates the table for another
attention implementation; entries already in the file are skipped (an interrupted sweep resumes).

CPU cross-check (``--cpu-check``): the same cost analysis on the 60M-parameter model of
``benchmarks/rl_step.py`` (8 layers, width 512, vocabulary 32000, fp32; 8 rows of 64 + 256 tokens) against
one measured RL step on this machine. The CPU's "peak" figures are measured here, in the same process: the
best fp32 ``jnp.dot`` GFLOP/s (2048^3 and 4096^3, as ``rl_step.py``) and the bandwidth of a jitted
``x + 1`` over 256 MiB of fp32 (bytes read + written / time). A sanity check of the method (are the
compiled counts and the step counts of the right size?), not a model of CPU time.

Usage::

    python benchmarks/step_time.py --target v5p --out step_time_v5p.json           # LLaDA math + Dream, 8/16/32
    python benchmarks/step_time.py --target v5p --out step_time_v5p.json -- model.overrides.attention_impl=xla
    python benchmarks/step_time.py --out step_time_v5p.json --markdown             # tables only
    python benchmarks/step_time.py --cpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_CONFIGS = ("llada_8b_math", "dream_7b_countdown")
DEFAULT_DEVICES = (8, 16, 32)


def run_entry(config: str, devices: int, target: str, mode: str, extra: list[str]) -> tuple[dict, float]:
    """One ``gdsd-jax plan --cost`` child process; returns its JSON and its wall time in seconds."""
    from memory_plans import run_plan

    res, secs, _ = run_plan(config, ["--devices", str(devices), "--target", target, "--cost", f"--{mode}", *extra])
    return res, secs


def key(config: str, devices: int, target: str, mode: str, extra: list[str]) -> str:
    return "|".join([config, str(devices), target, mode, *extra])


def markdown(results: dict) -> str:
    """One table per (config, target, overrides): per chips x mode the roofline seconds of each phase (and
    its bound), the step with each rollout, and the rollouts' generated tokens/s."""
    from gdsd_jax.experiments.cost import Cost, roofline

    groups: dict[tuple, list[dict]] = {}
    for e in results["entries"].values():
        groups.setdefault((e["config"], e["target"], " ".join(e["extra"])), []).append(e)
    out = []
    for (config, target, extra), entries in sorted(groups.items()):
        entries.sort(key=lambda e: (e["row"]["devices"], e["row"]["mode"] != "lora"))
        chip = entries[0]["chip"]
        from gdsd_jax.experiments.cost import Chip

        chip = Chip(**chip)
        out.append(f"\n#### {config}, compiled for {target}" + (f", {extra}" if extra else "") + "\n")
        head = ["chips", "mode", "rollout exact", "rollout dual", "statistics", "update", "step (exact)",
                "step (dual)", "dominant (dual)", "rollout tok/s exact / dual", "compiler s: step (dual)"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---" if i in (1, 8) else "---:" for i in range(len(head))) + "|")
        for e in entries:
            r = e["row"]
            ph = {k: Cost(**v) for k, v in r["phases"].items()}
            t = {k: roofline(c, chip) for k, c in ph.items()}

            def cell(name):
                return f"{t[name].seconds:.2f} ({t[name].bound[:3]})"

            dual = ph["rollout_dual"] + ph["statistics"] + ph["update"]
            exact = ph["rollout_exact"] + ph["statistics"] + ph["update"]
            parts = {k: t[k].seconds for k in ("rollout_dual", "statistics", "update")}
            top = max(parts, key=parts.get)
            tok = r["rollout_tokens"]
            out.append("| " + " | ".join([
                str(r["devices"]), r["mode"], cell("rollout_exact"), cell("rollout_dual"), cell("statistics"),
                cell("update"), f"{roofline(exact, chip).seconds:.2f}", f"{roofline(dual, chip).seconds:.2f}",
                f"{top} ({parts[top] / sum(parts.values()):.0%})",
                f"{tok / t['rollout_exact'].seconds:.0f} / {tok / t['rollout_dual'].seconds:.0f}",
                "-" if dual.optimal_seconds is None else f"{dual.optimal_seconds:.2f}"]) + " |")
    return "\n".join(out)


# ---- CPU cross-check ------------------------------------------------------------------------------

def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a jitted ``x + 1`` over ``mib`` MiB of fp32 (read + write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = max(best, 2 * x.nbytes / (time.perf_counter() - t0))
    return best


def cpu_check(json_path: str | None) -> int:
    """The roofline of the 60M benchmark model's RL step against its measured split on this CPU."""
    import jax
    import numpy as np
    import rl_step

    from gdsd_jax.distributed.mesh import make_mesh
    from gdsd_jax.experiments.cost import Chip, cost_recipe, roofline
    from gdsd_jax.models.denoiser import init_params
    from gdsd_jax.rl.trainer import RLTrainer

    args = argparse.Namespace(layers=8, width=512, heads=8, mlp=1536, vocab=32000, prompt_len=64, gen_len=256,
                              steps=64, block=32, prompts=1, group=8, remat="none", unroll=False)
    mcfg, tcfg = rl_step.model_config(args), rl_step.train_config(args)
    mesh = make_mesh(data=1, fsdp=-1, tensor=1, devices=jax.devices()[:1])
    load0 = os.getloadavg()
    print(f"# {mcfg.num_params() / 1e6:.1f}M params, {os.cpu_count()} cores, load average {load0[0]:.2f}", flush=True)
    row = cost_recipe(tcfg, mcfg, mesh, target="cpu", modes=["full"])[0]

    params = init_params(mcfg, jax.random.key(0), mesh)
    trainer = RLTrainer(tcfg, mcfg, params, mesh, rl_step.SyntheticAdapter(), task=None)
    state, frozen = trainer.init_state()
    rng = np.random.default_rng(0)
    examples = [{"ids": rng.integers(0, mcfg.vocab_size - 2, size=args.prompt_len)}]
    state = trainer.rl_step(state, frozen, examples)[0]                 # warm-up (compiles)
    peak = rl_step.matmul_peak() * 1e9
    bw = memory_bandwidth()
    chip = Chip("cpu", peak, bw, f"measured here: fp32 jnp.dot {peak / 1e9:.1f} GFLOP/s, x + 1 {bw / 1e9:.1f} GB/s")
    splits = []
    for _ in range(2):
        state, split = rl_step.step_split(trainer, state, frozen, examples, 8, args.gen_len)
        splits.append(split)
    measured = {"rollout_exact": min(s["generation"] for s in splits), "statistics": min(s["scoring"] for s in splits),
                "update": min(s["update"] for s in splits)}
    print(f"# CPU figures: {chip.source}; load average {os.getloadavg()[0]:.2f} at the end")
    print("| phase | GFLOP | GB | compute s | memory s | roofline s | bound | measured s | measured / roofline |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
    res = {"chip": chip.__dict__, "load": [load0, os.getloadavg()], "phases": {}}
    for k, m in measured.items():
        c = row.phases[k]
        rf = roofline(c, chip)
        print(f"| {k} | {c.flops / 1e9:.1f} | {c.bytes / 1e9:.2f} | {rf.compute_seconds:.3f} | "
              f"{rf.memory_seconds:.3f} | {rf.seconds:.3f} | {rf.bound} | {m:.3f} | {m / rf.seconds:.2f} |")
        res["phases"][k] = {"cost": c.to_dict(), "roofline_s": rf.seconds, "measured_s": m}
    if json_path:
        Path(json_path).write_text(json.dumps(res, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config names under configs/")
    p.add_argument("--devices", nargs="+", type=int, default=list(DEFAULT_DEVICES))
    p.add_argument("--target", default="v5p", help="v4 | v5e | v5p | v6e")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--out", default="step_time.json", help="JSON results file (appended to, resumable)")
    p.add_argument("--markdown", action="store_true", help="only print the tables of --out")
    p.add_argument("--cpu-check", action="store_true", help="only the CPU cross-check of the method")
    p.add_argument("--json", default=None, help="--cpu-check: also write its results here")
    p.add_argument("extra", nargs="*", help="arguments for every gdsd-jax plan run (KEY=VALUE overrides)")
    args = p.parse_args(argv)
    if args.cpu_check:
        return cpu_check(args.json)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"entries": {}}
    if not args.markdown:
        for config in args.configs:
            for devices in args.devices:
                for mode in args.modes:
                    k = key(config, devices, args.target, mode, args.extra)
                    if k in results["entries"]:
                        continue
                    print(f"== {config} on {devices} chips ({args.target}), {mode} {' '.join(args.extra)}", flush=True)
                    res, secs = run_entry(config, devices, args.target, mode, args.extra)
                    results["entries"][k] = {"config": config, "target": args.target, "extra": args.extra,
                                             "chip": res["chip"], "seconds": secs, "row": res["rows"][0]}
                    out.write_text(json.dumps(results, indent=1))
                    print(f"   {secs:.0f} s", flush=True)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
