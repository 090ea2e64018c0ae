"""``gdsd-jax eval``: decode a task's test set and write per-example JSONL plus a summary."""

from __future__ import annotations

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
                   help="params checkpoint (ours), an HF directory, or a run directory (its trained policy)")
    p.add_argument("--step", type=int, default=None, help="with a run directory: the saved step (default: the latest)")
    p.add_argument("--task", required=True, help="task name (sudoku, countdown, gsm8k, math, code)")
    p.add_argument("--protocol", default=None, choices=list(PROTOCOLS),
                   help="evaluation protocol (docs/tasks.md): 'official' = the official GDSD test files, prompts, "
                        "parser, aggregation and generation settings (sudoku, countdown); 'project' = the "
                        "project's own test sets and parsers (default: official for chat prompts where the "
                        "task has it, else project)")
    p.add_argument("--split", default="test")
    p.add_argument("--format", default=None, choices=["compact", "chat"],
                   help="prompt format (default: compact for the tiny tasks with a compact format, else chat)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (chat format)")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="default: 17 (compact), else the longest prompt of the evaluated examples")
    p.add_argument("--gen-length", type=int, default=None, help="default: 128 (official protocol), else 16")
    p.add_argument("--steps", type=int, default=None,
                   help="diffusion steps (default: gen-length // 2 (official protocol), else gen-length)")
    p.add_argument("--block-length", type=int, default=None,
                   help="LLaDA block length (default: 32 (official protocol), else gen-length)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", default="low_confidence")
    p.add_argument("--alg", default=None, help="Dream unmasking order (default: entropy)")
    p.add_argument("--top-k", type=int, default=None,
                   help="Dream top-k filtering (default for Dream models: the official evaluations' effective "
                        "top-k, see docs/sampling.md; 0 disables it)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output directory for eval.jsonl and eval_summary.json")
    p.add_argument("task_kwargs", nargs="*", metavar="KEY=VALUE",
                   help="task arguments: test_file=PATH (JSONL or Parquet; gsm8k, math and code have no bundled "
                        "data), train_file=PATH, variant=xml|plain (gsm8k, math), seed=N (sudoku, countdown)")


def eval_top_k(requested: int | None, family: str) -> int | None:
    """``--top-k`` (0: off); unset, Dream models get the official evaluations' effective top-k."""
    from gdsd_jax.sampling import DREAM_OFFICIAL_TOP_K

    if requested is None:
        return DREAM_OFFICIAL_TOP_K if family == "dream" else None
    return requested or None


def run(args) -> int:
    import jax

    from gdsd_jax.distributed.mesh import make_mesh, parse_mesh_spec
    from gdsd_jax.loading import load_denoiser
    from gdsd_jax.sampling import SamplingConfig
    from gdsd_jax.tasks.base import get_task, task_class
    from gdsd_jax.tasks.prompts import prompt_token_ids
    from gdsd_jax.training.evaluate import evaluate, write_eval
    from gdsd_jax.training.task_adapter import make_adapter

    mesh = make_mesh(**parse_mesh_spec(args.mesh))
    model = load_denoiser(args.checkpoint, mesh=mesh, step=args.step)
    kwargs = {}
    for item in args.task_kwargs:
        path, value = parse_override(item)
        kwargs[".".join(path)] = value
    cls = task_class(args.task)
    fmt = args.format or ("compact" if cls.supports_compact and args.tokenizer is None else "chat")
    protocol = args.protocol or kwargs.pop("protocol", None) or (
        "official" if fmt == "chat" and "official" in cls.protocols else "project")
    task = get_task(args.task, protocol=protocol, **kwargs)
    official = protocol == "official"
    if official and (fmt != "chat" or args.split != "test"):
        raise SystemExit(f"--protocol official evaluates chat prompts on the official test set; got "
                         f"--format {fmt} --split {args.split} (use --protocol project)")
    examples = list(task.examples(args.split))[: args.max_examples]
    tokenizer = None
    if fmt == "chat":
        from gdsd_jax.checkpoint.policy import tokenizer_source
        from gdsd_jax.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_source(args.checkpoint))
    prompt_length = args.prompt_length or (17 if fmt == "compact" else max(
        (len(prompt_token_ids(task, ex, tokenizer, split=args.split)) for ex in examples), default=1))
    adapter = make_adapter(task, fmt, prompt_length, model.config, tokenizer,
                           **({} if fmt == "compact" else {"split": args.split, "truncate": "error"}))
    gen_length = args.gen_length or (OFFICIAL_GEN_LENGTH if official else 16)
    sampler = {"gen_length": gen_length, "steps": args.steps or (gen_length // 2 if official else gen_length),
               "block_length": args.block_length or (OFFICIAL_BLOCK_LENGTH if official else gen_length),
               "temperature": args.temperature, "remasking": args.remasking,
               "top_k": eval_top_k(args.top_k, model.config.family)}
    if args.alg:
        sampler["alg"] = args.alg
    scfg = SamplingConfig(**sampler)
    res = evaluate(model.params(), model.config, adapter, examples, scfg, mesh, batch_size=args.batch_size,
                   key=jax.random.key(args.seed), progress=True)
    from gdsd_jax.checkpoint.params_io import storage_path

    out = storage_path(args.output) if args.output else storage_path(args.checkpoint) / "eval"
    if jax.process_index() == 0:
        write_eval(res, out)
        print(json.dumps(res.summary(), indent=2))
    return 0
