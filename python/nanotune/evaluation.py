"""Commonsense evaluation: multiple-choice log-likelihood scoring and
LLM-Adapters-style generative answer extraction, on local task files.

Two ways to score one example with k choices:

- ``mode="loglikelihood"``: lm-evaluation-harness 0.4.x, zero-shot, per example
  (tests/python/test_evaluation_lm_eval.py checks prompts, log-likelihoods,
  acc and acc_norm against numbers lm-eval itself computed). Each task builds
  the harness's prompt: for choice i a context x_i and a continuation
  " " + choices[i] (Winogrande, a "multiple input" task, varies the context
  instead: x_i is the sentence up to the blank with option i filled in, and
  the continuation is the rest of the sentence). Then
      ll_i     = sum_t log p(c_i[t] | x_i, c_i[:t])
      acc      = [argmax_i ll_i == gold]
      acc_norm = [argmax_i ll_i / len(choices[i]) == gold]
  where len(choices[i]) counts the *characters* (code points) of the choice as
  the task defines it (``Example.choices``), without the " " delimiter: the
  answer text for most tasks, "no"/"yes" for BoolQ, and for Winogrande the
  filled-in context. Ties go to the lowest index (numpy's argmax). lm-eval's
  stock configs report acc_norm only for HellaSwag, PIQA, ARC and OpenBookQA;
  for Winogrande, SIQA and BoolQ it is the same formula, which lm-eval computes
  when asked for that metric.
  Tokenization, as lm-eval's ``hf`` model does it: all trailing whitespace of
  the context (spaces, newlines, tabs) is moved to the front of the
  continuation; context+continuation and the context alone are encoded with the
  tokenizer's own special tokens (so a Llama context starts with one BOS), and
  the continuation's tokens are the tail of the whole beyond the context's
  length, so a token merged across the boundary is not scored as two. An empty
  context is the prefix token alone (BOS, else EOS) before the continuation
  encoded without special tokens (lm-eval: not BOS twice). Inputs longer than
  the model's context window lose tokens on the left.
- ``mode="generate"`` (as LLM-Adapters' commonsense_evaluate does). The
  example is turned into the commonsense_170k instruction ("Please choose the
  correct answer ... Answer format: answer1/answer2"), wrapped in the Alpaca
  prompt, decoded greedily, and the first answer word of the task's format
  found by regex in the output ("the correct answer is option2" -> option2)
  is compared with the gold one. acc_norm is None in this mode.

Task files: JSON lines (``.jsonl``) or one JSON array (``.json``), in the
layout of the Hugging Face dataset exports of each task, or the LLM-Adapters
commonsense test layout ``{"instruction", "answer"}`` for any task. See
``TASKS`` for the names and ``load_task`` for the layouts.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F

from .errors import InvalidParams

__all__ = [
    "Example",
    "TaskFormatError",
    "TASKS",
    "PROMPT_TEMPLATE",
    "canonical_task",
    "load_task",
    "loglikelihoods",
    "loglikelihood_examples",
    "score_loglikelihood",
    "score_generate",
    "extract_answer",
    "evaluate_tasks",
    "format_table",
    "main",
]


class TaskFormatError(InvalidParams):
    """A task file that cannot be read (code INVALID_PARAMS); the message names file, line and field."""


@dataclass(frozen=True)
class Example:
    """One multiple-choice item, ready for both scoring modes."""

    contexts: tuple[str, ...]  # one per choice (Winogrande's differ; others repeat)
    continuations: tuple[str, ...]  # the text scored after each context
    choices: tuple[str, ...]  # lm-eval's doc_to_choice; acc_norm divides by their lengths in characters
    gold: int  # index of the right choice
    instruction: str  # commonsense_170k instruction, for mode="generate"
    answers: tuple[str, ...]  # answer words of the task format, e.g. ("option1", "option2")


# Alpaca template that LLM-Adapters trains and evaluates commonsense_170k with.
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# What the finetuned model is trained to write before the answer word.
ANSWER_PREFIX = "the correct answer is"


# ---------------------------------------------------------------------------
# Loading


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) pairs from a .jsonl file or a .json array."""
    if not path.is_file():
        raise TaskFormatError(f"{path}: no such task file")
    text = path.read_text(encoding="utf-8")
    records: list[tuple[int, dict]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):  # one JSON array (LLM-Adapters' test.json)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskFormatError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        # Records in an array have no line of their own: report the item index.
        records = [(i, r) for i, r in enumerate(data)]
        where = "item"
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskFormatError(f"{path}:{n}: invalid JSON: {e.msg}") from e
        where = "line"
    for n, r in records:
        if not isinstance(r, dict):
            raise TaskFormatError(f"{path}:{where} {n}: expected a JSON object, got {type(r).__name__}")
    return records


class _Record:
    """Field access that names file, line and field when something is wrong."""

    def __init__(self, path: Path, line: int, data: dict):
        self.path, self.line, self.data = path, line, data

    def error(self, field: str, problem: str) -> TaskFormatError:
        return TaskFormatError(f"{self.path}:{self.line}: field '{field}' {problem}")

    def get(self, field: str, kind: type | tuple[type, ...] = str) -> Any:
        if field not in self.data:
            raise self.error(field, f"is missing (record has: {', '.join(sorted(self.data)) or 'no fields'})")
        value = self.data[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(field, f"should be {names}, got {type(value).__name__}: {value!r:.60}")
        return value

    def index(self, field: str, n: int, base: int = 0) -> int:
        """An integer label given as int or digit string, 'base'-based, checked in range."""
        value = self.get(field, (int, str))
        try:
            i = int(value) - base
        except ValueError:
            raise self.error(field, f"should be an integer label, got {value!r}") from None
        if not 0 <= i < n:
            raise self.error(field, f"is {value!r}, out of range for {n} choices")
        return i


def _choices_layout(rec: _Record, stem_field: str) -> tuple[str, list[str], list[str]]:
    """ARC / OpenBookQA: (question, choice texts, choice labels) from either the
    original nested layout or the flat HF one."""
    if isinstance(rec.data.get("question"), dict):  # original: question{stem, choices[...]}
        q = rec.get("question", dict)
        stem = q.get("stem")
        if not isinstance(stem, str):
            raise rec.error("question.stem", "is missing or not a string")
        choices = q.get("choices")
        if not isinstance(choices, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and isinstance(c.get("label"), str) for c in choices
        ):
            raise rec.error("question.choices", "should be a list of {text, label} objects")
        return stem, [c["text"] for c in choices], [c["label"] for c in choices]
    stem = rec.get(stem_field)
    choices = rec.get("choices", dict)
    texts, labels = choices.get("text"), choices.get("label")
    if not (isinstance(texts, list) and isinstance(labels, list) and len(texts) == len(labels) and texts):
        raise rec.error("choices", "should be {text: [...], label: [...]} with equal, non-empty lists")
    if not all(isinstance(t, str) for t in texts + labels):
        raise rec.error("choices", "texts and labels should all be strings")
    return stem, texts, labels


def _gold_from_key(rec: _Record, labels: list[str], lstrip: bool = False) -> int:
    key = rec.get("answerKey", (str, int))
    if lstrip:  # the harness's OpenBookQA target: choices.label.index(answerKey.lstrip())
        key = str(key).lstrip()
    if str(key) not in labels:
        raise rec.error("answerKey", f"is {key!r}, not one of the choice labels {labels}")
    return labels.index(str(key))


def _numbered(word: str, texts: Sequence[str]) -> str:
    return "".join(f"\n\n{word}{i + 1}: {t}" for i, t in enumerate(texts))


def _answer_format(word: str, k: int) -> tuple[str, ...]:
    return tuple(f"{word}{i + 1}" for i in range(k))


def _hellaswag_clean(text: str) -> str:
    # WikiHow items carry bracketed markup ("[title]", "[step]"); the harness
    # turns " [title]" into a sentence break and drops the rest.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(rec: _Record) -> Example:
    endings = rec.get("endings", list)
    if not endings or not all(isinstance(e, str) for e in endings):
        raise rec.error("endings", "should be a non-empty list of strings")
    if "ctx_a" in rec.data and "ctx_b" in rec.data:
        ctx = rec.get("ctx_a") + " " + rec.get("ctx_b").capitalize()
    else:
        ctx = rec.get("ctx")
    label = rec.data.get("activity_label")
    query = _hellaswag_clean(f"{label}: {ctx}" if isinstance(label, str) else ctx)
    gold = rec.index("label", len(endings))
    endings_clean = [_hellaswag_clean(e) for e in endings]
    return Example(
        contexts=(query,) * len(endings),
        continuations=tuple(" " + e for e in endings_clean),
        choices=tuple(endings_clean),
        gold=gold,
        instruction="Please choose the correct ending to complete the given sentence: "
        f"{query}{_numbered('Ending', endings_clean)}\n\nAnswer format: "
        + "/".join(_answer_format("ending", len(endings))),
        answers=_answer_format("ending", len(endings)),
    )


def _winogrande(rec: _Record) -> Example:
    sentence = rec.get("sentence")
    options = [rec.get("option1"), rec.get("option2")]
    if sentence.count("_") != 1:
        raise rec.error("sentence", f"should contain exactly one '_' blank, has {sentence.count('_')}")
    gold = rec.index("answer", 2, base=1)
    # Partial scoring (Sakaguchi et al., as the harness does): the context is
    # the sentence up to the blank with the option filled in; both choices
    # score the same continuation, the rest of the sentence. The harness's
    # "choices" are the filled-in contexts, so acc_norm divides by their lengths.
    before, after = sentence.split("_")
    contexts = tuple(before + o for o in options)
    return Example(
        contexts=contexts,
        continuations=(" " + after.strip(),) * 2,
        choices=contexts,
        gold=gold,
        instruction="Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{sentence}{_numbered('Option', options)}\n\nAnswer format: option1/option2",
        answers=("option1", "option2"),
    )


def _piqa(rec: _Record) -> Example:
    goal, sols = rec.get("goal"), [rec.get("sol1"), rec.get("sol2")]
    if "label" not in rec.data:
        raise rec.error("label", "is missing (the original PIQA keeps labels in a separate *-labels.lst; "
                        "use the HF export, which has them inline)")
    gold = rec.index("label", 2)
    return Example(
        contexts=(f"Question: {goal}\nAnswer:",) * 2,
        continuations=tuple(" " + s for s in sols),
        choices=tuple(sols),
        gold=gold,
        instruction=f"Please choose the correct solution to the question: {goal}"
        f"{_numbered('Solution', sols)}\n\nAnswer format: solution1/solution2",
        answers=("solution1", "solution2"),
    )


def _question_choices(rec: _Record, stem_field: str, context: str, lstrip_key: bool = False) -> Example:
    """ARC and OpenBookQA: a question with lettered choices and an answerKey;
    `context` frames the question for log-likelihood scoring ({q} is the question)."""
    question, texts, labels = _choices_layout(rec, stem_field)
    answers = _answer_format("answer", len(texts))
    return Example(
        contexts=(context.format(q=question),) * len(texts),
        continuations=tuple(" " + t for t in texts),
        choices=tuple(texts),
        gold=_gold_from_key(rec, labels, lstrip_key),
        instruction=f"Please choose the correct answer to the question: {question}"
        f"{_numbered('Answer', texts)}\n\nAnswer format: " + "/".join(answers),
        answers=answers,
    )


def _arc(rec: _Record) -> Example:
    return _question_choices(rec, "question", "Question: {q}\nAnswer:")


def _openbookqa(rec: _Record) -> Example:
    # The harness gives OBQA no "Question:" frame: the stem alone is the context.
    return _question_choices(rec, "question_stem", "{q}", lstrip_key=True)


def _siqa(rec: _Record) -> Example:
    context, question = rec.get("context"), rec.get("question")
    answers = [rec.get("answerA"), rec.get("answerB"), rec.get("answerC")]
    gold = rec.index("label", 3, base=1)
    return Example(
        contexts=(f"Q: {context} {question}\nA:",) * 3,
        continuations=tuple(" " + a for a in answers),
        choices=tuple(answers),
        gold=gold,
        instruction=f"Please choose the correct answer to the question: {context} {question}"
        f"{_numbered('Answer', answers)}\n\nAnswer format: answer1/answer2/answer3",
        answers=("answer1", "answer2", "answer3"),
    )


def _boolq(rec: _Record) -> Example:
    question, passage = rec.get("question"), rec.get("passage")
    answer = rec.data.get("answer", rec.data.get("label"))
    if isinstance(answer, int) and not isinstance(answer, bool) and answer in (0, 1):
        answer = bool(answer)  # SuperGLUE export: label 0/1
    if not isinstance(answer, bool):
        raise rec.error("answer", f"should be true/false, got {answer!r:.60}")
    return Example(
        # The harness's template appends '?' to the question as it is (the
        # dataset's questions have none), so "is it hot?" gives "is it hot??".
        contexts=(f"{passage}\nQuestion: {question}?\nAnswer:",) * 2,
        continuations=(" no", " yes"),
        choices=("no", "yes"),
        gold=int(answer),
        # LLM-Adapters' boolq instruction carries the question only, no passage.
        instruction="Please answer the following question with true or false, "
        f"question: {question.rstrip('?')}?"
        "\n\nAnswer format: true/false",
        answers=("false", "true"),
    )


_FORMAT_RE = re.compile(r"Answer format:\s*([A-Za-z0-9/ ]+?)\s*$")


def _llm_adapters(rec: _Record) -> Example:
    """{"instruction", "answer"}: the choices are the words of the instruction's
    'Answer format: a/b/c' line; log-likelihood mode scores ' <word>' after
    the prompt and 'the correct answer is'."""
    instruction, answer = rec.get("instruction"), rec.get("answer")
    m = _FORMAT_RE.search(instruction)
    if not m:
        raise rec.error("instruction", "has no 'Answer format: a/b/...' line to take the choices from")
    answers = tuple(w.strip() for w in m.group(1).split("/") if w.strip())
    if answer.strip() not in answers:
        raise rec.error("answer", f"is {answer!r}, not one of the answer format {'/'.join(answers)}")
    context = PROMPT_TEMPLATE.format(instruction=instruction) + ANSWER_PREFIX
    return Example(
        contexts=(context,) * len(answers),
        continuations=tuple(" " + a for a in answers),
        choices=answers,
        gold=answers.index(answer.strip()),
        instruction=instruction,
        answers=answers,
    )


# Canonical task name -> record parser for its usual layout.
TASKS: dict[str, Callable[[_Record], Example]] = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "piqa": _piqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "openbookqa": _openbookqa,
    "siqa": _siqa,
    "boolq": _boolq,
}
_ALIASES = {
    "arc-e": "arc_easy", "arc-easy": "arc_easy", "arce": "arc_easy",
    "arc-c": "arc_challenge", "arc-challenge": "arc_challenge", "arcc": "arc_challenge",
    "obqa": "openbookqa", "social_i_qa": "siqa", "social-i-qa": "siqa", "socialiqa": "siqa",
}


def canonical_task(name: str) -> str:
    """'ARC-Easy' -> 'arc_easy', 'social_i_qa' -> 'siqa'; ValueError for unknown names."""
    key = name.strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, _ALIASES.get(key.replace("_", "-"), key))
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (and aliases {', '.join(_ALIASES)})")
    return key


def load_task(name: str, path: str | Path, limit: int | None = None) -> list[Example]:
    """Examples of task ``name`` from ``path``.

    Layouts (one record per JSONL line, or a JSON array):
      hellaswag   {ctx | ctx_a+ctx_b, endings[4], label, activity_label?}
      winogrande  {sentence with one '_', option1, option2, answer "1"|"2"}
      piqa        {goal, sol1, sol2, label 0|1}
      arc_*       {question{stem, choices[{text,label}]}, answerKey} or
                  {question, choices{text[], label[]}, answerKey}
      openbookqa  {question_stem, choices{text[], label[]}, answerKey} or the nested ARC layout
      siqa        {context, question, answerA, answerB, answerC, label "1".."3"}
      boolq       {question, passage, answer true|false}
      any task    LLM-Adapters test layout {instruction, answer}
    """
    task = canonical_task(name)
    path = Path(path)
    records = _read_records(path)
    if limit is not None:
        records = records[:limit]
    parse = TASKS[task]
    out = []
    for line, data in records:
        rec = _Record(path, line, data)
        out.append(_llm_adapters(rec) if "instruction" in data and "answer" in data else parse(rec))
    if not out:
        raise TaskFormatError(f"{path}: no examples")
    return out


# ---------------------------------------------------------------------------
# Log-likelihood scoring


_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no model_max_length"


def _prefix_token_id(tokenizer) -> int | None:
    """The token an empty context stands for: BOS, else EOS (lm-eval's prefix_token_id)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _tok_encode(tokenizer, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """lm-eval's HFLM.tok_encode: the tokenizer's own special tokens by default
    (BOS for Llama), none when ``text`` already starts with the prefix token."""
    if add_special_tokens is None:
        prefix = _prefix_token_id(tokenizer)
        if prefix is not None and text.startswith(tokenizer.decode(prefix)):
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-eval 0.4's ``hf`` model makes
    them (see the module docstring)."""
    if context == "":
        prefix = _prefix_token_id(tokenizer)
        if prefix is None:
            raise ValueError("empty context and the tokenizer has neither bos_token_id nor eos_token_id")
        cont = _tok_encode(tokenizer, continuation, add_special_tokens=False)
        if cont and cont[0] == prefix:  # the continuation brings its own BOS: it is the context
            ctx, cont = cont[:1], cont[1:]
        else:
            ctx = [prefix]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing")
        return ctx, cont
    n_ws = len(context) - len(context.rstrip())
    if n_ws:
        context, continuation = context[:-n_ws], context[-n_ws:] + continuation
    if not context:
        raise ValueError(f"context {context + continuation[:n_ws]!r} is only whitespace (lm-eval refuses it too)")
    whole = _tok_encode(tokenizer, context + continuation)
    ctx = _tok_encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not ctx or not cont:
        raise ValueError(f"continuation {continuation!r} tokenizes to nothing after context {context[-40:]!r}")
    return ctx, cont


def _max_length(model, tokenizer) -> int:
    """The context window as lm-eval resolves it: the config's n_positions /
    max_position_embeddings / n_ctx, else the tokenizer's model_max_length, else 2048."""
    cfg = getattr(model.config, "text_config", None) or model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit != _TOKENIZER_INFINITY else 2048


@torch.no_grad()
def loglikelihoods(
    model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16, max_length: int | None = None
) -> list[float]:
    """Summed log p(continuation | context) for each (context, continuation).

    Batched: requests are sorted longest first, right-padded, and the context
    is cut from the left when context+continuation exceeds ``max_length``
    (default: as lm-eval resolves it from the config and tokenizer).
    """
    if max_length is None:
        max_length = _max_length(model, tokenizer)
    device = next(model.parameters()).device
    encoded = [_encode_pair(tokenizer, c, x) for c, x in requests]
    # One forward pass sees tokens[:-1] and predicts tokens[1:].
    inputs = []
    for ctx, cont in encoded:
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {max_length}")
        ids = (ctx + cont)[-(max_length + 1):][:-1]
        inputs.append((ids, len(cont)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = [0.0] * len(inputs)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = len(inputs[idx[0]][0])
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids = inputs[i][0]
                batch[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            logp = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(idx):
                ids, n_cont = inputs[i]
                targets = torch.tensor(encoded[i][1], device=device)  # (n_cont,)
                # Positions len(ids)-n_cont .. len(ids)-1 predict the continuation.
                lp = logp[row, len(ids) - n_cont: len(ids)].gather(-1, targets[:, None]).squeeze(-1)
                result[i] = float(lp.sum())
    finally:
        model.train(was_training)
    return result


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on ties (numpy's argmax)."""
    return max(range(len(values)), key=lambda i: values[i])


def loglikelihood_examples(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> list[dict]:
    """Per example what lm-eval logs for it: {loglikelihoods (one per choice),
    pred, pred_norm, acc, acc_norm} (definitions in the module docstring)."""
    requests = [(c, x) for ex in examples for c, x in zip(ex.contexts, ex.continuations)]
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    out, pos = [], 0
    for ex in examples:
        k = len(ex.continuations)
        ll = lls[pos:pos + k]
        pos += k
        # ll <= 0, so an empty choice (length 0) scores -inf, as numpy's ll / 0.0 does.
        norm = [v / len(c) if c else -math.inf for v, c in zip(ll, ex.choices)]
        pred, pred_norm = _argmax(ll), _argmax(norm)
        out.append({"loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm,
                    "acc": float(pred == ex.gold), "acc_norm": float(pred_norm == ex.gold)})
    return out


def score_loglikelihood(model, tokenizer, examples: Sequence[Example], batch_size: int = 16) -> dict:
    """{acc, acc_norm, n} over ``examples``: the means of ``loglikelihood_examples``."""
    per = loglikelihood_examples(model, tokenizer, examples, batch_size=batch_size)
    n = len(per)
    return {"acc": sum(r["acc"] for r in per) / n, "acc_norm": sum(r["acc_norm"] for r in per) / n, "n": n}


# ---------------------------------------------------------------------------
# Generative scoring


def extract_answer(text: str, answers: Iterable[str]) -> str | None:
    """First answer word of the task format found in a generated ``text``, else None.

    'The correct answer is option2' -> 'option2' for answers (option1, option2);
    words match whole and case-insensitively, so 'answer1' is not read out of
    'answer10' and 'true' not out of 'untrue'.
    """
    words = sorted(set(answers), key=len, reverse=True)
    if not words:
        raise ValueError("answers is empty")
    m = re.search(r"\b(" + "|".join(map(re.escape, words)) + r")\b", text, flags=re.IGNORECASE)
    if not m:
        return None
    found = m.group(1).lower()
    return next(w for w in words if w.lower() == found)


@torch.no_grad()
def score_generate(
    model, tokenizer, examples: Sequence[Example], batch_size: int = 8, max_new_tokens: int = 32
) -> dict:
    """{acc, acc_norm: None, n}: greedy decoding of the LLM-Adapters prompt."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            prompts = [tokenizer(PROMPT_TEMPLATE.format(instruction=ex.instruction))["input_ids"] for ex in chunk]
            width = max(map(len, prompts))
            # Left padding, so every prompt ends where generation starts.
            ids = torch.full((len(chunk), width), pad if pad is not None else 0, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )
            for row, ex in enumerate(chunk):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                hits += int(extract_answer(text, ex.answers) == ex.answers[ex.gold])
    finally:
        model.train(was_training)
    return {"acc": hits / len(examples), "acc_norm": None, "n": len(examples)}


# ---------------------------------------------------------------------------
# Entry point


def evaluate_tasks(
    model,
    tokenizer,
    tasks: dict[str, str | Path],
    mode: Literal["loglikelihood", "generate"] = "loglikelihood",
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict]:
    """Per task name: {acc, acc_norm, n}. ``tasks`` maps a task name (see
    ``TASKS``, aliases allowed) to a local file; ``limit`` keeps the first
    ``limit`` examples of each. All files are read before any scoring, so a
    bad file fails fast."""
    if mode not in ("loglikelihood", "generate"):
        raise ValueError(f"mode must be 'loglikelihood' or 'generate', got {mode!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    loaded = {name: load_task(name, path, limit=limit) for name, path in tasks.items()}
    results = {}
    for name, examples in loaded.items():
        if mode == "loglikelihood":
            results[name] = score_loglikelihood(model, tokenizer, examples, batch_size=batch_size)
        else:
            results[name] = score_generate(model, tokenizer, examples, batch_size=batch_size)
    return results


def format_table(results: dict[str, dict]) -> str:
    """Markdown table of ``evaluate_tasks`` results with an unweighted average row."""
    lines = ["| task | n | acc | acc_norm |", "|---|---:|---:|---:|"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    for name, r in results.items():
        lines.append(f"| {name} | {r['n']} | {fmt(r['acc'])} | {fmt(r['acc_norm'])} |")
    if len(results) > 1:
        accs = [r["acc"] for r in results.values()]
        norms = [r["acc_norm"] for r in results.values() if r["acc_norm"] is not None]
        avg_norm = sum(norms) / len(norms) if len(norms) == len(accs) else None
        lines.append(f"| average | {sum(r['n'] for r in results.values())} | {fmt(sum(accs) / len(accs))} | {fmt(avg_norm)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """`python -m nanotune.evaluation --model DIR --task piqa=piqa.jsonl ...`: print the table."""
    import argparse

    p = argparse.ArgumentParser(description="Score a causal LM on local commonsense task files.")
    p.add_argument("--model", required=True, help="save_pretrained folder with the model and its tokenizer")
    p.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                   help=f"task file, repeatable; names: {', '.join(TASKS)}")
    p.add_argument("--mode", choices=("loglikelihood", "generate"), default="loglikelihood")
    p.add_argument("--limit", type=int, default=None, help="first N examples of each task (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args(argv)
    tasks = {}
    for spec in args.task:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--task {spec!r}: expected NAME=PATH, e.g. piqa=data/piqa/valid.jsonl")
        tasks[name] = path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    results = evaluate_tasks(model, tokenizer, tasks, mode=args.mode, limit=args.limit, batch_size=args.batch_size)
    print(json.dumps(results) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
