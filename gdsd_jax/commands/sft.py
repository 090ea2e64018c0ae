"""``gdsd-jax sft``: masked-diffusion supervised fine-tuning; writes a params checkpoint."""

from __future__ import annotations

import json

from gdsd_jax.commands._common import add_config_arguments, load_train_config, no_empty_run_directory

HELP = "masked-diffusion supervised fine-tuning (warm starts)"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    import jax

    from gdsd_jax.checkpoint.params_io import save_params, storage_path
    from gdsd_jax.sft.run import run_sft

    cfg = load_train_config(args).validate()
    out = storage_path(cfg.output_dir)
    with no_empty_run_directory(cfg.output_dir):
        model_cfg, params, history = run_sft(cfg, output_dir=str(out), progress=not args.no_progress)
        save_params(out / "params", params, model_cfg)
    if jax.process_index() == 0:
        (out / "sft_history.json").write_text(json.dumps(history, indent=2) + "\n")
        last = history[-1] if history else {}
        print(f"sft: wrote {out / 'params'}; last test reward {last.get('test_reward', float('nan')):.3f}")
    return 0
