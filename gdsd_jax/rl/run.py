"""Run orchestration shared by ``gdsd-jax train | sft | eval``: model, task, data, checkpoints, loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from tqdm.auto import tqdm

from gdsd_jax.allocator import active_allocator
from gdsd_jax.checkpoint.params_io import storage_path
from gdsd_jax.checkpoint.train_state import RunCheckpointer
from gdsd_jax.config_io import ConfigError, to_dict
from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import batch_sharding, make_mesh, parse_mesh_spec
from gdsd_jax.models.config import DenoiserConfig, preset
from gdsd_jax.models.denoiser import init_params
from gdsd_jax.rl.config import TrainConfig
from gdsd_jax.rl.evaluate import EvalResult, evaluate
from gdsd_jax.rl.metrics import MetricsLogger
from gdsd_jax.rl.task_adapter import make_adapter
from gdsd_jax.rl.trainer import NonFiniteError, RLTrainer, merged_policy_params


def log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stdout)


# ---- building blocks ----------------------------------------------------------------------------

def build_mesh(cfg: TrainConfig):
    return make_mesh(**parse_mesh_spec(cfg.distributed.mesh))


def build_model(cfg: TrainConfig, mesh) -> tuple[DenoiserConfig, dict]:
    """Model config and parameters: from ``model.checkpoint`` (HF dir or ours) or a random preset."""
    overrides = dict(cfg.model.overrides)
    if cfg.model.checkpoint:
        from gdsd_jax.loading import load_denoiser

        model = load_denoiser(cfg.model.checkpoint, mesh=mesh)
        model_cfg = model.config.replace(**overrides) if overrides else model.config
        return model_cfg, model.params()
    try:
        model_cfg = preset(cfg.model.preset, **overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    return model_cfg, init_params(model_cfg, jax.random.key(cfg.rl.seed + 17), mesh)


def build_task_and_adapter(cfg: TrainConfig, model_cfg: DenoiserConfig, split: str = "train"):
    from gdsd_jax.tasks.base import get_task

    task = get_task(cfg.task.name, **cfg.task.kwargs)
    tokenizer = None
    if cfg.task.format == "chat":
        if not cfg.model.tokenizer and not cfg.model.checkpoint:
            raise ConfigError("task.format=chat needs model.tokenizer (a local tokenizer directory)")
        from gdsd_jax.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
    adapter = make_adapter(task, cfg.task.format, cfg.task.prompt_length, model_cfg, tokenizer,
                           **({} if cfg.task.format == "compact" else
                              {"split": split, "truncate": cfg.task.truncate,
                               "reward_weights": cfg.rl.reward_weights}))
    return task, adapter, tokenizer


def index_iterator(num_examples: int, batch_size: int, seed: int):
    """Grain pipeline over example indices: seeded shuffle, repeat, global batch, this process's block.

    Every process walks the same (cheap) stream of index batches and keeps its contiguous block, then
    loads only those examples. Sharding after batching, rather than ``[process_index::process_count]``
    before it, makes the global batch independent of the number of processes: a run on 2 hosts sees
    exactly the prompts of a run on 1 host, and a checkpoint can move between topologies. The iterator
    state is saved in the checkpoint's metadata, so a resume continues with exactly the next batch.
    """
    if num_examples == 0:
        raise ValueError("the training set is empty")
    block = multihost.process_slice(batch_size)
    ds = (grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()
          .batch(batch_size, drop_remainder=True).map(lambda b: np.asarray(b)[block]))
    return iter(ds.to_iter_dataset())


def eval_examples(task, cfg: TrainConfig) -> list[dict]:
    ex = list(task.examples(cfg.eval.split))
    if cfg.eval.max_examples:
        ex = ex[:cfg.eval.max_examples]
    if not ex:
        raise ValueError(f"task {task.name!r} has no examples in split {cfg.eval.split!r}")
    return ex


# ---- SFT ----------------------------------------------------------------------------------------

def run_sft(cfg: TrainConfig, *, mesh=None, model_cfg=None, params=None, output_dir: str | None = None,
            progress: bool = True) -> tuple[DenoiserConfig, dict, list[dict]]:
    """Masked-diffusion SFT on the task's training solutions; returns (model_cfg, params, history).

    Evaluates greedily every ``sft.eval_every`` steps and, with ``sft.stop_at_reward``, stops at the
    first evaluation reaching it (the deliberately imperfect warm start of the tiny default).
    """
    from gdsd_jax.sft.trainer import make_sft_step

    mesh = mesh or build_mesh(cfg)
    if model_cfg is None:
        model_cfg, params = build_model(cfg, mesh)
    task, adapter, _ = build_task_and_adapter(cfg, model_cfg)
    if not hasattr(adapter, "targets"):
        raise ConfigError("sft needs a task format with targets (task.format=compact)")
    train = list(task.examples("train"))
    test = eval_examples(task, cfg)
    scfg = cfg.eval_sampling_config()
    s = cfg.sft
    tx = optax.chain(optax.clip_by_global_norm(s.max_grad_norm),
                     optax.adamw(s.lr, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay))
    opt_state = jax.jit(tx.init)(params)
    step_fn = make_sft_step(model_cfg, tx, s.min_t, mesh)
    it = index_iterator(len(train), s.batch_size, s.seed)
    key = jax.random.key(s.seed)
    history: list[dict] = []
    logger = MetricsLogger(output_dir, tensorboard=False, filename="sft_metrics.jsonl") if output_dir else None
    sh = batch_sharding(mesh, 2)

    def do_eval(step):
        res = evaluate(params, model_cfg, adapter, test, scfg, mesh, batch_size=cfg.eval.batch_size)
        rec = {"step": step, "test_reward": res.mean_reward, "test_solved": res.accuracy}
        history.append(rec)
        if logger:
            logger.log(step, {"test_reward": res.mean_reward, "test_solved": res.accuracy})
        return res

    bar = tqdm(range(1, s.steps + 1), desc="sft", disable=not progress or jax.process_index() != 0)
    t0 = time.perf_counter()
    for step in bar:
        examples = [train[i] for i in next(it)]           # this process's block of the global batch
        pids, pmask = adapter.encode(examples)
        targets = adapter.targets(examples, scfg.gen_length)
        params, opt_state, m = step_fn(params, opt_state, multihost.global_batch(pids, sh),
                                       multihost.global_batch(pmask, sh), multihost.global_batch(targets, sh),
                                       jax.random.fold_in(key, step))
        if s.eval_every and step % s.eval_every == 0:
            res = do_eval(step)
            bar.set_postfix(loss=f"{float(m['loss']):.3f}", test=f"{res.mean_reward:.3f}")
            if s.stop_at_reward is not None and res.mean_reward >= s.stop_at_reward:
                log(f"sft: step {step}: test reward {res.mean_reward:.3f} >= {s.stop_at_reward} "
                    f"({time.perf_counter() - t0:.1f}s); stopping")
                break
    bar.close()
    if logger:
        logger.close()
    return model_cfg, params, history


def _warm_start_key(cfg: TrainConfig, model_cfg: DenoiserConfig) -> str:
    blob = json.dumps({"model": model_cfg.to_dict(), "task": to_dict(cfg.task), "sft": to_dict(cfg.sft),
                       "eval_sampling": cfg.eval.sampling, "sampling": cfg.sampling, "seed": cfg.rl.seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(cfg: TrainConfig, mesh, model_cfg, params, *, progress: bool = True):
    """SFT warm start, cached on disk by a hash of everything that determines it; ``progress`` shows the
    SFT progress bar."""
    from gdsd_jax.checkpoint.params_io import restore_params, save_params

    cache = Path(cfg.warm_start.cache_dir) / f"{cfg.task.name}-{_warm_start_key(cfg, model_cfg)}"
    if (cache / "params").exists():
        log(f"warm start: reusing cached SFT checkpoint {cache}")
        params, model_cfg = restore_params(cache / "params", mesh=mesh)
        return model_cfg, params
    log("warm start: running SFT (cached afterwards)")
    model_cfg, params, history = run_sft(cfg, mesh=mesh, model_cfg=model_cfg, params=params, progress=progress)
    if jax.process_index() == 0:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    save_params(cache / "params", params, model_cfg)
    return model_cfg, params


# ---- RL -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class TrainResult:
    before: EvalResult | None
    after: EvalResult | None
    steps: int
    output_dir: epath.Path


class _Preemption:
    """SIGTERM sets a flag; the loop checkpoints and exits after the current step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_train(cfg: TrainConfig, *, resume: bool = False, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
    """The whole RL run. ``stop_after`` ends the loop early after that many steps of this process (tests)."""
    cfg.validate()
    multihost.initialize(cfg.distributed.coordinator_address, cfg.distributed.num_processes,
                         cfg.distributed.process_id)
    out = storage_path(cfg.output_dir)     # local or gs://; a bucket without its packages fails here
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    mesh = build_mesh(cfg)
    log(f"mesh {dict(mesh.shape)} on {jax.devices()[0].platform}; host allocator: {active_allocator()}")
    ckpt = RunCheckpointer(out / "checkpoints", keep=cfg.checkpoint.keep, keep_best=cfg.checkpoint.keep_best,
                           async_save=cfg.checkpoint.async_save)
    resume_step = ckpt.latest_step() if resume else None
    if resume and resume_step is not None:
        saved = ckpt.read_meta(resume_step)["config"]
        _check_resume_config(saved, to_dict(cfg))
    elif not resume and ckpt.latest_step() is not None:
        raise FileExistsError(f"{out / 'checkpoints'} already holds checkpoints; pass --resume to continue "
                              f"or choose another --output-dir")

    model_cfg, params = build_model(cfg, mesh)
    if cfg.warm_start.mode == "sft" and not cfg.model.checkpoint:
        model_cfg, params = warm_start(cfg, mesh, model_cfg, params, progress=progress)
    task, adapter, tokenizer = build_task_and_adapter(cfg, model_cfg)
    trainer = RLTrainer(cfg, model_cfg, params, mesh, adapter, task, tokenizer=tokenizer)
    state, frozen = trainer.init_state()
    train = list(task.examples("train"))
    data_it = index_iterator(len(train), cfg.rollout_prompts, cfg.rl.seed)
    test = eval_examples(task, cfg)
    escfg = trainer.eval_sampling_cfg

    def run_eval(st) -> EvalResult:
        p, lora = trainer.parts.policy(st["trainable"], frozen)
        return evaluate(p, model_cfg, adapter, test, escfg, mesh, lora=lora, batch_size=cfg.eval.batch_size)

    meta = {"config": to_dict(cfg), "model_config": model_cfg.to_dict(), "nonfinite_total": 0, "before": None,
            "best_eval": None}
    if resume_step is not None:
        state, meta = ckpt.restore(resume_step, trainer.abstract_state(state))
        # Every process walks the same global index stream, so one iterator state serves any topology.
        data_it.set_state(meta["data_state"])
        log(f"resumed from step {resume_step}")
    logger = MetricsLogger(out, tensorboard=cfg.tensorboard, resume_step=resume_step)
    if jax.process_index() == 0:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    before = None
    if meta.get("before") is None:
        before = run_eval(state)
        meta["before"] = before.mean_reward
        logger.log(0, {"test_reward": before.mean_reward, "test_solved": before.accuracy})
        log(f"step 0: test reward {before.mean_reward:.3f} (solved {before.accuracy:.3f})")

    start = int(state["step"])
    total = cfg.rl.total_steps
    nonfinite_run = 0
    after = None
    done_here = 0
    with _Preemption() as pre:
        bar = tqdm(range(start, total), initial=start, total=total, desc="gdsd",
                   disable=not progress or jax.process_index() != 0)
        for _ in bar:
            examples = [train[i] for i in next(data_it)]    # this process's prompts only
            state, m = trainer.rl_step(state, frozen, examples)
            step = int(state["step"])
            meta["nonfinite_total"] = meta.get("nonfinite_total", 0) + m["nonfinite_updates"]
            nonfinite_run = nonfinite_run + 1 if m["nonfinite_updates"] else 0
            eval_reward = None
            if cfg.eval.every and step % cfg.eval.every == 0 and step != total:
                res = run_eval(state)
                m.update(test_reward=res.mean_reward, test_solved=res.accuracy)
                eval_reward = res.mean_reward
            logger.log(step, m)
            bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.2e}",
                            **({"test": f"{eval_reward:.3f}"} if eval_reward is not None else {}))
            if nonfinite_run >= cfg.rl.max_nonfinite_in_a_row:
                ckpt.close()
                logger.close()
                raise NonFiniteError(f"{nonfinite_run} non-finite updates in a row at step {step}; stopping. "
                                     f"The last checkpoint in {out / 'checkpoints'} is intact.")
            last = step == total
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or pre.requested:
                meta["data_state"] = data_it.get_state()
                ckpt.save(step, state, meta, eval_reward=eval_reward)
            done_here += 1
            if pre.requested:
                log(f"SIGTERM: checkpoint written at step {step}; exiting")
                ckpt.close()
                logger.close()
                raise SystemExit(143)
            if stop_after is not None and done_here >= stop_after:
                break
        bar.close()
    if int(state["step"]) == total:
        after = run_eval(state)
        logger.log(total, {"test_reward": after.mean_reward, "test_solved": after.accuracy})
        if jax.process_index() == 0:
            from gdsd_jax.rl.evaluate import write_eval
            write_eval(after, out, "eval_final")
    ckpt.close()
    logger.close()
    if after is not None:
        b = meta["before"]
        _print_summary(b, after.mean_reward, out, cfg.objective_config().name)
    return TrainResult(before, after, int(state["step"]), out)


def _check_resume_config(saved: dict, current: dict, prefix: str = "") -> None:
    """A resume must use the same model, LoRA shape, task and batch shapes; name the first field that differs."""
    critical = ("model", "lora", "task", "objective", "rl.num_generations", "rl.prompts_per_step",
                "rl.rollout_prompts_per_step", "rl.micro_batch_size", "sampling")
    for key in critical:
        parts = key.split(".")
        a, b = saved, current
        for p in parts:
            a = a.get(p) if isinstance(a, dict) else None
            b = b.get(p) if isinstance(b, dict) else None
        if a != b:
            detail = ""
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = f" (field(s) {', '.join(key + '.' + k for k in diff)})"
            raise ConfigError(f"--resume: config mismatch in {key}{detail}: checkpoint has {a!r}, now {b!r}")


def _print_summary(before: float, after: float, out: epath.Path, method: str = "GDSD") -> None:
    if jax.process_index() != 0:
        return
    lines = ["", "| greedy test reward | value |", "|---|---|", f"| before (warm start) | {before:.3f} |",
             f"| after {method} | {after:.3f} |", f"| change | {after - before:+.3f} |", "",
             f"run directory: {out}", f"test_reward: {before:.3f} -> {after:.3f}"]
    print("\n".join(lines), flush=True)
