"""The RL run of ``gdsd-jax train``: warm start, checkpoints and exact resume, the loop, evaluation before and after."""

from __future__ import annotations

import dataclasses
import json
import signal

import jax
from etils import epath
from tqdm.auto import tqdm

from gdsd_jax.allocator import active_allocator
from gdsd_jax.checkpoint.params_io import storage_path
from gdsd_jax.checkpoint.train_state import RunCheckpointer
from gdsd_jax.config_io import ConfigError, to_dict
from gdsd_jax.distributed import multihost
from gdsd_jax.rl.trainer import NonFiniteError, RLTrainer
from gdsd_jax.sft.run import warm_start
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.evaluate import EvalResult, evaluate, write_eval
from gdsd_jax.training.metrics import MetricsLogger, log
from gdsd_jax.training.setup import build_mesh, build_model, build_task_and_adapter, eval_examples, index_iterator

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
