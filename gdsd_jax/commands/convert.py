"""``gdsd-jax convert``: Hugging Face LLaDA / Dream safetensors -> gdsd-jax params checkpoint (Orbax)."""

from __future__ import annotations

import sys

from gdsd_jax.commands._common import dtype_arg, refuse_existing_output, require_existing
from gdsd_jax.errors import error_line

HELP = "Hugging Face safetensors -> gdsd-jax (Orbax) checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--hf-dir", required=True, help="upstream model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    p.add_argument("--family", choices=["llada", "dream"], default=None,
                   help="model family (default: from config.json model_type)")
    p.add_argument("--dtype", type=dtype_arg(("bf16", "fp32")), default=None,
                   help="parameter dtype: bf16 or fp32 (bfloat16, float32 also accepted; default: bf16 weights stay "
                        "bf16, others become fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from gdsd_jax.checkpoint.params_io import read_config
    from gdsd_jax.convert.hf_checkpoint import convert_checkpoint

    require_existing(args.hf_dir, "--hf-dir")
    refuse_existing_output(args.out, args.overwrite)
    try:
        out = convert_checkpoint(args.hf_dir, args.out, family=args.family, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, KeyError, OSError) as e:
        print(error_line("convert", e), file=sys.stderr)
        return 1
    cfg = read_config(out)
    print(f"convert: wrote {out} ({cfg.family}, {cfg.num_layers} layers, d={cfg.hidden_size}, "
          f"{cfg.num_params():,} parameters, {cfg.param_dtype})")
    return 0
