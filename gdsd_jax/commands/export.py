"""``gdsd-jax export``: a params checkpoint or a run's trained policy -> Hugging Face safetensors (or params).

Examples::

    gdsd-jax export --checkpoint ckpt/ --out hf/                       # params checkpoint -> HF layout
    gdsd-jax export --run runs/x --out hf/                             # the run's latest policy -> HF layout
    gdsd-jax export --run runs/x --step 200 --out policy200/ --format params

A run's policy is its trained weights (full fine-tuning) or the base with the LoRA adapters merged in, in
the base's dtype. A model the upstream layout cannot hold (e.g. learned absolute positions) is refused by
``--format hf`` with the reason, before anything is written; ``--format params`` always works.
"""

from __future__ import annotations

import shutil
import sys

from gdsd_jax.commands._common import dtype_arg, refuse_existing_output, require_existing
from gdsd_jax.errors import error_line

HELP = "gdsd-jax checkpoint or a run's policy -> Hugging Face safetensors + config.json (or a params checkpoint)"


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="params checkpoint directory (convert / save_params output)")
    src.add_argument("--run", help="gdsd-jax train output directory: export its trained policy")
    p.add_argument("--step", type=int, default=None, help="with --run: the saved step (default: the latest)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--format", choices=["hf", "params"], default="hf",
                   help="hf: upstream safetensors + config.json (default); params: a gdsd-jax params checkpoint")
    p.add_argument("--max-shard-size", default="5GB",
                   help="shard the weights with model.safetensors.index.json above this size (default 5GB)")
    p.add_argument("--dtype", type=dtype_arg(), default=None,
                   help="tensor dtype: bf16, fp16 or fp32 (bfloat16, float16, float32 also accepted; default: the original upstream dtype if known, else the parameter dtype; "
                        "a run's policy: the base's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args) -> None:
    if args.step is not None and args.run is None:
        raise ValueError("--step applies to --run (a run directory), not to --checkpoint")
    if args.format == "params" and args.run is None:
        raise ValueError("--format params exports a run's policy (--run); --checkpoint is a params checkpoint already")
    if args.format == "params" and args.dtype == "fp16":
        raise ValueError("--dtype fp16 is for --format hf; params checkpoints hold bf16 or fp32")


def _export_run(args):
    from pathlib import Path

    from gdsd_jax.checkpoint.policy import run_base_checkpoint, run_config
    from gdsd_jax.convert.export import export_checkpoint
    from gdsd_jax.convert.hf_config import config_to_hf
    from gdsd_jax.loading import restore_run_policy, write_policy

    out = Path(args.out).absolute()
    # fp16 exists in the HF layout only: the staged params checkpoint keeps the base's dtype then.
    params_dtype = args.dtype if args.dtype in ("bf16", "fp32") else None
    params, cfg, step = restore_run_policy(args.run, args.step, dtype=params_dtype)
    upstream = run_base_checkpoint(args.run, run_config(args.run))
    source = {"run": str(Path(args.run).absolute()), "step": step}
    if args.format == "params":
        return write_policy(out, params, cfg, upstream=upstream, source=source), step
    config_to_hf(cfg)                        # a model the upstream layout cannot hold fails here, before writing
    staged = out.parent / f".{out.name}.policy"
    try:
        write_policy(staged, params, cfg, upstream=upstream, source=source)
        del params
        return export_checkpoint(staged, out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=not args.no_progress), step
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def run(args) -> int:
    from gdsd_jax.convert.export import export_checkpoint, missing_model_code

    require_existing(args.run or args.checkpoint, "--run" if args.run else "--checkpoint")
    refuse_existing_output(args.out, args.overwrite)
    try:
        _check_args(args)
        if args.run is not None:
            out, step = _export_run(args)
            what = f"the policy of {args.run} at step {step}"
        else:
            out = export_checkpoint(args.checkpoint, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                    overwrite=args.overwrite, progress=not args.no_progress)
            what = args.checkpoint
    except (ValueError, KeyError, OSError) as e:
        print(error_line("export", e), file=sys.stderr)
        return 1
    files = sorted(f.name for f in out.iterdir())
    print(f"export: wrote {what} to {out} ({len(files)} files: {', '.join(files[:6])}"
          f"{' ...' if len(files) > 6 else ''})")
    missing = missing_model_code(out) if args.format == "hf" else []
    if missing:
        print(f"gdsd-jax export: warning: {out} has no model code ({', '.join(missing)}, named by config.json's "
              f"auto_map), so AutoModel.from_pretrained(..., trust_remote_code=True) cannot load it: the checkpoint "
              f"it comes from carried none; copy the upstream model's *.py files into it", file=sys.stderr)
    return 0
