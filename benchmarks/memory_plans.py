"""Regenerate the per-device memory tables of ``docs/memory_plans.md``.

For every (config, number of devices) it runs ``gdsd-jax plan`` in a child process (a fresh process per
device count: the number of fake CPU devices is fixed when JAX starts) and appends the rows to a JSON
file; entries already in the file are skipped, so an interrupted sweep resumes where it stopped. Then it
prints the Markdown tables (``--markdown`` alone only prints them from an existing file).

Usage::

    python benchmarks/memory_plans.py --out memory_plans_cpu.json                       # CPU, LLaDA + Dream
    python benchmarks/memory_plans.py --target v5p --configs llada_8b_sudoku --remat full --out plans_v5p.json
    python benchmarks/memory_plans.py --out memory_plans_cpu.json --markdown             # tables only

``--target v4|v5e|v5p|v6e`` compiles with the TPU compiler (needs the ``libtpu`` package matching the
installed jax; no TPU is used). The wall time of every entry and of the whole sweep is recorded in the
JSON file (``seconds``) and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ("llada_8b_sudoku", "dream_7b_countdown")
DEFAULT_DEVICES = (8, 16, 32, 64)


def run_plan(config: str, plan_args: list[str]) -> tuple[dict, float, str]:
    """One ``gdsd-jax plan --config configs/CONFIG.yaml --json F PLAN_ARGS`` child process; returns its JSON,
    its wall time in seconds and its standard output (``benchmarks/step_time.py`` runs its plans through it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "gdsd_jax.cli", "plan", "--config", str(ROOT / "configs" / f"{config}.yaml"),
               "--json", str(out), *plan_args]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text()), secs, proc.stdout


def run_entry(config: str, devices: int, target: str, modes: list[str], remats: list[str], mesh: str,
              extra: list[str]) -> tuple[dict, float]:
    """One ``gdsd-jax plan`` child process; returns its JSON and its wall time in seconds."""
    args = ["--devices", str(devices), "--target", target, "--mesh", mesh, "--no-progress"]
    args += [f"--{m}" for m in modes]
    for r in remats:
        args += ["--remat", r]
    plan, secs, stdout = run_plan(config, args + list(extra))
    for line in stdout.splitlines():
        if line.startswith("  compiled"):
            print(line, flush=True)
    return plan, secs


def key(config: str, devices: int, target: str, mode: str, remat: str) -> str:
    return f"{config}|{devices}|{target}|{mode}|{remat}"


def markdown(results: dict) -> str:
    """Tables grouped by (config, target): one line per devices x mode x remat, GiB per device."""
    from gdsd_jax.experiments.plan import TPU_HBM_GB, hbm_gib

    groups: dict[tuple[str, str], list[dict]] = {}
    for e in results["entries"].values():
        groups.setdefault((e["config"], e["target"]), []).append(e)
    out = []
    gens = sorted(TPU_HBM_GB, key=TPU_HBM_GB.get)
    for (config, target), entries in sorted(groups.items()):
        entries.sort(key=lambda e: (e["row"]["devices"], e["row"]["mode"] != "lora", e["row"]["remat"]))
        out.append(f"\n#### {config}, compiled for {target}\n")
        head = ["devices", "mesh (data,fsdp,tensor)", "mode", "remat", "params", "adapters", "optimizer",
                "reference", "rollout temp", "stats temp", "update temp", "peak (phase)"]
        head += [f"{g} ({TPU_HBM_GB[g]:.0f} GB)" for g in gens]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---:" if i not in (1, 2, 3) else "---" for i in range(len(head))]) + "|")
        for e in entries:
            r = e["row"]
            f = r["functions"]
            g = 2 ** 30
            stats = max((f[k]["temp"] for k in ("statistics", "statistics_ref") if k in f), default=0)
            m = r["mesh"]
            cells = [str(r["devices"]), f"{m['data']},{m['fsdp']},{m['tensor']}", r["mode"], r["remat"],
                     f"{r['params'] / g:.2f}", f"{r['adapters'] / g:.2f}", f"{r['optimizer'] / g:.2f}",
                     f"{r['reference'] / g:.2f}", f"{f['rollout']['temp'] / g:.2f}", f"{stats / g:.2f}",
                     f"{f['update']['temp'] / g:.2f}", f"**{r['peak'] / g:.2f}** ({r['peak_phase']})"]
            for gen in gens:
                # Recomputed from the peak, so the tables follow the HBM figures of the current code.
                h = hbm_gib(gen) - r["peak"] / g
                cells.append(f"+{h:.1f} ({100 * h / hbm_gib(gen):.0f}%)" if h > 0 else f"no ({h:.1f})")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config names under configs/")
    p.add_argument("--devices", nargs="+", type=int, default=list(DEFAULT_DEVICES))
    p.add_argument("--target", default="cpu", help="cpu | v4 | v5e | v5p | v6e")
    p.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "full", "dots"])
    p.add_argument("--mesh", default="auto", help="passed to gdsd-jax plan --mesh")
    p.add_argument("--out", default="memory_plans.json", help="JSON results file (appended to, resumable)")
    p.add_argument("--markdown", action="store_true", help="only print the tables of --out")
    p.add_argument("extra", nargs="*", help="extra arguments for gdsd-jax plan (e.g. KEY=VALUE overrides)")
    args = p.parse_args(argv)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"entries": {}, "runs": []}
    if args.markdown:
        print(markdown(results))
        return 0
    t_all = time.perf_counter()
    done = 0
    for config in args.configs:
        for devices in args.devices:
            todo_modes = [m for m in args.modes
                          if any(key(config, devices, args.target, m, r) not in results["entries"] for r in args.remat)]
            if not todo_modes:
                continue
            for mode in todo_modes:
                remats = [r for r in args.remat if key(config, devices, args.target, mode, r) not in results["entries"]]
                print(f"== {config} on {devices} devices ({args.target}), {mode}, remat {remats}", flush=True)
                plan, secs = run_entry(config, devices, args.target, [mode], remats, args.mesh, args.extra)
                for row in plan["rows"]:
                    results["entries"][key(config, devices, args.target, row["mode"], row["remat"])] = {
                        "config": config, "target": args.target, "model_source": plan["model_source"],
                        "num_params": plan["num_params"], "seconds": secs / len(plan["rows"]), "row": row}
                done += 1
                print(f"   {secs:.0f} s", flush=True)
                out.write_text(json.dumps(results, indent=1))
    total = time.perf_counter() - t_all
    if done:
        import jax

        results["runs"].append({"target": args.target, "configs": args.configs, "devices": args.devices,
                                "modes": args.modes, "remat": args.remat, "seconds": total, "entries_run": done,
                                "jax": jax.__version__, "python": platform.python_version(),
                                "machine": f"{platform.machine()}, {os.cpu_count()} cores"})
        out.write_text(json.dumps(results, indent=1))
        print(f"sweep: {done} plan runs in {total:.0f} s; results in {out}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
