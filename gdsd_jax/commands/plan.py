"""``gdsd-jax plan``: per-device memory of a recipe's RL step on N devices, compiled ahead of time, no weights.

Examples::

    gdsd-jax plan --config configs/llada_8b_math.yaml --devices 32
    gdsd-jax plan --config configs/dream_7b_countdown.yaml --devices 16 --mesh fsdp=8,tensor=2 --lora --remat full
    gdsd-jax plan --config configs/llada_8b_sudoku.yaml --devices 64 --target v5p     # TPU compiler (libtpu)
    gdsd-jax plan --config configs/llada_8b_math.yaml --devices 8 --target v5p --cost  # roofline step time

With ``--target cpu`` (default) the step is compiled for N fake CPU devices. Their number must be fixed
before JAX starts, so when this process already runs JAX with fewer devices the command runs itself
again in a child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. With a TPU
generation as target the programs are compiled by the TPU compiler for an abstract slice of that size
(deviceless ahead-of-time compilation; needs the ``libtpu`` package, not a TPU: ``pip install
"gdsd-jax[tpu]"``). ``--cost`` prints, instead of the memory plan, each phase's compiled cost (FLOPs and HBM
bytes per device) and its roofline time on that TPU generation (:mod:`gdsd_jax.experiments.cost`). See
:mod:`gdsd_jax.experiments.plan` for what each number means and ``docs/memory_plans.md`` for recorded plans.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from gdsd_jax.config_io import ConfigError, load_config, resolve_config_path
from gdsd_jax.errors import UserError

HELP = "per-device memory plan of a recipe on an abstract mesh"

_CHILD_ENV = "GDSD_PLAN_CHILD"


def add_arguments(p) -> None:
    from gdsd_jax.experiments.plan import TARGETS
    from gdsd_jax.models.config import REMAT_POLICIES

    p.add_argument("--config", default=None, help="run config YAML (default: configs/sudoku_tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of the config")
    p.add_argument("--devices", type=int, required=True, help="number of devices (chips) to plan for")
    p.add_argument("--mesh", default="auto",
                   help="'auto' (largest fsdp dividing the micro-batch, rest on tensor), 'recipe' "
                        "(distributed.mesh of the config) or data=..,fsdp=..,tensor=..")
    p.add_argument("--lora", action="store_true", help="plan LoRA training (default: LoRA and full)")
    p.add_argument("--full", action="store_true", help="plan full fine-tuning (default: LoRA and full)")
    p.add_argument("--remat", action="append", choices=REMAT_POLICIES, default=None,
                   help="rematerialisation policy of the update step; repeat for several (default: none and full)")
    p.add_argument("--target", choices=TARGETS, default="cpu",
                   help="compiler: fake CPU devices, or a TPU generation (deviceless, needs libtpu)")
    p.add_argument("--preset", default=None,
                   help="model preset when the config's checkpoint is not available here (e.g. llada_8b)")
    p.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                   help="stored parameter dtype (default: the checkpoint's; bf16 for upstream LLaDA/Dream)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan rows as JSON")
    p.add_argument("--details", action="store_true", help="print every compiled function's memory analysis")
    p.add_argument("--cost", action="store_true",
                   help="instead of memory: compiled FLOPs / bytes per phase and a roofline step time "
                        "(needs a TPU --target, whose peak figures it uses)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- device set-up -------------------------------------------------------------------------------

def _prepare_in_process(target: str, devices: int) -> bool:
    """Make this process able to plan; False when a child process with more CPU devices is needed."""
    import jax

    # Planning never runs on the local accelerator: pin the CPU backend (no effect once backends are up).
    jax.config.update("jax_platforms", "cpu")
    if target != "cpu":
        return True
    try:
        jax.config.update("jax_num_cpu_devices", devices)
        return True
    except RuntimeError:        # the backends are up already: this process has the CPU devices it has
        pass
    try:
        return len(jax.devices("cpu")) >= devices
    except RuntimeError:
        return False


def _child_argv(args) -> list[str]:
    argv = ["plan", "--devices", str(args.devices), "--mesh", args.mesh, "--target", args.target]
    if args.config:
        argv += ["--config", str(args.config)]
    for flag in ("lora", "full", "details", "cost", "no_progress"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    for r in args.remat or []:
        argv += ["--remat", r]
    for flag in ("preset", "param_dtype", "json"):
        if getattr(args, flag):
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv + list(args.overrides)


def _run_child(args) -> int:
    import gdsd_jax

    if os.environ.get(_CHILD_ENV):
        raise UserError(f"could not get {args.devices} CPU devices in the child process")
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[_CHILD_ENV] = "1"
    root = str(Path(gdsd_jax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    return subprocess.call([sys.executable, "-m", "gdsd_jax.cli", *_child_argv(args)], env=env)


# ---- command -------------------------------------------------------------------------------------

def run(args) -> int:
    if args.devices <= 0:
        raise UserError(f"--devices must be positive, got {args.devices}")
    from gdsd_jax.experiments.plan import require_libtpu

    if args.cost and args.target == "cpu":
        raise SystemExit("plan: --cost needs a TPU --target (v4, v5e, v5p or v6e): the roofline uses that chip's "
                         "peak FLOP/s and HBM bandwidth; the CPU cross-check is benchmarks/step_time.py --cpu-check")
    try:
        require_libtpu(args.target)        # before any work, and before a child process is started
    except RuntimeError as e:
        raise UserError(str(e)) from None
    if not _prepare_in_process(args.target, args.devices):
        return _run_child(args)

    from gdsd_jax.experiments import plan
    from gdsd_jax.models.config import execution_record
    from gdsd_jax.training.config import TrainConfig

    try:
        cfg = load_config(TrainConfig, resolve_config_path(args.config), list(args.overrides)).validate()
        model_cfg, source = plan.resolve_model_config(cfg, preset_name=args.preset, param_dtype=args.param_dtype)
        devices = (plan.tpu_devices(args.target, args.devices, cfg.distributed.num_slices)
                   if args.target != "cpu" else None)
        mesh = plan.mesh_from_spec(args.mesh, args.devices, cfg, model_cfg, devices=devices)
    except (ConfigError, ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    modes = [m for m in ("lora", "full") if getattr(args, m)] or ["lora", "full"]
    remats = list(dict.fromkeys(args.remat or ["none", "full"]))
    name = Path(args.config).stem if args.config else "sudoku_tiny"
    print(f"plan: {name}: {model_cfg.family} model from {source}, {model_cfg.num_params() / 1e9:.3f} B parameters "
          f"({model_cfg.param_dtype}, compute {model_cfg.compute_dtype}); target {args.target}, "
          f"{args.devices} devices, mesh {plan.mesh_label(dict(mesh.shape))}")
    rl = cfg.rl
    print(f"plan: {rl.prompts_per_step} prompts x {rl.num_generations} = {rl.prompts_per_step * rl.num_generations} "
          f"rows per step, micro-batch {rl.micro_batch_size}, {rl.num_iterations} inner iterations; "
          f"sequence {cfg.task.prompt_length} + {cfg.sampling.gen_length} tokens")
    print("plan: model execution: " + ", ".join(f"{k}={v}" for k, v in execution_record(model_cfg, mesh).items()))
    if args.cost:
        return _run_cost(args, cfg, model_cfg, mesh, modes, name, source)
    rows = plan.plan_recipe(cfg, model_cfg, mesh, modes=modes, remats=remats, model_name=name,
                            progress=not args.no_progress, log=print)
    print()
    print(f"per-device {plan.table_unit(rows)[0]}; peak = largest phase of one RL step (rollout / scoring / "
          "update); fits = TPU generations whose HBM holds the peak, with headroom")
    print(plan.format_table(rows))
    if args.details:
        unit, scale = plan.table_unit(rows)
        for r in rows:
            phases = ", ".join(f"{k} {v / scale:.2f}" for k, v in r.phases.items())
            print(f"\n{r.mode} remat={r.remat} ({unit}): phases {phases}; LoRA B copy {r.policy_copy / scale:.2f}")
            for fname, m in r.functions.items():
                print(f"  {fname:<15s} argument {m.argument / scale:8.3f}  output {m.output / scale:8.3f}  "
                      f"alias {m.alias / scale:8.3f}  temp {m.temp / scale:8.3f}  live {m.live / scale:8.3f}")
    if args.json:
        out = {"config": name, "target": args.target, "model_source": source, "num_params": model_cfg.num_params(),
               "rows": [r.to_dict() for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"plan: wrote {args.json}")
    return 0


def _run_cost(args, cfg, model_cfg, mesh, modes: list[str], name: str, source: str) -> int:
    """``--cost``: compile the phases' unit programs, print their roofline table on ``args.target``."""
    from gdsd_jax.experiments import cost

    chip = cost.CHIPS[args.target]
    print(f"plan: cost on {chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bandwidth / 1e9:.0f} GB/s "
          f"HBM per chip ({chip.source}); attention_impl={model_cfg.attention_impl}; compiled estimates, not "
          "measured TPU times")
    rows = cost.cost_recipe(cfg, model_cfg, mesh, target=args.target, modes=modes, model_name=name,
                            log=None if args.no_progress else print)
    print()
    print("per device, one RL step (every loop's trip count multiplied in); roofline s = max(compute, memory); "
          "compiler s = the TPU compiler's optimal_seconds")
    print(cost.format_cost_table(rows, chip))
    print()
    for line in cost.summary_lines(rows, chip):
        print(f"plan: {line}")
    if args.json:
        out = {"config": name, "target": args.target, "model_source": source, "chip": dataclasses.asdict(chip),
               "model_config": dataclasses.asdict(model_cfg), "rows": [r.to_dict() for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"plan: wrote {args.json}")
    return 0
