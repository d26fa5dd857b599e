"""Finetuning data from local JSON/JSONL files, tokenized once, batched with a
resumable position.

    data = load_dataset("train.jsonl", tokenizer, cutoff=256, eval_fraction=0.05)
    it = data.train.batches(batch_size=2)        # endless, reshuffled every epoch
    batch = next(it)                             # {"input_ids", "attention_mask", "labels"}: (B, T) int64
    pos = it.state_dict(); it.load_state_dict(pos)   # exact resume of the data order

Formats (format="auto" looks at the first row):
- "text":        {"text": "..."}; loss on every token.
- "instruction": {"instruction", "input" (optional), "output"}: Alpaca and the
  LLM-Adapters commonsense_170k layout (its extra "answer" field, the bare label
  used for accuracy, is ignored: the model learns "output"). The prompt is the
  Alpaca template (ALPACA_PROMPT / ALPACA_PROMPT_NO_INPUT below), as in
  LLM-Adapters' finetune.py.
- "chat":        {"messages": [{"role", "content"}, ...]} rendered by the
  tokenizer's chat template; the assistant turns are the responses.

Every example is `bos + prompt + response + eos` cut to `cutoff` tokens (the end
is cut). With train_on_inputs=False (default) the labels of prompt tokens are
-100, so the loss covers the responses only (the "text" format has no prompt).
An example with no trainable token left after the cut is dropped and counted in
`info["dropped"]`.

Note [prompt and response tokenized apart]: the prompt and the response are
tokenized separately and concatenated, so the label boundary is exact and the
model trains on the same token sequence it will see when generating from the
prompt. Byte-level BPE never merges across the newline that ends every prompt
here, so this equals tokenizing the joined text in practice.

Shuffling: epoch e visits the examples in the order torch.randperm(n) with a
generator seeded from (seed, e); the position (epoch, index) therefore fixes the
rest of the stream, and a checkpoint only has to store those two numbers (plus
what they must match on resume: the number of examples, seed, shuffle and a
fingerprint of the tokenized examples, so a position is never applied to other data).
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InvalidParams

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FORMATS", "IGNORE_INDEX", "BatchIterator", "DatasetError",
           "LoadedDataset", "TokenizedDataset", "collate", "load_dataset", "read_rows"]

IGNORE_INDEX = -100  # label of tokens without loss (prompt, padding); torch's cross_entropy default

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMATS = ("text", "instruction", "chat")
_ALIASES = {"plain": "text", "alpaca": "instruction", "commonsense": "instruction", "messages": "chat"}
_REQUIRED = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}


class DatasetError(InvalidParams):
    """Bad data (code INVALID_PARAMS). `path`, `line` (1-based, None if not about one
    row) and `field` name what was wrong; the message starts with "path:line:"."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None):
        where = "" if path is None else f"{path}:{line}: " if line is not None else f"{path}: "
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{what}{message}", path=None if path is None else str(path), line=line,
                         field=field)


# ---------------------------------------------------------------------------
# Reading rows

def read_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) pairs from a JSONL file or a JSON array file (either extension;
    a file whose first character is "[" is an array). Blank JSONL lines are skipped."""
    p = Path(path)
    if not p.exists():
        raise DatasetError("data file does not exist", p)
    if not p.is_file():
        raise DatasetError("data path is not a file", p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"not UTF-8 text ({e.reason} at byte {e.start})", p) from e
    rows = _read_json_array(text, p) if text.lstrip().startswith("[") else _read_jsonl(text, p)
    for line, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"expected a JSON object, got {type(row).__name__}", p, line)
    return rows


def _read_jsonl(text: str, path: Path) -> list[tuple[int, Any]]:
    rows = []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((n, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"invalid JSON: {e.msg} (column {e.colno})", path, n) from e
    return rows


def _read_json_array(text: str, path: Path) -> list[tuple[int, Any]]:
    # Decodes element by element so every row keeps the line it starts on.
    decoder = json.JSONDecoder()
    rows: list[tuple[int, Any]] = []
    pos, line, counted = text.index("[") + 1, 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip_ws(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return rows
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DatasetError(f"invalid JSON: {e.msg} (column {e.colno})", path, e.lineno) from e
        rows.append((line_at(pos), value))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
        elif pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DatasetError("invalid JSON: extra data after the array", path, line_at(skip_ws(pos + 1)))
            return rows
        else:
            raise DatasetError("invalid JSON: expected ',' or ']' between array elements", path, line_at(pos))


# ---------------------------------------------------------------------------
# Tokenizing

def _detect_format(rows: list[tuple[int, dict]], path: Path) -> str:
    line, row = rows[0]
    for fmt, key in (("chat", "messages"), ("instruction", "instruction"), ("text", "text")):
        if key in row:
            return fmt
    raise DatasetError(f"cannot tell the format from fields {sorted(row)}: expected 'text', "
                       f"'instruction'/'output' or 'messages' (or pass format=)", path, line)


def _string(row: dict, key: str, path: Path, line: int, required: bool = True) -> str:
    if key not in row or (row[key] is None and not required):
        if required:
            raise DatasetError("missing required field", path, line, key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise DatasetError(f"expected a string, got {type(value).__name__}", path, line, key)
    return value


def _segments(fmt: str, row: dict, line: int, path: Path, tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, is_response) pieces in order, special tokens as text."""
    if fmt == "text":
        return [(_string(row, "text", path, line), True)]
    if fmt == "instruction":
        instruction = _string(row, "instruction", path, line)
        inp = _string(row, "input", path, line, required=False)
        output = _string(row, "output", path, line)
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        return [(template.format(instruction=instruction, input=inp), False), (output, True)]
    # chat: render growing prefixes; what the i-th assistant turn adds is a response.
    messages = row.get("messages")
    if "messages" not in row:
        raise DatasetError("missing required field", path, line, "messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError("expected a non-empty list of {role, content}", path, line, "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DatasetError(f"expected an object, got {type(m).__name__}", path, line, f"messages[{i}]")
        for key in ("role", "content"):
            if key not in m:
                raise DatasetError("missing required field", path, line, f"messages[{i}].{key}")
            if not isinstance(m[key], str):
                raise DatasetError(f"expected a string, got {type(m[key]).__name__}", path, line,
                                   f"messages[{i}].{key}")

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors raised by the template itself (e.g. role order)
            raise DatasetError(f"the chat template failed: {e}", path, line, "messages") from e

    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DatasetError("the tokenizer's chat template does not render conversations prefix by prefix; "
                               "cannot find the assistant tokens", path, line, "messages")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(messages, False)
    if rest.startswith(done) and len(rest) > len(done):
        out.append((rest[len(done):], False))
    return [(text, resp) for text, resp in out if text]


@dataclass
class TokenizedDataset:
    """Tokenized examples; `input_ids[i]` and `labels[i]` are lists of the same length."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    lines: list[int]  # the source line of each example (1-based)
    pad_id: int
    path: str
    shuffle: bool = True
    seed: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def fingerprint(self) -> str:
        """A hash of the tokenized examples (ids and labels, in order); computed once."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None or cached[0] != len(self.input_ids):
            h = hashlib.blake2b(digest_size=16)
            for ids, labels in zip(self.input_ids, self.labels):
                h.update(len(ids).to_bytes(4, "little"))
                h.update(array("q", ids).tobytes())
                h.update(array("q", labels).tobytes())
            cached = self.__dict__["_fingerprint"] = (len(self.input_ids), h.hexdigest())
        return cached[1]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.input_ids[i] for i in indices], [self.labels[i] for i in indices], self.pad_id)

    def batches(self, batch_size: int, drop_last: bool = False, epochs: int | None = None,
                shuffle: bool | None = None) -> "BatchIterator":
        """An iterator of padded batches; endless by default (epochs=None)."""
        return BatchIterator(self, batch_size, drop_last=drop_last, epochs=epochs,
                             shuffle=self.shuffle if shuffle is None else shuffle)


@dataclass
class LoadedDataset:
    train: TokenizedDataset
    eval: TokenizedDataset | None
    info: dict[str, Any] = field(default_factory=dict)  # format, counts, tokens, truncated, dropped


def _tokenize(rows, fmt, tokenizer, cutoff, train_on_inputs, path) -> tuple[TokenizedDataset, dict[str, int]]:
    segs = [_segments(fmt, row, line, path, tokenizer) for line, row in rows]
    flat = [text for s in segs for text, _ in s]
    encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []  # one batched call
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None and fmt != "chat" else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and fmt != "chat" else []
    ids_out, labels_out, lines_out = [], [], []
    truncated = dropped = target_tokens = 0
    k = 0
    for (line, _), s in zip(rows, segs):
        ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
        for _, is_response in s:
            piece = encoded[k]
            k += 1
            ids += piece
            labels += piece if (is_response or train_on_inputs) else [IGNORE_INDEX] * len(piece)
        ids += eos
        labels += eos  # eos is always learned: it is how the model learns to stop
        if len(ids) > cutoff:
            truncated += 1
            ids, labels = ids[:cutoff], labels[:cutoff]
        # Position 0 is never a target: the model predicts token t+1 from tokens <= t.
        targets = len(labels) - 1 - labels[1:].count(IGNORE_INDEX)
        if targets == 0:
            dropped += 1
            continue
        target_tokens += targets
        ids_out.append(ids)
        labels_out.append(labels)
        lines_out.append(line)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = TokenizedDataset(ids_out, labels_out, lines_out, pad_id=pad if pad is not None else 0, path=str(path))
    stats = {"rows": len(rows), "examples": len(ids_out), "truncated": truncated, "dropped": dropped,
             "tokens": sum(len(x) for x in ids_out), "target_tokens": target_tokens}
    return ds, stats


def load_dataset(path: str | os.PathLike, tokenizer, format: str = "auto", cutoff: int = 256,
                 train_on_inputs: bool = False, seed: int = 0, shuffle: bool = True,
                 eval_fraction: float = 0.0, eval_path: str | os.PathLike | None = None) -> LoadedDataset:
    """Reads and tokenizes a local .json/.jsonl finetuning set.

    format: "auto" (default: from the first row's fields), "text", "instruction"
        (aliases "alpaca", "commonsense") or "chat".
    cutoff: the most tokens per example (default 256, as in LLM-Adapters); longer ones lose their end.
    train_on_inputs: False (default) = loss on responses only; True = on prompts too.
    seed, shuffle: the training order (see the module doc); the eval set keeps file order.
    eval_fraction: hold out this fraction of the rows (chosen with `seed`) as `eval`; 0 = none.
    eval_path: a separate held-out file in the same format (exclusive with eval_fraction).
    """
    p = Path(path)
    fmt = _ALIASES.get(format, format)
    if fmt not in FORMATS and fmt != "auto":
        raise DatasetError(f"unknown format {format!r}; use 'auto' or one of {list(FORMATS)}", p, field="format")
    if not isinstance(cutoff, int) or cutoff < 2:
        raise DatasetError(f"cutoff must be an integer >= 2, got {cutoff!r}", p, field="cutoff")
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}", p, field="eval_fraction")
    if eval_fraction and eval_path is not None:
        raise DatasetError("give eval_fraction or eval_path, not both", p, field="eval_path")
    rows = read_rows(p)
    if not rows:
        raise DatasetError("the dataset is empty (no rows)", p)
    if fmt == "auto":
        fmt = _detect_format(rows, p)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("chat rows need a tokenizer with a chat template, and this one has none "
                           "(use an instruct model's tokenizer, or the 'instruction' format)", p, field="messages")

    eval_rows = None
    if eval_path is not None:
        eval_rows = read_rows(eval_path)
        if not eval_rows:
            raise DatasetError("the eval dataset is empty (no rows)", eval_path)
    elif eval_fraction:
        n_eval = max(1, round(eval_fraction * len(rows)))
        if n_eval >= len(rows):
            raise DatasetError(f"eval_fraction={eval_fraction} of {len(rows)} rows leaves no training rows",
                               p, field="eval_fraction")
        held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]

    train, stats = _tokenize(rows, fmt, tokenizer, cutoff, train_on_inputs, p)
    if not len(train):
        raise DatasetError(f"no example has a response token left after cutoff={cutoff} "
                           f"({stats['dropped']} of {stats['rows']} rows dropped)", p)
    train.shuffle, train.seed = shuffle, seed
    info: dict[str, Any] = {"format": fmt, "path": str(p), "cutoff": cutoff, "train_on_inputs": train_on_inputs,
                            "train": stats, "eval": None}
    evalset = None
    if eval_rows is not None:
        ep = Path(eval_path) if eval_path is not None else p
        evalset, info["eval"] = _tokenize(eval_rows, fmt, tokenizer, cutoff, train_on_inputs, ep)
        if not len(evalset):
            raise DatasetError(f"no eval example has a response token left after cutoff={cutoff}", ep)
        evalset.shuffle, evalset.seed = False, seed
    return LoadedDataset(train=train, eval=evalset, info=info)


# ---------------------------------------------------------------------------
# Batching

def collate(input_ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads to the longest example: padding has attention_mask 0 and label -100."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)  # (B, T)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, :len(x)] = torch.tensor(x)
        lab[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


class BatchIterator:
    """Padded batches in epoch order; an epoch's last batch may be short unless
    drop_last. `state_dict()` is the position {epoch, index} (plus what it must
    match on resume); `load_state_dict()` continues exactly there."""

    def __init__(self, dataset: TokenizedDataset, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 epochs: int | None = None):
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        if drop_last and batch_size > len(dataset):
            raise DatasetError(f"batch_size={batch_size} with drop_last leaves no batch from {len(dataset)} examples",
                               field="batch_size")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.drop_last, self.epochs = drop_last, epochs
        self.epoch = 0  # the epoch being read
        self.index = 0  # examples of this epoch's order already returned
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order) cache

    @property
    def batches_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The example indices of `epoch` in visiting order (do not modify)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.dataset.seed * 1_000_003 + epoch)
                self._order = (epoch, torch.randperm(n, generator=g).tolist())
            else:
                self._order = (epoch, list(range(n)))
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        if self.index >= n or (self.drop_last and self.index + self.batch_size > n):
            self.epoch, self.index = self.epoch + 1, 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        take = self.order(self.epoch)[self.index:self.index + self.batch_size]
        self.index += len(take)
        return self.dataset.collate(take)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "batch_size": self.batch_size,
                "num_examples": len(self.dataset), "seed": self.dataset.seed, "shuffle": self.shuffle,
                "fingerprint": self.dataset.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at `state` (a state_dict(), maybe through JSON). Checks everything
        first: a DatasetError (field "data_state.<key>") leaves the position unchanged.
        A key the state lacks is not checked (states of older versions)."""
        if not isinstance(state, dict):
            raise DatasetError(f"data position: expected a map, got {type(state).__name__}", field="data_state")
        for key in ("epoch", "index"):
            v = state.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DatasetError(f"data position: {key} must be a non-negative integer, got {v!r}",
                                   field=f"data_state.{key}")
        v = state.get("batch_size", 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DatasetError(f"data position: batch_size must be a positive integer, got {v!r}",
                               field="data_state.batch_size")
        mine = {"num_examples": len(self.dataset), "seed": self.dataset.seed, "shuffle": self.shuffle}
        for key in ("num_examples", "seed", "shuffle", "fingerprint"):
            if key not in state:
                continue
            here = self.dataset.fingerprint if key == "fingerprint" else mine[key]
            if state[key] != here:
                what = "the tokenized examples differ" if key == "fingerprint" else f"{key}={state[key]!r} in the " \
                    f"checkpoint but {here!r} here"
                raise DatasetError(f"data position: {what}; resuming would not continue the same data order",
                                   field=f"data_state.{key}")
        self.epoch, self.index = state["epoch"], state["index"]
