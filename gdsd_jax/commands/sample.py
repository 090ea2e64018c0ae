"""``gdsd-jax sample``: generate completions for a few prompts with the LLaDA / Dream samplers.

Examples::

    gdsd-jax sample --checkpoint ckpt/ --tokenizer tok/ --prompt "What is 2+3?" --chat \\
        --gen-length 128 --steps 64 --block-length 32
    gdsd-jax sample --checkpoint ckpt/ --prompt-ids 5,17,9 --prompt-ids 4,4 --gen-length 16 --steps 16 \\
        --output samples.jsonl

Settings are validated before the model is loaded (errors name the setting). Prompts are left-padded to
the longest one and decoded in fixed-size batches (one compiled program for the whole run). Without a
tokenizer, only ``--prompt-ids`` prompts are accepted and completions are printed as ids.

``--output`` writes one JSON object per prompt: ``prompt_ids`` (without padding), ``completion_ids``
(up to and including the first EOS, or all ``--gen-length`` ids with ``--no-stop-at-eos``), and, with a
tokenizer, ``prompt`` and ``completion`` (the text before the first EOS, special tokens skipped).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gdsd_jax.commands._common import dtype_arg, require_existing
from gdsd_jax.errors import error_line

HELP = "generate completions with the LLaDA / Dream diffusion samplers"

def add_arguments(p: argparse.ArgumentParser) -> None:
    from gdsd_jax.sampling.config import ALGORITHMS, REMASKING, SAMPLERS

    p.add_argument("--checkpoint", required=True,
                   help="params checkpoint (ours), a Hugging Face model directory, or a run directory (its policy)")
    p.add_argument("--step", type=int, default=None, help="with a run directory: the saved step (default: the latest)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory (default: the checkpoint directory or its hf_files/ if they "
                        "hold tokenizer files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="a prompt (repeat for several)")
    src.add_argument("--prompt-file", default=None, metavar="F",
                     help="prompts, one per line; a .jsonl file holds objects with 'prompt' (text) or 'prompt_ids'")
    src.add_argument("--prompt-ids", action="append", default=None, metavar="5,17,9",
                     help="a prompt as comma-separated token ids (repeat for several)")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the tokenizer's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--gen-length", type=int, required=True, help="tokens to generate per prompt")
    p.add_argument("--steps", type=int, required=True, help="denoising steps")
    p.add_argument("--block-length", type=int, default=None, help="LLaDA block length (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--remasking", default="low_confidence", choices=REMASKING, help="LLaDA remasking")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="LLaDA classifier-free guidance scale")
    p.add_argument("--alg", default="entropy", choices=ALGORITHMS, help="Dream unmasking order")
    p.add_argument("--alg-temp", type=float, default=None, help="Dream: sample positions with this temperature")
    p.add_argument("--top-p", type=float, default=None, help="Dream nucleus filtering")
    p.add_argument("--top-k", type=int, default=None, help="Dream top-k filtering")
    p.add_argument("--eps", type=float, default=1e-3, help="Dream final timestep")
    p.add_argument("--sampler", default="auto", choices=SAMPLERS, help="algorithm (default: by model family)")
    p.add_argument("--logits-eos-inf", action="store_true", help="LLaDA: never generate EOS")
    p.add_argument("--ban-mask-token", action="store_true",
                   help="never sample the mask token (upstream samples it like any token)")
    p.add_argument("--no-stop-at-eos", action="store_true", help="keep tokens after the first EOS in the output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per compiled batch")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=4,tensor=1 (default: one device)")
    p.add_argument("--dtype", type=dtype_arg(("bf16", "fp32")), default=None,
                   help="parameter and compute dtype: bf16 or fp32 (bfloat16, float32 also accepted; default: the "
                        "checkpoint's)")
    p.add_argument("--compute-dtype", type=dtype_arg(("bf16", "fp32")), default=None,
                   help="activation dtype (bf16 or fp32), overriding what --dtype implies (fp32 is faster on CPU)")
    p.add_argument("--output", default=None, metavar="F.jsonl", help="write one JSON object per prompt")


def _sampling_config(args):
    from gdsd_jax.sampling import SamplingConfig

    return SamplingConfig(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale, alg=args.alg,
        alg_temp=args.alg_temp, top_p=args.top_p, top_k=args.top_k, eps=args.eps, sampler=args.sampler,
        logits_eos_inf=args.logits_eos_inf, ban_mask_token=args.ban_mask_token, stop_at_eos=not args.no_stop_at_eos)


def parse_ids(text: str) -> list[int]:
    """``"5,17,9"`` -> ``[5, 17, 9]`` with a clear error otherwise."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected comma-separated integers such as 5,17,9") from None
    if not ids:
        raise ValueError(f"--prompt-ids {text!r} is empty")
    return ids


def read_prompts(args) -> list[dict]:
    """Prompts as dicts with ``text`` or ``ids``."""
    if args.prompt is not None:
        return [{"text": t} for t in args.prompt]
    if args.prompt_ids is not None:
        return [{"ids": parse_ids(t)} for t in args.prompt_ids]
    path = Path(args.prompt_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {str(path)!r} does not exist")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt_ids"), list):
                out.append({"ids": [int(i) for i in obj["prompt_ids"]]})
            elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                out.append({"text": obj["prompt"]})
            else:
                raise ValueError(f"{path}:{n}: expected an object with 'prompt' (text) or 'prompt_ids' (list)")
        else:
            out.append({"text": line})
    if not out:
        raise ValueError(f"--prompt-file {str(path)!r} holds no prompt")
    return out


def _find_tokenizer_dir(args) -> str | None:
    if args.tokenizer:
        return args.tokenizer
    from gdsd_jax.checkpoint.policy import find_tokenizer_dir

    return find_tokenizer_dir(args.checkpoint)


def load_model(path: str, mesh, dtype, compute_dtype, step: int | None = None):
    """``(params, DenoiserConfig)`` from our params checkpoint, a Hugging Face directory or a run directory."""
    from gdsd_jax.loading import load_denoiser

    model = load_denoiser(path, mesh=mesh, dtype=dtype, compute_dtype=compute_dtype, step=step, progress=True)
    return model.params(), model.config


def encode_prompts(prompts: list[dict], tokenizer, chat: bool, system: str | None) -> list[list[int]]:
    out = []
    for p in prompts:
        if "ids" in p:
            out.append(list(p["ids"]))
            continue
        if tokenizer is None:
            raise ValueError("text prompts need a tokenizer: pass --tokenizer DIR, or give --prompt-ids")
        text = p["text"]
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(text)
        if not ids:
            raise ValueError(f"prompt {p['text']!r} encodes to no tokens")
        out.append(ids)
    return out


def left_pad(rows: list[list[int]], pad_id: int):
    """int32 ids [N, Lp] and mask [N, Lp] with every row right-aligned."""
    import numpy as np

    lp = max(len(r) for r in rows)
    ids = np.full((len(rows), lp), pad_id, np.int32)
    mask = np.zeros((len(rows), lp), np.int32)
    for i, r in enumerate(rows):
        ids[i, lp - len(r):] = r
        mask[i, lp - len(r):] = 1
    return ids, mask


def run(args) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(error_line("sample", e), file=sys.stderr)
        return 1


def _run(args) -> int:
    scfg = _sampling_config(args)                 # bad settings fail here, before anything is loaded
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    prompts = read_prompts(args)
    if args.chat and not any("text" in p for p in prompts):
        raise ValueError("--chat applies to text prompts (--prompt / --prompt-file), not to --prompt-ids")

    import jax
    import numpy as np
    from tqdm import tqdm

    from gdsd_jax.distributed.mesh import batch_sharding, make_mesh, parse_mesh_spec
    from gdsd_jax.sampling import check_inputs, generate

    require_existing(args.checkpoint, "--checkpoint")
    mesh = make_mesh(**parse_mesh_spec(args.mesh)) if args.mesh else None
    params, model_cfg = load_model(args.checkpoint, mesh, args.dtype, args.compute_dtype, args.step)
    tok_dir = _find_tokenizer_dir(args)
    tokenizer = None
    if tok_dir is not None:
        from gdsd_jax.data.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tok_dir, mask_token_id=model_cfg.mask_token_id)
    rows = encode_prompts(prompts, tokenizer, args.chat, args.system)
    for i, r in enumerate(rows):
        bad = [t for t in r if not 0 <= t < model_cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} outside the model's vocabulary [0, {model_cfg.vocab_size})")
    pad_id = tokenizer.pad_id if tokenizer is not None else model_cfg.pad_token_id
    ids, mask = left_pad(rows, pad_id)
    bsz = min(args.batch_size, len(rows))
    if mesh is not None:                          # the batch must split evenly over the data axes
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        bsz = -(-bsz // ways) * ways
    check_inputs(model_cfg, (bsz, ids.shape[1]), (bsz, ids.shape[1]), scfg)   # context length, block layout

    gen = jax.jit(lambda p, i, m, k: generate(p, model_cfg, i, m, k, scfg, mesh=mesh))
    key = jax.random.key(args.seed)
    seqs, cmasks = [], []
    t0, first_done = time.perf_counter(), None
    for start in tqdm(range(0, len(rows), bsz), desc="sample", unit="batch", file=sys.stderr,
                      disable=len(rows) <= bsz):
        bi, bm = ids[start:start + bsz], mask[start:start + bsz]
        real = len(bi)
        if real < bsz:                            # pad the last batch with copies; dropped below
            bi = np.concatenate([bi, np.repeat(bi[-1:], bsz - real, 0)])
            bm = np.concatenate([bm, np.repeat(bm[-1:], bsz - real, 0)])
        if mesh is not None:
            bi, bm = (jax.device_put(a, batch_sharding(mesh, 2)) for a in (bi, bm))
        out = gen(params, bi, bm, jax.random.fold_in(key, start))
        seqs.append(np.asarray(out.sequences)[:real])
        cmasks.append(np.asarray(out.completion_mask)[:real])
        first_done = first_done or time.perf_counter()
    elapsed = time.perf_counter() - t0
    seqs, cmasks = np.concatenate(seqs), np.concatenate(cmasks)
    lp = ids.shape[1]
    print(f"[sample] {len(rows)} prompt(s) x {scfg.gen_length} tokens, {scfg.steps} steps, sampler "
          f"{scfg.resolve_sampler(model_cfg.family)}: {elapsed:.2f}s including compilation "
          f"(first batch {first_done - t0:.2f}s)", file=sys.stderr)

    records = []
    for i, prompt in enumerate(prompts):
        comp = seqs[i, lp:]
        n = int(cmasks[i].sum())
        comp_ids = [int(t) for t in comp[:n]]
        rec = {"prompt_ids": rows[i], "completion_ids": comp_ids}
        if tokenizer is not None:
            text_ids = [t for t in comp_ids if t != model_cfg.eos_token_id] if not args.no_stop_at_eos else comp_ids
            rec["prompt"] = prompt.get("text", tokenizer.decode(rows[i]))
            rec["completion"] = tokenizer.decode(text_ids, skip_special_tokens=True)
        records.append(rec)
        print(f"=== prompt {i} ===")
        print(rec["completion"] if "completion" in rec else " ".join(str(t) for t in comp_ids))
    if args.output:
        out_path = Path(args.output)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with out_path.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"[sample] wrote {len(records)} record(s) to {out_path}", file=sys.stderr)
    return 0
