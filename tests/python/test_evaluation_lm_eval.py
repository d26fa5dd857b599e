"""nanotune.evaluation against lm-evaluation-harness 0.4.x itself, per example.

fixtures/lm_eval/expected.json holds what lm-eval computed (make_fixtures.py
there says how, and how to rerun it) on the task files in fixtures/lm_eval/data
with the tiny model committed in fixtures/lm_eval/tiny-llama: per example the
(context, continuation) of every request, the summed log-likelihoods, acc and
acc_norm. Here nanotune loads the same files and model, the way `nanotune eval`
does, and must agree: prompts exactly, log-likelihoods within 1e-4, acc and
acc_norm exactly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanotune.evaluation import evaluate_tasks, load_task, loglikelihood_examples, main

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text(encoding="utf-8"))
TASKS = list(EXPECTED["tasks"])
MODEL_DIR = FIXTURES / EXPECTED["model"]["dir"]
LL_TOL = 1e-4


@pytest.fixture(scope="module")
def lm():
    for name, digest in EXPECTED["model"]["sha256"].items():
        assert hashlib.sha256((MODEL_DIR / name).read_bytes()).hexdigest() == digest, (
            f"{MODEL_DIR / name} is not the file expected.json was computed with; rerun make_fixtures.py")
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    return model, tokenizer


def task_file(task: str) -> Path:
    return FIXTURES / EXPECTED["tasks"][task]["data"]


def test_fixtures_cover_every_task_and_discriminate():
    """Every task lm-eval defines is here, and the numbers are not degenerate:
    acc and acc_norm disagree on some examples, and some examples are right
    and some wrong, so a wrong normalization or gold shows up as a failure."""
    assert EXPECTED["lm_eval_version"].startswith("0.4.")
    assert set(TASKS) == {"hellaswag", "winogrande", "piqa", "arc_easy", "arc_challenge", "openbookqa", "siqa",
                          "boolq"}
    examples = [ex for t in TASKS for ex in EXPECTED["tasks"][t]["examples"]]
    assert sum(ex["acc"] != ex["acc_norm"] for ex in examples) >= 10
    assert 0 < sum(ex["acc"] for ex in examples) < len(examples)
    assert 0 < sum(ex["acc_norm"] for ex in examples) < len(examples)
    for ex in examples:  # no near-ties that float noise within LL_TOL could flip
        lls = sorted(ex["loglikelihoods"])
        assert lls[-1] - lls[-2] > 10 * LL_TOL or lls[-1] == lls[-2]


@pytest.mark.parametrize("task", TASKS)
def test_prompts_equal_lm_eval(task):
    examples = load_task(task, task_file(task))
    expected = EXPECTED["tasks"][task]["examples"]
    assert len(examples) == len(expected)
    for i, (ex, exp) in enumerate(zip(examples, expected)):
        got = [list(pair) for pair in zip(ex.contexts, ex.continuations)]
        assert got == exp["requests"], f"{task} example {i}"


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("task", TASKS)
def test_loglikelihoods_and_decisions_equal_lm_eval(lm, task, batch_size):
    """batch_size 7 puts requests of different lengths in one right-padded batch;
    lm-eval ran them one at a time."""
    model, tokenizer = lm
    examples = load_task(task, task_file(task))
    got = loglikelihood_examples(model, tokenizer, examples, batch_size=batch_size)
    for i, (res, exp) in enumerate(zip(got, EXPECTED["tasks"][task]["examples"], strict=True)):
        where = f"{task} example {i}: {exp['requests'][0][0][-50:]!r}"
        assert res["loglikelihoods"] == pytest.approx(exp["loglikelihoods"], abs=LL_TOL), where
        assert (res["acc"], res["acc_norm"]) == (exp["acc"], exp["acc_norm"]), where


def test_command_line_totals_equal_lm_eval(capsys):
    """`python -m nanotune.evaluation` (what `nanotune eval` runs) on all tasks:
    acc and acc_norm are lm-eval's means over the examples."""
    args = ["--model", str(MODEL_DIR), "--json", "--batch-size", "5"]
    for task in TASKS:
        args += ["--task", f"{task}={task_file(task)}"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for task in TASKS:
        exp = EXPECTED["tasks"][task]["examples"]
        n = len(exp)
        assert results[task] == {
            "acc": pytest.approx(sum(e["acc"] for e in exp) / n, abs=1e-12),
            "acc_norm": pytest.approx(sum(e["acc_norm"] for e in exp) / n, abs=1e-12),
            "n": n,
        }, task


def test_generate_mode_still_runs_on_the_fixtures(lm):
    """The LLM-Adapters generative mode is kept beside the harness mode."""
    model, tokenizer = lm
    res = evaluate_tasks(model, tokenizer, {"boolq": task_file("boolq")}, mode="generate", limit=2)
    assert res["boolq"]["n"] == 2 and res["boolq"]["acc_norm"] is None
