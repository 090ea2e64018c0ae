"""``gdsd-jax eval``: decode a task's test set and write per-example JSONL plus a summary."""

from __future__ import annotations

import json

from gdsd_jax.config_io import parse_override

HELP = "evaluate a checkpoint on a task's test set"


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="params checkpoint (ours), an HF directory, or a run directory (its latest state)")
    p.add_argument("--task", required=True, help="task name (sudoku, countdown, gsm8k, math, code)")
    p.add_argument("--split", default="test")
    p.add_argument("--format", default=None, choices=["compact", "chat"],
                   help="prompt format (default: compact for the tiny tasks with a compact format, else chat)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (chat format)")
    p.add_argument("--prompt-length", type=int, default=None)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: gen-length)")
    p.add_argument("--block-length", type=int, default=None, help="default: gen-length")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--remasking", default="low_confidence")
    p.add_argument("--alg", default=None, help="Dream unmasking order (default: entropy)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output directory for eval.jsonl and eval_summary.json")
    p.add_argument("task_kwargs", nargs="*", metavar="KEY=VALUE", help="task constructor arguments (e.g. path=data.jsonl)")


def run(args) -> int:
    import jax

    from gdsd_jax.distributed.mesh import make_mesh, parse_mesh_spec
    from gdsd_jax.loading import load_denoiser
    from gdsd_jax.sampling import SamplingConfig
    from gdsd_jax.tasks.base import get_task
    from gdsd_jax.training.evaluate import evaluate, write_eval
    from gdsd_jax.training.task_adapter import make_adapter

    mesh = make_mesh(**parse_mesh_spec(args.mesh))
    model = load_denoiser(args.checkpoint, mesh=mesh)
    kwargs = {}
    for item in args.task_kwargs:
        path, value = parse_override(item)
        kwargs[".".join(path)] = value
    task = get_task(args.task, **kwargs)
    fmt = args.format or ("compact" if getattr(task, "supports_compact", False) and args.tokenizer is None else "chat")
    tokenizer = None
    if fmt == "chat":
        from gdsd_jax.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(args.tokenizer or args.checkpoint)
    prompt_length = args.prompt_length or (17 if fmt == "compact" else 256)
    adapter = make_adapter(task, fmt, prompt_length, model.config, tokenizer,
                           **({} if fmt == "compact" else {"split": args.split}))
    sampler = {"gen_length": args.gen_length, "steps": args.steps or args.gen_length,
               "block_length": args.block_length or args.gen_length, "temperature": args.temperature,
               "remasking": args.remasking}
    if args.alg:
        sampler["alg"] = args.alg
    scfg = SamplingConfig(**sampler)
    examples = list(task.examples(args.split))[: args.max_examples]
    res = evaluate(model.params(), model.config, adapter, examples, scfg, mesh, batch_size=args.batch_size,
                   key=jax.random.key(args.seed), progress=True)
    from gdsd_jax.checkpoint.params_io import storage_path

    out = storage_path(args.output) if args.output else storage_path(args.checkpoint) / "eval"
    if jax.process_index() == 0:
        write_eval(res, out)
        print(json.dumps(res.summary(), indent=2))
    return 0
