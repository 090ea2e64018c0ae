"""Evaluation reports the task's own metrics: ``Task.eval_metrics`` per completion, on the text its protocol
reads, and ``Task.aggregate_metrics`` over the whole set."""

import jax
import numpy as np

from gdsd_jax.data.tokenizer import ascii_tokenizer
from gdsd_jax.distributed.mesh import make_mesh
from gdsd_jax.models.config import tiny_llada
from gdsd_jax.models.denoiser import init_params
from gdsd_jax.sampling import SamplingConfig
from gdsd_jax.tasks.countdown import CountdownTask
from gdsd_jax.training.evaluate import evaluate
from gdsd_jax.training.task_adapter import ChatAdapter, make_adapter

EOS = 251


class RecordingCountdown(CountdownTask):
    """Short prompts; metrics that depend only on the example, aggregated by a rule no default would use."""

    def __init__(self, protocol: str):
        super().__init__(protocol=protocol)
        self.seen: list[str] = []

    def prompt_messages(self, example, *, split="train"):
        return [{"role": "user", "content": str(example["target"])}]

    def eval_metrics(self, completions, examples):
        self.seen.extend(completions)
        return {"accuracy": [float(ex["target"]) for ex in examples], "one": [1.0] * len(examples)}

    def aggregate_metrics(self, metrics):
        return {"accuracy": max(metrics["accuracy"]), "count": sum(metrics["one"])}


def test_evaluate_reports_the_tasks_aggregated_metrics():
    cfg = tiny_llada()
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = init_params(cfg, jax.random.key(0), mesh)
    task = RecordingCountdown("official")
    examples = task.examples("test")[:5]      # targets 23, 10, 24, ... (official file rows 0-4)
    adapter = make_adapter(task, "chat", 16, cfg, ascii_tokenizer(), split="test")
    scfg = SamplingConfig(gen_length=4, steps=2, block_length=4, temperature=0.0)
    res = evaluate(params, cfg, adapter, examples, scfg, mesh, batch_size=8)
    targets = [ex["target"] for ex in examples]
    assert res.metrics == {"accuracy": float(max(targets)), "count": 5.0} and res.accuracy == max(targets)
    assert res.summary()["protocol"] == "official" and res.summary()["count"] == 5.0
    assert [r["metrics"]["accuracy"] for r in res.records] == [float(t) for t in targets]
    # the official protocol reads every generated token, special tokens kept
    assert task.seen == [ascii_tokenizer().decode(r["completion_ids"]) for r in res.records]
    assert [r["completion"] for r in res.records] == task.seen


def test_chat_adapter_gives_the_protocols_text_to_eval_metrics():
    """Official: all tokens, EOS and what follows included; project: up to the first EOS, specials dropped."""
    tok = ascii_tokenizer()
    ids = np.asarray([[ord(c) for c in "<answer>1+2"] + [EOS, ord("9"), EOS]], np.int32)
    mask = np.asarray([[1] * 11 + [1, 0, 0]], np.int32)     # up to and including the first EOS
    ex = [{"numbers": [1, 2], "target": 3}]
    official = RecordingCountdown("official")
    ChatAdapter(official, tok, 16, split="test").eval_metrics(ids, mask, ex)
    project = RecordingCountdown("project")
    ChatAdapter(project, tok, 16, split="test").eval_metrics(ids, mask, ex)
    assert official.seen == ["<answer>1+2<|eot_id|>9<|eot_id|>"]
    assert project.seen == ["<answer>1+2"]
