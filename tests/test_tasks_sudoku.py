"""4x4 Sudoku: generator (independent brute-force solver), split, shipped file regeneration, official reward
branches, compact format."""

import collections
import re
import subprocess
import sys

import pytest

from gdsd_jax.tasks import get_task, score_batch
from gdsd_jax.tasks import sudoku as S
from gdsd_jax.tasks.files import DataError

# ---- independent reference: a backtracking solver that lists every solution ----

def _valid_grid(g: str) -> bool:
    rows = [g[4 * r:4 * r + 4] for r in range(4)]
    cols = ["".join(g[4 * r + c] for r in range(4)) for c in range(4)]
    boxes = ["".join(g[4 * (br + dr) + bc + dc] for dr in (0, 1) for dc in (0, 1)) for br in (0, 2) for bc in (0, 2)]
    return all(sorted(u) == ["1", "2", "3", "4"] for u in rows + cols + boxes)


def _conflicts(cells, i, d):
    r, c = divmod(i, 4)
    br, bc = 2 * (r // 2), 2 * (c // 2)
    same = [4 * r + k for k in range(4)] + [4 * k + c for k in range(4)]
    same += [4 * (br + dr) + bc + dc for dr in (0, 1) for dc in (0, 1)]
    return any(cells[j] == d for j in same if j != i)


def _solutions(puzzle: str) -> list[str]:
    cells = list(puzzle)
    out = []

    def fill(k):
        if k == 16:
            if _valid_grid("".join(cells)):
                out.append("".join(cells))
            return
        if cells[k] != "0":
            if not _conflicts(cells, k, cells[k]):
                fill(k + 1)
            return
        for d in "1234":
            if not _conflicts(cells, k, d):
                cells[k] = d
                fill(k + 1)
                cells[k] = "0"

    fill(0)
    return out


@pytest.fixture(scope="module")
def all_valid_grids():
    return sorted(_solutions("0" * 16))  # the reference solver on an empty grid lists every valid grid


def test_grids_match_independent_enumeration(all_valid_grids):
    assert len(all_valid_grids) == 288
    assert [S.grid_string(g) for g in S.all_grids()] == all_valid_grids


def test_split_is_fixed_and_disjoint():
    train, test = S.grid_split()
    assert len(train) == 240 and len(test) == 48
    assert not set(train) & set(test) and set(train) | set(test) == set(range(288))
    assert S.grid_split() == (train, test)


def test_shipped_test_set_unique_solutions_and_held_out():
    rows = S.load_csv(S.shipped_test_path())
    assert len(rows) == 288
    grids = S.all_grids()
    _, test_idx = S.grid_split()
    test_grids = {S.grid_string(grids[i]) for i in test_idx}
    per_grid = collections.Counter(r["solution"] for r in rows)
    assert set(per_grid) == test_grids and set(per_grid.values()) == {6}
    assert len({r["puzzle"] for r in rows}) == 288
    for r in rows:
        assert 6 <= r["num_blanks"] <= 10 and r["num_blanks"] == r["puzzle"].count("0")
        assert _solutions(r["puzzle"]) == [r["solution"]]


def test_train_pool_unique_solutions_and_disjoint_from_test():
    pool = S.make_train_pool()
    grids = S.all_grids()
    train_idx, test_idx = S.grid_split()
    train_grids = {S.grid_string(grids[i]) for i in train_idx}
    test_grids = {S.grid_string(grids[i]) for i in test_idx}
    assert len(pool) > 40_000
    assert len({p["puzzle"] for p in pool}) == len(pool)
    solutions = {p["solution"] for p in pool}
    assert solutions <= train_grids and not solutions & test_grids
    assert {p["num_blanks"] for p in pool} == set(range(6, 11))
    for p in pool[::47]:  # a spread sample (about 1000 puzzles) through the reference solver
        assert _solutions(p["puzzle"]) == [p["solution"]]
    # the pool is deterministic for a seed
    assert S.make_train_pool()[:50] == pool[:50]


def test_regenerate_command_reproduces_shipped_file_byte_for_byte(tmp_path):
    out = tmp_path / "sudoku.csv"
    subprocess.run([sys.executable, "-m", "gdsd_jax.tasks.sudoku", "--regenerate", "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    assert out.read_bytes() == S.shipped_test_path().read_bytes()
    check = subprocess.run([sys.executable, "-m", "gdsd_jax.tasks.sudoku", "--check"], capture_output=True,
                           timeout=120)
    assert check.returncode == 0


def test_validation_set_is_disjoint_from_test_and_held_out_train(tmp_path):
    """The shipped validation puzzles: unique solutions, 6 per validation grid, no grid shared with the test
    set, and (with hold_out_validation) no solution grid in the train pool."""
    grids = S.all_grids()
    train_idx, test_idx = S.grid_split()
    valid_idx = S.validation_grids()
    assert len(valid_idx) == 48 and set(valid_idx) <= set(train_idx) and not set(valid_idx) & set(test_idx)
    task = get_task("sudoku", hold_out_validation=True, train_per_grid=5)
    valid, test, train = task.examples("validation"), task.examples("test"), task.examples("train")
    assert len(valid) == 288 and len({r["puzzle"] for r in valid}) == 288
    per_grid = collections.Counter(r["solution"] for r in valid)
    assert set(per_grid) == {S.grid_string(grids[i]) for i in valid_idx} and set(per_grid.values()) == {6}
    for r in valid[::7]:
        assert _solutions(r["puzzle"]) == [r["solution"]]
    valid_solutions = {r["solution"] for r in valid}
    assert not valid_solutions & {r["solution"] for r in test}
    assert not {r["puzzle"] for r in valid} & {r["puzzle"] for r in test}
    assert not valid_solutions & {r["solution"] for r in train}
    assert len({r["solution"] for r in train}) == 192
    # Without the hold-out the validation grids are train targets: the split is refused, not served.
    with pytest.raises(ValueError, match="hold_out_validation"):
        get_task("sudoku").examples("validation")
    example_solution = re.search(r"Solution: (\d{16})", S.EVAL_SYSTEM_PROMPT).group(1)
    assert example_solution not in valid_solutions             # the chat eval prompt's example
    out = tmp_path / "valid.csv"
    subprocess.run([sys.executable, "-m", "gdsd_jax.tasks.sudoku", "--regenerate", "--split", "validation",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == S.shipped_validation_path().read_bytes()


# ---- official reward: one completion per branch, expected values worked out by hand ----

PUZZLE = "1030000200200040"  # clues at 0, 2, 7, 10, 14; blanks at 1, 3, 4, 5, 6, 8, 9, 11, 12, 13, 15
SOLUTION = "1234341243212143"


def _example(puzzle, solution):
    return {"puzzle": puzzle, "solution": solution, "num_blanks": puzzle.count("0")}


def test_reward_fixture_is_consistent():
    assert _valid_grid(SOLUTION)
    assert all(p in ("0", s) for p, s in zip(PUZZLE, SOLUTION))


@pytest.mark.parametrize("completion, expected", [
    ("<reasoning>r</reasoning><answer>1234341243212143</answer>", 1.0),              # all right
    ("no tags at all 1234341243212143", 0.0),                                         # no answer tag
    ("<answer>1234341243212143", 0.0),                                                # unclosed tag
    ("<answer>\n1234 3412 4321 2143\n</answer>", 1.0),                                # whitespace: digits only
    ("<answer>1234-3412-4321-2143</answer>", 1.0),                                    # separators dropped
    ("<answer>12343412432121439999</answer>", 1.0),                                   # extra digits truncated
    ("<answer>0000000000000000</answer><answer>1234341243212143</answer>", 1.0),      # last tag wins
    ("<answer>1234341243212143</answer><answer>0000000000000000</answer>", 0.0),      # last tag wins (wrong)
    ("<answer></answer>", 0.0),                                                       # empty answer
    ("<answer>12343412</answer>", 5 / 11),  # padded with 0: right at blanks 1, 3, 4, 5, 6 of the 11 blanks
    ("<answer>1134341243212143</answer>", 10 / 11),                                   # one blank wrong
    ("<answer>1030000200200040</answer>", 0.0),                                       # puzzle copied back
])
def test_sudoku_reward_branches(completion, expected):
    ex = _example(PUZZLE, SOLUTION)
    assert ex["num_blanks"] == 11
    assert S.reward_sudoku([completion], [ex]) == [pytest.approx(expected)]


def test_sudoku_reward_is_total():
    bad_examples = [{"puzzle": "", "solution": ""}, {}, {"puzzle": SOLUTION, "solution": SOLUTION}]
    out = S.reward_sudoku(["<answer>1234</answer>"] * 3, bad_examples)
    assert out == [0.0, 0.0, 0.0]  # a puzzle without blanks also scores 0 (official)


def test_task_score_batch_and_prompts():
    task = get_task("sudoku")
    ex = task.examples("test")[0]
    right = f"<reasoning>\nx\n</reasoning>\n<answer>\n{ex['solution']}\n</answer>"
    rewards, per_fn, failures = score_batch(task, [right, "nothing"], [ex, ex])
    assert rewards.tolist() == [1.0, 0.0] and failures == 0 and set(per_fn) == {"sudoku"}
    train_msg = task.prompt_messages(ex, split="train")
    eval_msg = task.prompt_messages(ex, split="test")
    assert train_msg[0]["content"].endswith(f"\n\nNow solve this Sudoku puzzle: {ex['puzzle']}\n")
    assert eval_msg[0]["content"].endswith(f"\n\nSolve the following Sudoku puzzle: {ex['puzzle']}\n")
    assert train_msg != eval_msg and "**Rules:**" in eval_msg[0]["content"]
    assert task.prompt_prefill(split="train") == "" and task.prompt_prefill(split="test") == "<reasoning>"
    assert task.eval_metrics([right], [ex]) == {"accuracy": [1.0], "solved": [1.0]}


# ---- compact format ----

def test_compact_format_ids():
    tok = S.sudoku_tokenizer()
    cfg = S.tiny_model()
    assert (tok.vocab_size, tok.mask_id, tok.eos_id, tok.pad_id, tok.sep_id) == (8, 6, 7, 7, 5)
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (8, 6, 7, 7)
    ex = _example(PUZZLE, SOLUTION)
    task = get_task("sudoku")
    assert task.compact_prompt(ex) == [1, 0, 3, 0, 0, 0, 0, 2, 0, 0, 2, 0, 0, 0, 4, 0, 5]
    assert task.compact_solution(ex) == [1, 2, 3, 4, 3, 4, 1, 2, 4, 3, 2, 1, 2, 1, 4, 3]
    assert len(task.compact_prompt(ex)) == task.compact_prompt_length == 17
    # the chat-template stand-in reproduces the compact prompt from the puzzle text
    assert tok.encode(tok.apply_chat_template([{"role": "user", "content": PUZZLE}])) == task.compact_prompt(ex)


@pytest.mark.parametrize("ids, expected", [
    ([1, 2, 3, 4, 3, 4, 1, 2, 4, 3, 2, 1, 2, 1, 4, 3], 1.0),
    ([1, 0, 3, 0, 0, 0, 0, 2, 0, 0, 2, 0, 0, 0, 4, 0], 0.0),        # puzzle copied
    ([1, 1, 3, 4, 3, 4, 1, 2, 4, 3, 2, 1, 2, 1, 4, 3], 10 / 11),    # blank 1 wrong
    ([1, 6, 3, 6, 3, 4, 1, 2, 4, 3, 2, 1, 2, 1, 4, 3], 9 / 11),     # MASK ids count as wrong
    ([1, 2, 3, 4], 2 / 11),                                          # short: blanks 1, 3 right; 4.. missing
    ([], 0.0),
    ([99, -1] * 8, 0.0),
])
def test_compact_reward(ids, expected):
    assert S.compact_reward(ids, _example(PUZZLE, SOLUTION)) == pytest.approx(expected)


def test_load_csv_reports_file_row_and_column(tmp_path):
    good = "Puzzle,Solution\n1030000200200040,1234341243212143\n"
    path = tmp_path / "p.csv"
    path.write_text(good + "1030000200200040,1234341243212144\n")
    with pytest.raises(DataError) as err:
        S.load_csv(path)
    assert err.value.row == 3 and err.value.column == "Solution" and str(path) in str(err.value)
    path.write_text("Puzzle,Answer\n1030000200200040,1234341243212143\n")
    with pytest.raises(DataError, match="column 'Solution'"):
        S.load_csv(path)
    path.write_text(good + "10300003001002,1234341243212143\n")
    with pytest.raises(DataError, match="row 3, column 'Puzzle'"):
        S.load_csv(path)
    path.write_text("Puzzle,Solution\n")
    with pytest.raises(DataError, match="no rows"):
        S.load_csv(path)
