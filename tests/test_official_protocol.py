"""The official evaluation protocol of Sudoku and Countdown: shipped files, item set, prompts, parsers,
aggregation, and training data disjoint from the test set in use.

Expected values are written by hand from the official evaluation's description (GDSD ``eval/``,
``eval/parse_and_get_acc.py``): the file and prompt hashes, the scored Sudoku rows, and the worked parser
examples (puzzle ``4320004330100004``, solution ``4321124334122134``; Countdown ``[30, 100, 93]`` -> 23).
"""

import hashlib
import json
from pathlib import Path

import pytest

from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.tasks import countdown as C
from gdsd_jax.tasks import get_task
from gdsd_jax.tasks import sudoku as S
from gdsd_jax.tasks.files import official_data_path
from gdsd_jax.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


# ---- the shipped files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, size, digest", [
    ("4x4_test_sudoku.csv", 17517, "419655fdc297ba5c607b9decb793b2ab0986ff1b42a0701182fb6a0a1ce47765"),
    ("countdown_cd3_test.jsonl", 9892, "a1c7c2756ca8794ee3776a4ede98a52dc654aac019860afc6dfa2e703225eab6"),
    ("LICENSE", 11558, "1eb85fc97224598dad1852b5d6483bbcf0aa8608790dcc657a5a2a761ae9c8c6"),
])
def test_shipped_files_are_the_official_bytes(name, size, digest):
    data = official_data_path(name).read_bytes()
    assert (len(data), sha256(data)) == (size, digest)
    assert "Apache" in official_data_path("NOTICE.md").read_text()


# The 256 rows the official evaluation scores, in its order (np.random.seed(42); choice(500, 256)).
OFFICIAL_SUDOKU_ROWS = [int(x) for x in """
361,73,374,155,104,394,377,124,68,450,9,194,406,84,371,388,495,30,316,408,490,491,280,356,76,461,497,211,101,334,
475,336,440,173,2,333,409,70,209,63,384,93,485,185,33,77,0,11,415,22,72,182,131,410,193,55,148,18,204,78,494,262,
323,483,79,39,451,46,238,391,352,341,277,290,317,304,268,69,455,465,154,82,477,172,321,90,180,414,312,278,381,472,
362,324,431,347,86,75,438,15,249,433,19,322,332,56,301,229,331,132,137,423,335,25,464,281,247,237,117,42,220,176,
320,153,231,227,417,203,126,329,31,113,470,271,140,57,192,24,17,265,66,208,479,94,253,266,23,222,261,426,5,116,45,
16,462,357,3,218,405,60,110,318,428,29,437,471,26,7,453,108,37,157,489,118,114,175,373,181,144,369,390,195,404,275,
454,141,365,67,210,168,493,375,400,272,109,248,145,92,152,367,467,83,245,165,163,199,228,74,478,358,250,119,310,
299,255,354,399,225,353,234,382,274,36,196,139,364,244,439,286,59,111,89,436,6,360,346,338,158,150,177,393,184,
449,10,380,103,81,38,314,167,469,296,474,198,297,416""".replace("\n", "").split(",")]


def test_official_item_sets():
    sudoku = get_task("sudoku", protocol="official").examples("test")
    assert [ex["row"] for ex in sudoku] == OFFICIAL_SUDOKU_ROWS
    assert sudoku[0] == {"puzzle": "4320004330100004", "solution": "4321124334122134", "num_blanks": 8, "row": 361}
    countdown = get_task("countdown", protocol="official").examples("test")
    assert len(countdown) == 256 and countdown[0] == {"numbers": [30, 100, 93], "target": 23, "row": 0}
    assert countdown[1] == {"numbers": [83, 18, 75], "target": 10, "row": 1}


def test_official_countdown_file_errors_name_the_row(tmp_path):
    bad = tmp_path / "cd.jsonl"
    bad.write_text('{"input": "1,2,3", "output": "6"}\n{"input": "1,x,3", "output": "6"}\n')
    with pytest.raises(ValueError, match=r"row 2, column 'input'.*comma-separated"):
        C.load_official_test(bad)


# ---- prompts -------------------------------------------------------------------------------------

def test_prompt_constants_are_byte_exact():
    assert (len(S.EVAL_SYSTEM_PROMPT), sha256(S.EVAL_SYSTEM_PROMPT)) == (
        904, "a6198f5d80263b2927b1053b19892a04bf4dcb24c4c9ba1f3ca7995dd8d2b9e4")
    assert (len(S.SYSTEM_PROMPT), sha256(S.SYSTEM_PROMPT)) == (
        534, "c0add8a9b2f94fd4338f07de002359289f896800a97f218aba28b0c7671546be")
    task = get_task("countdown", protocol="official")
    content = task.prompt_messages(task.examples("test")[0], split="test")[0]["content"]
    assert sha256(content) == "bc134344e840aa8c1a4ab236077531165a26ba0e49b5525d3cba35b4c7110191"


def _llada(content: str) -> str:   # LLaDA-8B-Instruct's chat template for one user turn (trims the content)
    return ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + content.strip()
            + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def _dream(content: str) -> str:   # Dream's (Qwen2.5) template: the default system turn, content untrimmed
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + content
            + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("task_name, template, chars, digest", [
    ("sudoku", _llada, 1081, "fcdaa37255800bde30efb1be642e08e8e7b7663e7878cc0abb65606c0cf497e0"),
    ("countdown", _llada, 690, "6667ba04eed1acb4e662a9cb2812d7a9d3dadab4f2114ec0979bcaa9924f9e8d"),
    ("sudoku", _dream, 1077, "9b5869309c84f4c657d96d96d24fb462814be4d773990b478f19f03e1aa4e4da"),
    ("countdown", _dream, 685, "20a4e600574ac6afacaa85208fc6e238ae4d70a4e55ec5197c7e850d27744a77"),
])
def test_rendered_eval_prompts_match_the_official_golden_prompts(task_name, template, chars, digest):
    """First scored item of each task (Sudoku row 361, Countdown row 0), rendered as the official code does."""
    task = get_task(task_name, protocol="official")
    [message] = task.prompt_messages(task.examples("test")[0], split="test")
    assert message["role"] == "user"
    text = template(message["content"]) + task.prompt_prefill(split="test")
    assert (len(text), sha256(text)) == (chars, digest)


# ---- the Sudoku parser and aggregation ------------------------------------------------------------

PUZZLE, SOLUTION = "4320004330100004", "4321124334122134"


@pytest.mark.parametrize("generation, answer, right", [
    ("<answer>\n4321 1243 3412 2134\n</answer>", "4321124334122134", 8),
    ("<answer>\n4 3 2 1\n1 2 4 3\n3 4 1 2\n2 1 3 4\n</answer>", "4321124334122134", 8),
    ("<answer>\n[4321124334122134]\n</answer>", "[4321124334122134]", 2),  # cut to "[432112433412213"
    ("<answer>Solution: 4321124334122134</answer>", "Solution:4321124334122134", 3),  # "Solution:4321124"
    ("<answer>4321</answer>", "4321", 1),                                          # padded with 0 when scored
    ("I think 4321124334122134 works", "4321124334122134", 8),                     # rule (e), no tags
    ("I think\n4 3 2 1\n1 2 4 3\n3 4 1 2\n2 1 3 4", "", 0),                         # a spaced grid without tags
    ("<answer>\n4321124334122134\n<|im_end|><|endoftext|>", "4321124334122134<|im_end|>", 8),   # rule (b) stop
    ("<answer>\n```\n4321124334122134\n```\n</answer>", "4321124334122134", 8),     # rule (a), a code fence
    ("<answer>9999999999999999</answer> <answer>4321124334122134</answer>", "9999999999999999", 0),  # FIRST tag
    ("<answer></answer> 4321124334122134<|eot_id|>", "4321124334122134", 8),      # rule (c) after </answer>
])
def test_official_sudoku_parser(generation, answer, right):
    assert S.official_answer(generation) == answer
    task = get_task("sudoku", protocol="official")
    ex = {"puzzle": PUZZLE, "solution": SOLUTION, "num_blanks": 8}
    assert task.eval_metrics([generation], [ex]) == {"correct_cells": [right], "empty_cells": [8.0],
                                                    "accuracy": [right / 8]}


def test_official_sudoku_pools_cells_over_puzzles():
    task = get_task("sudoku", protocol="official")
    a = {"puzzle": PUZZLE, "solution": SOLUTION}                          # 8 empty cells
    b = {"puzzle": "4321124334122100", "solution": SOLUTION}              # 2 empty cells
    per = task.eval_metrics([f"<answer>{SOLUTION}</answer>", "nothing"], [a, b])
    # pooled: (8 + 0) / (8 + 2) = 0.8, where the mean of the per-puzzle accuracies would be 0.5
    assert task.aggregate_metrics(per) == {"accuracy": 0.8, "correct_cells": 8.0, "empty_cells": 10.0}


# ---- the Countdown parser ------------------------------------------------------------------------

@pytest.mark.parametrize("generation, expression, correct", [
    ("<answer>\n30 - 100 + 93\n</answer>", "30 - 100 + 93", True),
    ("<answer>30 - 100 + 93 = 23</answer>", "30 - 100 + 93", True),
    ("So 30 - 100 + 93 = 23 is it", "30 - 100 + 93", True),                       # no tags: the whole text
    ("try \\boxed{30+100+93} then <answer>30 - 100 + 93</answer>", "30+100+93", False),   # a box wins
    ("<answer>100-30</answer> then <answer>30 - 100 + 93</answer>", "100-30", False),     # the first tag
    ("<answer>(93 - 100) \\times 30</answer>", "(93 - 100) * 30", False),         # right numbers, wrong value
    ("<answer>93 \\div 100</answer>", "93 / 100", False),
    ("$\\boxed 93-100+30$ and more", "93-100+30", True),                          # the "\boxed " form, to "$"
    ("\\boxed{93-100+30", "\\boxed{93-100+30", False),                             # unclosed box: the text
    ("\\fbox{93-100+30} <answer>93 - 100 + 30</answer>", "93 - 100 + 30", True),   # \fbox found, then rejected
    ("<answer>30.0 - 100 + 93</answer>", "30.0 - 100 + 93", False),               # "30.0" adds a 0
])
def test_official_countdown_parser(generation, expression, correct):
    assert C.official_eval_answer(generation) == expression
    task = get_task("countdown", protocol="official")
    ex = {"numbers": [30, 100, 93], "target": 23}
    assert task.eval_metrics([generation], [ex]) == {"accuracy": [float(correct)]}


def test_official_countdown_accepts_what_eval_accepts():
    """``**`` and ``//`` pass the official character check and evaluate as in Python; 1e-5 tolerance."""
    assert C.official_correct("<answer>(4 // 2) ** 3</answer>", [2, 3, 4], 8)
    assert C.official_correct("<answer>1 / 3 + 2 / 3 * 4</answer>", [1, 2, 3, 3, 4], 3)   # 2.9999... within 1e-5
    assert not C.official_correct("<answer>(4 // 2) ** 3</answer>", [2, 3, 4], 9)


def test_official_countdown_aggregation_is_the_item_mean():
    task = get_task("countdown", protocol="official")
    ex = {"numbers": [30, 100, 93], "target": 23}
    per = task.eval_metrics(["<answer>30 - 100 + 93</answer>", "no", "no", "no"], [ex] * 4)
    assert task.aggregate_metrics(per) == {"accuracy": 0.25}


# ---- protocols and training data -----------------------------------------------------------------

def test_protocol_is_checked():
    with pytest.raises(ValueError, match=r"task 'sudoku' must be one of \['project', 'official'\], got 'paper'"):
        get_task("sudoku", protocol="paper")
    with pytest.raises(ValueError, match=r"task 'gsm8k' must be one of \['project'\], got 'official'"):
        get_task("gsm8k", protocol="official")
    assert get_task("countdown").protocol == "project"
    assert get_task("gsm8k", protocol="project").protocol == "project"
    with pytest.raises(ConfigError, match=r"task: the protocol of task 'math' must be one of \['project'\]"):
        load_config(TrainConfig, REPO / "configs/llada_8b_math.yaml", ["task.kwargs.protocol=official"]).validate()
    with pytest.raises(ConfigError, match="protocol=official evaluates the official chat prompts"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["task.kwargs.protocol=official"]).validate()


@pytest.mark.parametrize("recipe, protocol", [
    ("llada_8b_sudoku", "official"), ("llada_8b_countdown", "official"), ("dream_7b_sudoku", "official"),
    ("dream_7b_countdown", "official"), ("sudoku_tiny", "project"), ("countdown_tiny", "project")])
def test_recipes_evaluate_with_the_official_protocol_and_tiny_tasks_with_their_own(recipe, protocol):
    cfg = load_config(TrainConfig, REPO / "configs" / f"{recipe}.yaml", []).validate()
    assert get_task(cfg.task.name, **cfg.task.kwargs).protocol == protocol
    if recipe.startswith("dream"):    # the official Dream evaluation's inherited top-k
        assert cfg.eval_sampling_config().top_k == 50


def test_official_sudoku_training_shares_no_solution_grid_with_the_test_set():
    task = get_task("sudoku", protocol="official")
    test_grids = {ex["solution"] for ex in task.examples("test")}
    train_grids = {ex["solution"] for ex in task.examples("train")}
    assert len(test_grids) == 156 and len(train_grids) == 288 - 156
    assert not test_grids & train_grids
    # what the project's own split overlapped: 411 of the 500 official puzzles have a grid it trains on
    project_train = {ex["solution"] for ex in get_task("sudoku").examples("train")}
    all_rows = S.load_csv(official_data_path("4x4_test_sudoku.csv"))
    assert sum(ex["solution"] in project_train for ex in all_rows) == 411


def test_official_countdown_training_excludes_the_test_instances():
    task = get_task("countdown", protocol="official")
    test = {(tuple(sorted(ex["numbers"])), ex["target"]) for ex in task.examples("test")}
    train = {(tuple(sorted(ex["numbers"])), ex["target"]) for ex in task.examples("train")}
    assert len(train) == 20_000 and not test & train
    project_train = {(tuple(sorted(ex["numbers"])), ex["target"]) for ex in get_task("countdown").examples("train")}
    assert len(test & project_train) == 16


def test_user_train_files_lose_their_test_rows(tmp_path):
    official = get_task("sudoku", protocol="official").examples("test")
    other = next(ex for ex in get_task("sudoku").examples("train") if ex["solution"] not in
                 {e["solution"] for e in official})
    path = tmp_path / "train.csv"
    path.write_text(f"Puzzle,Solution\n{official[0]['puzzle']},{official[0]['solution']}\n"
                    f"{other['puzzle']},{other['solution']}\n")
    assert get_task("sudoku", protocol="official", train_file=str(path)).examples("train") == [
        {"puzzle": other["puzzle"], "solution": other["solution"], "num_blanks": other["puzzle"].count("0")}]
    only_test = tmp_path / "only_test.csv"
    only_test.write_text(f"Puzzle,Solution\n{official[0]['puzzle']},{official[0]['solution']}\n")
    with pytest.raises(ValueError, match="nothing is left to train on"):
        get_task("sudoku", protocol="official", train_file=str(only_test)).examples("train")

    cd = tmp_path / "cd.jsonl"
    cd.write_text(json.dumps({"nums": [93, 30, 100], "target": 23}) + "\n"
                  + json.dumps({"nums": [1, 2, 3], "target": 6}) + "\n")
    assert get_task("countdown", protocol="official", train_file=str(cd)).examples("train") == [
        {"numbers": [1, 2, 3], "target": 6}]


@pytest.mark.parametrize("name, split, digest", [
    ("sudoku", "train", "3783991a89f9707f68357e3365db77b0f74c62beabdb11a235f6714ba379e46d"),
    ("sudoku", "test", "fe98765cb0b2198fb5a566d5f276098f59def82f13a6429c38becbaf38616f25"),
    # Re-recorded when the validation set was added: the generated train set now also excludes its instances.
    ("countdown", "train", "9582669fcf7886d142ead42c10bba18ff88675d43385ea24eba3ec15cb0df607"),
    ("countdown", "test", "70f82acebf3d91918cfc6791510c5d974d4354f21fc086ec82af319537f11843"),
])
def test_project_protocol_splits_are_unchanged(name, split, digest):
    """The tiny tasks keep their generated splits: the hashes were recorded before the official protocol
    existed (the Countdown train set's after the validation set)."""
    assert sha256(json.dumps(get_task(name).examples(split))) == digest


# ---- the eval command ----------------------------------------------------------------------------

def _word_tokenizer(directory, cfg):
    """A whitespace word-level Hugging Face tokenizer whose specials match the tiny config."""
    tokenizers = pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2", reason="Hugging Face chat templates need jinja2")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<answer>": 1, "</answer>": 2, "<reasoning>": 3, "user": 4, "assistant": 5}
    vocab.update({"<|mdm_mask|>": cfg.mask_token_id, "<|eos|>": cfg.eos_token_id})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|eos|>",
                                   pad_token="<|eos|>", mask_token="<|mdm_mask|>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant {% endif %}")
    fast.save_pretrained(str(directory))
    return directory


def test_eval_command_defaults_to_the_official_protocol_for_chat_prompts(tmp_path, capsys):
    import jax

    from gdsd_jax.checkpoint.params_io import save_params
    from gdsd_jax.cli import main
    from gdsd_jax.models.config import tiny_llada
    from gdsd_jax.models.denoiser import init_params

    cfg = tiny_llada()
    save_params(tmp_path / "ckpt", init_params(cfg, jax.random.key(0), None), cfg)
    tok = _word_tokenizer(tmp_path / "tok", cfg)
    common = ["eval", "--checkpoint", str(tmp_path / "ckpt"), "--tokenizer", str(tok), "--task", "countdown",
              "--max-examples", "2", "--batch-size", "8"]
    assert main(common + ["--output", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
    assert summary["protocol"] == "official" and summary["num_examples"] == 2
    rows = [json.loads(x) for x in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [len(r["completion_ids"]) for r in rows] == [128, 128]        # the official generation length
    assert all(r["completion"].count("<|eos|>") == r["completion_ids"].count(cfg.eos_token_id) for r in rows)
    assert main(common + ["--protocol", "official", "--format", "compact"]) == 1
    assert "--protocol official evaluates chat prompts" in capsys.readouterr().err
