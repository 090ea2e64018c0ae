"""``gdsd-jax eval``: decode a task's test set and write per-example JSONL plus a summary."""

from __future__ import annotations

import argparse
import json

from gdsd_jax.config_io import parse_override
from gdsd_jax.tasks.base import PROTOCOLS

HELP = "evaluate a checkpoint on a task's test set"

#: Generation settings of the official evaluation (GDSD eval/run_eval.sh and eval/eval.py; docs/tasks.md):
#: L = 128 by default, steps forced to L // 2, LLaDA blocks of 32, greedy; Dream's diffusion_generate is
#: called without top_k and inherits transformers' default top_k = 50 (``DREAM_OFFICIAL_TOP_K``, used for Dream
#: under either protocol unless ``--top-k`` says otherwise).
OFFICIAL_GEN_LENGTH = 128
OFFICIAL_BLOCK_LENGTH = 32


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="params checkpoint (ours), an HF directory, or a run directory (its trained policy; its "
                        "own evaluation settings are the defaults of every option below)")
    p.add_argument("--step", type=int, default=None, help="with a run directory: the saved step (default: the latest)")
    p.add_argument("--task", default=None,
                   help="task name (sudoku, countdown, gsm8k, math, code); default with a run directory: the run's")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="evaluation protocol (docs/tasks.md): 'official' = the official GDSD test files, prompts, "
                        "parser, aggregation and generation settings (sudoku, countdown); 'project' = the "
                        "project's own test sets and parsers (default: a run's own; else official for chat "
                        "prompts where the task has it, else project)")
    p.add_argument("--split", default=None, help="default: a run's eval.split, else test")
    p.add_argument("--format", default=None, choices=["compact", "chat"],
                   help="prompt format (default: a run's task.format; else compact for the tiny tasks with a "
                        "compact format, else chat)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory (chat format; default: the checkpoint's, or a run's "
                        "model.tokenizer / model.checkpoint)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="default: a run's task.prompt_length; else 17 (compact) or the longest prompt of the "
                        "evaluated examples")
    p.add_argument("--gen-length", type=int, default=None,
                   help="default: a run's evaluation sampling; else 128 (official protocol) or 16")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps (default: a run's; else gen-length // 2 (official protocol) or gen-length)")
    p.add_argument("--block-length", type=int, default=None,
                   help="LLaDA block length (default: a run's; else 32 (official protocol) or gen-length)")
    p.add_argument("--temperature", type=float, default=None, help="default: a run's evaluation sampling, else 0")
    p.add_argument("--remasking", default=None, help="default: a run's, else low_confidence")
    p.add_argument("--alg", default=None, help="Dream unmasking order (default: a run's, else entropy)")
    p.add_argument("--top-k", type=int, default=None,
                   help="Dream top-k filtering (default: a run's; for other Dream models the official "
                        "evaluations' effective top-k, see docs/sampling.md; 0 disables it)")
    p.add_argument("--ban-mask-token", default=None, action=argparse.BooleanOptionalAction,
                   help="never sample the mask token (default: a run's sampling setting, else off as upstream)")
    p.add_argument("--max-examples", type=int, default=None, help="default: a run's eval.max_examples, else all")
    p.add_argument("--batch-size", type=int, default=None, help="default: a run's eval.batch_size, else 64")
    p.add_argument("--mesh", default=None, help="default: a run's distributed.mesh, else data=1,fsdp=-1,tensor=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output directory for eval.jsonl and eval_summary.json")
    p.add_argument("task_kwargs", nargs="*", metavar="KEY=VALUE",
                   help="task arguments (default: a run's task.kwargs): test_file=PATH (JSONL or Parquet; gsm8k, "
                        "math and code have no bundled data), train_file=PATH, variant=xml|plain (gsm8k, math), "
                        "seed=N (sudoku, countdown)")


def eval_top_k(requested: int | None, family: str) -> int | None:
    """``--top-k`` (0: off); unset, Dream models get the official evaluations' effective top-k."""
    from gdsd_jax.sampling import DREAM_OFFICIAL_TOP_K

    if requested is None:
        return DREAM_OFFICIAL_TOP_K if family == "dream" else None
    return requested or None


def _run_config(path: str):
    """The run config of a run directory (whose settings become the defaults), or None for a model path."""
    from gdsd_jax.checkpoint.params_io import storage_path
    from gdsd_jax.checkpoint.policy import RUN_CONFIG_FILE, is_run_dir, run_config
    from gdsd_jax.config_io import build
    from gdsd_jax.training.config import TrainConfig

    if not is_run_dir(path) or not (storage_path(path) / RUN_CONFIG_FILE).exists():
        return None
    return build(TrainConfig, run_config(path))


def _sampling(args, run, family: str, official: bool):
    """The sampler: a run's evaluation sampling (``TrainConfig.eval_sampling_config``) or the command's
    defaults, with every sampling flag that was given replacing its field."""
    from gdsd_jax.config_io import build, to_dict
    from gdsd_jax.sampling import SamplingConfig

    flags = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
             "temperature": args.temperature, "remasking": args.remasking, "alg": args.alg,
             "ban_mask_token": args.ban_mask_token}
    given = {k: v for k, v in flags.items() if v is not None}
    if args.top_k is not None:
        given["top_k"] = args.top_k or None
    if run is not None:
        base = to_dict(run.eval_sampling_config())
    else:
        gen_length = args.gen_length or (OFFICIAL_GEN_LENGTH if official else 16)
        base = {"gen_length": gen_length, "steps": gen_length // 2 if official else gen_length,
                "block_length": OFFICIAL_BLOCK_LENGTH if official else gen_length, "temperature": 0.0,
                "remasking": "low_confidence", "top_k": eval_top_k(None, family)}
    return build(SamplingConfig, {**base, **given}, "sampling")


def run(args) -> int:
    import jax

    from gdsd_jax.checkpoint.params_io import storage_path
    from gdsd_jax.checkpoint.policy import find_tokenizer_dir
    from gdsd_jax.commands._common import require_existing
    from gdsd_jax.distributed.mesh import make_mesh, parse_mesh_spec
    from gdsd_jax.errors import UserError
    from gdsd_jax.loading import load_denoiser
    from gdsd_jax.tasks.base import get_task, task_class
    from gdsd_jax.tasks.prompts import prompt_token_ids
    from gdsd_jax.training.evaluate import evaluate, write_eval
    from gdsd_jax.training.task_adapter import make_adapter

    require_existing(args.checkpoint, "--checkpoint")
    rc = _run_config(args.checkpoint)
    task_name = args.task or (rc.task.name if rc is not None else None)
    if task_name is None:
        raise UserError(f"--task is needed: {args.checkpoint} is not a run directory (whose task would be the "
                        f"default)")
    kwargs = dict(rc.task.kwargs) if rc is not None and task_name == rc.task.name else {}
    for item in args.task_kwargs:
        path, value = parse_override(item)
        kwargs[".".join(path)] = value
    cls = task_class(task_name)
    fmt = args.format or (rc.task.format if rc is not None else None) or (
        "compact" if cls.supports_compact and args.tokenizer is None else "chat")
    split = args.split or (rc.eval.split if rc is not None else "test")
    protocol = args.protocol or kwargs.pop("protocol", None) or (
        "official" if fmt == "chat" and "official" in cls.protocols else "project")
    official = protocol == "official"
    if official and (fmt != "chat" or split != "test"):
        raise UserError(f"--protocol official evaluates chat prompts on the official test set; got "
                        f"--format {fmt} --split {split} (use --protocol project)")
    tok_dir = None
    if fmt == "chat":
        tok_dir = args.tokenizer or find_tokenizer_dir(args.checkpoint)
        if tok_dir is None:
            raise UserError(f"--format chat needs a tokenizer and {args.checkpoint} has none (no tokenizer.json "
                            f"or tokenizer_config.json there, nor a run's model.tokenizer); pass --tokenizer DIR")
    task = get_task(task_name, protocol=protocol, **kwargs)
    max_examples = args.max_examples or (rc.eval.max_examples if rc is not None else None)
    examples = list(task.examples(split))[:max_examples]

    mesh_spec = args.mesh or (rc.distributed.mesh if rc is not None else "data=1,fsdp=-1,tensor=1")
    mesh = make_mesh(**parse_mesh_spec(mesh_spec))
    model = load_denoiser(args.checkpoint, mesh=mesh, step=args.step)
    tokenizer = None
    if tok_dir is not None:
        from gdsd_jax.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tok_dir)
    prompt_length = args.prompt_length or (rc.task.prompt_length if rc is not None else None) or (
        17 if fmt == "compact" else max((len(prompt_token_ids(task, ex, tokenizer, split=split)) for ex in examples),
                                        default=1))
    truncate = rc.task.truncate if rc is not None else "error"
    # A run evaluates with the task's test-time prompts whatever split it scores (rl.run, build_eval_adapter).
    prompt_split = "test" if rc is not None else split
    adapter = make_adapter(task, fmt, prompt_length, model.config, tokenizer,
                           **({} if fmt == "compact" else {"split": prompt_split, "truncate": truncate}))
    scfg = _sampling(args, rc, model.config.family, official)
    batch_size = args.batch_size or (rc.eval.batch_size if rc is not None else 64)
    res = evaluate(model.params(), model.config, adapter, examples, scfg, mesh, batch_size=batch_size,
                   key=jax.random.key(args.seed), progress=True)
    out = storage_path(args.output) if args.output else storage_path(args.checkpoint) / "eval"
    if jax.process_index() == 0:
        write_eval(res, out)
        print(json.dumps(res.summary(), indent=2))
    return 0
