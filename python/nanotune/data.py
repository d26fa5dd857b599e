"""Finetuning data: local JSON/JSONL/CSV/parquet files, `datasets` save_to_disk
folders and Hub datasets, tokenized once (or as training goes, for large files),
batched with a resumable position.

    data = load_dataset("train.jsonl", tokenizer, cutoff=256, eval_fraction=0.05)
    it = data.train.batches(batch_size=2)        # endless, reshuffled every epoch
    batch = next(it)                             # {"input_ids", "attention_mask", "labels"}: (B, T) int64
    pos = it.state_dict(); it.load_state_dict(pos)   # exact resume of the data order

Sources (`path`; see open_source and docs/data.md):
- a .json/.jsonl file (any other extension reads as JSON too): JSONL, or a JSON
  array when the first character is "[" (read_rows);
- a .csv/.tsv file (every cell a string; the first record is the header);
- a .parquet file (through pyarrow);
- a `datasets` save_to_disk folder (a Dataset, or a DatasetDict and `split`);
- a Hub dataset id ("org/name") with `split`, `config`, `revision`, through the
  `datasets` library and its cache (HF_DATASETS_CACHE; offline with HF_HUB_OFFLINE=1).
`fields` maps the source's columns onto ours ({"instruction": "question", ...}).

Formats (format="auto" looks at the first row):
- "text":        {"text": "..."}; loss on every token.
- "instruction": {"instruction", "input" (optional), "output"}: Alpaca and the
  LLM-Adapters commonsense_170k layout (its extra "answer" field, the bare label
  used for accuracy, is ignored: the model learns "output"). The prompt is the
  `template` (templates.py: "alpaca" by default, ALPACA_PROMPT /
  ALPACA_PROMPT_NO_INPUT as in LLM-Adapters' finetune.py; "chat", "raw", or a
  format string with {instruction} and {input}).
- "chat":        {"messages": [{"role", "content"}, ...]} rendered by the
  tokenizer's chat template; the assistant turns are the responses.

Every example is `bos + prompt + response + eos` cut to `cutoff` tokens (the end
is cut). With train_on_inputs=False (default) the labels of prompt tokens are
-100, so the loss covers the responses only (the "text" format has no prompt).
An example with no trainable token left after the cut is dropped and counted in
`info["dropped"]`. With packing=True (text rows only) documents are concatenated
and cut into full blocks instead (Note [packing]).

Note [prompt and response tokenized apart]: the prompt and the response are
tokenized separately and concatenated, so the label boundary is exact and the
model trains on the same token sequence it will see when generating from the
prompt. Byte-level BPE never merges across the newline that ends every prompt
here, so this equals tokenizing the joined text in practice.

Note [chat template on instruction rows]: with template="chat" an instruction row
becomes the conversation [user: instruction (+ blank line + input), assistant:
output] and goes through the chat format's code: the prompt is exactly what
templates.render("chat", ...) gives for generation, the response is the
assistant turn as the template writes it (with its end-of-turn token), and no bos
or eos is added (the template has its own).

Shuffling: epoch e visits the examples in the order torch.randperm(n) with a
generator seeded from (seed, e); the position (epoch, index) therefore fixes the
rest of the stream, and a checkpoint only has to store those two numbers (plus
what they must match on resume: the number of examples, seed, shuffle and a
fingerprint of the tokenized examples, so a position is never applied to other data).
A streamed dataset shuffles within windows instead (Note [streaming]).

Note [packing]: packing=True (text rows) tokenizes every document as bos + text +
eos (no cutoff), concatenates them in source order and cuts the stream into
blocks of exactly `cutoff` tokens; a document longer than what is left of a block
continues in the next one. The last partial block is dropped (counted in
info["train"]["dropped_tokens"]), so no block has padding; a source with fewer
than `cutoff` tokens is an error. Within a block the first token of every
document has label -100 (it would be predicted from the previous document's
eos), and `position_ids` restart at 0 at every document start and at the block
start. A batch of blocks carries those `position_ids`; training.py's _loss_sum
then calls the model with position_ids and no attention_mask, from which
transformers (>= 4.53: masking_utils.find_packed_sequence_indices) builds a
block-diagonal causal mask for sdpa/eager/flex and varlen flash-attention for
FA2: no token attends across a document boundary, so a block's loss is the sum of
its documents' own losses (tests/python/test_data_sources.py checks it).
The batch's attention_mask stays (all ones) for counting input tokens.

Note [streaming]: streaming=True (default: any local file or save_to_disk/Hub
dataset over STREAM_BYTES = 64 MiB; JSON arrays never stream) reads and tokenizes
as training goes, memory bounded by one window. The training rows are read in
windows of `shuffle_buffer` rows (1024; with packing: `shuffle_buffer` blocks),
each shuffled on its own with a generator seeded from (seed, epoch, the window's
start); windows come in source order. The position is therefore deterministic and
small: {epoch, cursor (where the window starts: a byte offset and line for
JSONL/CSV, a row index otherwise), skip (packing: tokens of the cursor's document
already used by the previous window), taken (examples of the window already
returned)}; resuming re-reads that one window. An epoch ends at the end of the
source (its last batch may be short); the next one starts over, reshuffled.
What is known at load time is what was read: info["train"] covers the first
window, and errors in later rows surface at the step that reads them (still
naming the file, line or row, and field). The held-out set cannot be a random
fraction of an unread file: with eval_fraction it is the head of the source (the
rows in its first eval_fraction of bytes for JSONL/CSV, of rows otherwise), read
into memory, and training starts after it; eval_path works as usual.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InvalidParams
from .templates import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, TemplateError, check_template
from .templates import render as render_template

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "FIELDS", "FORMATS", "IGNORE_INDEX", "STREAM_BYTES",
           "BatchIterator", "DatasetError", "LoadedDataset", "StreamingBatchIterator", "StreamingDataset",
           "TokenizedDataset", "collate", "load_dataset", "open_source", "read_rows"]

IGNORE_INDEX = -100  # label of tokens without loss (prompt, padding); torch's cross_entropy default

FORMATS = ("text", "instruction", "chat")
FIELDS = ("instruction", "input", "output", "text", "messages")  # what `fields` may map
STREAM_BYTES = 64 * 2**20  # sources larger than this stream unless streaming=False (Note [streaming])
_ALIASES = {"plain": "text", "alpaca": "instruction", "commonsense": "instruction", "messages": "chat"}
_REQUIRED = {"text": ("text",), "instruction": ("instruction", "output"), "chat": ("messages",)}
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_PARQUET_SUFFIXES = (".parquet", ".pq")
_FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", *_CSV_SUFFIXES, *_PARQUET_SUFFIXES, ".arrow", ".txt", ".gz")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class DatasetError(InvalidParams):
    """Bad data (code INVALID_PARAMS). `path`, `line` (1-based, None if not about one
    row) and `field` name what was wrong; the message starts with "path:line:".
    Sources without lines (parquet, Arrow datasets, Hub datasets) name the 1-based
    `row` instead: "path: row 7: ..."."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None, row: int | None = None):
        where = "" if path is None else f"{path}:{line}: " if line is not None else \
            f"{path}: row {row}: " if row is not None else f"{path}: "
        what = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}{what}{message}", path=None if path is None else str(path), line=line,
                         field=field, row=row)


@dataclass(frozen=True)
class _Place:
    """Where rows come from, for errors: the path and whether numbers are lines or rows."""

    path: str
    unit: str = "line"  # "line" (JSON, JSONL, CSV) or "row"

    def error(self, message: str, n: int | None = None, field: str | None = None) -> DatasetError:
        if self.unit == "row":
            return DatasetError(message, self.path, field=field, row=n)
        return DatasetError(message, self.path, n, field)


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
    # Lines end at "\n" only (a trailing "\r" is JSON whitespace): str.splitlines would also
    # split at U+2028 and the like, which JSON allows unescaped inside strings.
    for n, raw in enumerate(text.split("\n"), start=1):
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
# Sources
#
# A source reads rows from a cursor: (pos, n), where pos is a byte offset (JSONL,
# CSV) or a row index (the rest) and n the 1-based line or row number of the row
# there. rows(cursor) yields (cursor, next_cursor, n, row) so a reader can stop
# anywhere and continue later (Note [streaming]).

Cursor = tuple[int, int]


class _Source:
    kind = ""
    unit = "line"
    path = ""
    size: int | None = None  # bytes (unit "line") or rows; None: unknown (a streamed Hub dataset)
    nbytes: int = 0  # on disk, for the streaming default
    columns: list[str] | None = None  # known up front (tabular sources)
    start: Cursor = (0, 1)

    @property
    def place(self) -> _Place:
        return _Place(self.path, self.unit)

    def rows(self, cursor: Cursor | None = None) -> Iterator[tuple[Cursor, Cursor, int, dict[str, Any]]]:
        raise NotImplementedError

    def read_all(self) -> list[tuple[int, dict[str, Any]]]:
        return [(n, row) for _, _, n, row in self.rows()]

    def fingerprint(self) -> str:
        raise NotImplementedError


def _file_fingerprint(p: Path) -> str:
    """The file's size and a hash of its first and last 64 KiB: cheap, and changes with any
    edit that a resumed position would notice (another file, appended or cut rows)."""
    size = p.stat().st_size
    h = hashlib.blake2b(digest_size=12)
    with open(p, "rb") as f:
        h.update(f.read(65536))
        if size > 65536:
            f.seek(max(65536, size - 65536))
            h.update(f.read())
    return f"{size}:{h.hexdigest()}"


class _JsonSource(_Source):
    """A .json/.jsonl file: read whole by read_rows (exactly as always), or, for JSONL,
    line by line from a byte offset (streaming)."""

    kind = "json"

    def __init__(self, p: Path):
        self.path, self.p = str(p), p
        self.nbytes = self.size = p.stat().st_size
        self.array = False  # a JSON array (read_rows' test: the first non-blank character is "[")
        with open(p, "rb") as f:
            while chunk := f.read(65536):
                if chunk.strip():
                    self.array = chunk.lstrip().startswith(b"[")
                    break

    def read_all(self) -> list[tuple[int, dict[str, Any]]]:
        return read_rows(self.p)

    def rows(self, cursor: Cursor | None = None):
        if self.array:
            raise DatasetError("streaming needs JSONL (one object per line); this file is a JSON array", self.path,
                               field="streaming")
        pos, line = cursor or self.start
        with open(self.p, "rb") as f:
            f.seek(pos)
            for raw in f:
                here, pos, line = (pos, line), pos + len(raw), line + 1
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except UnicodeDecodeError as e:
                    raise DatasetError(f"not UTF-8 text ({e.reason})", self.path, here[1]) from e
                except json.JSONDecodeError as e:
                    raise DatasetError(f"invalid JSON: {e.msg} (column {e.colno})", self.path, here[1]) from e
                if not isinstance(row, dict):
                    raise DatasetError(f"expected a JSON object, got {type(row).__name__}", self.path, here[1])
                yield here, (pos, line), here[1], row

    def fingerprint(self) -> str:
        return _file_fingerprint(self.p)


class _CsvSource(_Source):
    """A .csv (or tab-separated .tsv) file read with Python's csv module: every cell is a
    string (no type guessing: "NA", "5" and "" stay text), quoted cells may span lines,
    and each record keeps the line it starts on and its byte offset."""

    kind = "csv"

    def __init__(self, p: Path, delimiter: str):
        self.path, self.p, self.delimiter = str(p), p, delimiter
        self.nbytes = self.size = p.stat().st_size
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default (128 KiB per cell) is too small for texts
        header = None
        for start, nxt, _, record in self._records((0, 1)):
            header, self.start = record, nxt
            break
        if header is None:
            raise DatasetError("the CSV file is empty (no header)", self.path)
        header[0] = header[0].removeprefix("\ufeff")
        self.columns = header

    def _records(self, cursor: Cursor):
        pos, line = cursor
        state = {"pos": pos, "line": line}
        f = open(self.p, "rb")

        def lines():
            for raw in f:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DatasetError(f"not UTF-8 text ({e.reason})", self.path, state["line"]) from e
                state["pos"] += len(raw)
                state["line"] += 1
                yield text

        with f:
            f.seek(pos)
            reader = csv.reader(lines(), delimiter=self.delimiter)
            while True:
                here = (state["pos"], state["line"])
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DatasetError(f"invalid CSV: {e}", self.path, here[1]) from e
                if record:  # a blank line is no record
                    yield here, (state["pos"], state["line"]), here[1], record

    def rows(self, cursor: Cursor | None = None):
        columns = self.columns
        for here, nxt, n, record in self._records(cursor or self.start):
            if len(record) != len(columns):
                raise DatasetError(f"expected {len(columns)} cells (the header's), got {len(record)}", self.path, n)
            yield here, nxt, n, dict(zip(columns, record))

    def fingerprint(self) -> str:
        return _file_fingerprint(self.p)


class _ParquetSource(_Source):
    """A parquet file through pyarrow: batches of rows, from any row (whole row groups are
    skipped by their metadata)."""

    kind = "parquet"
    unit = "row"

    def __init__(self, p: Path):
        import pyarrow.parquet as pq

        self.path, self.p = str(p), p
        try:
            self.file = pq.ParquetFile(p)
        except Exception as e:  # pyarrow.ArrowInvalid and friends
            raise DatasetError(f"not a readable parquet file: {e}", self.path) from e
        self.size = self.file.metadata.num_rows
        self.nbytes = p.stat().st_size
        self.columns = list(self.file.schema_arrow.names)
        self.wanted: list[str] | None = None  # the columns to read (set once fields are known)

    def rows(self, cursor: Cursor | None = None):
        index = (cursor or self.start)[0]
        md, first, skip = self.file.metadata, 0, index
        while first < md.num_row_groups and skip >= md.row_group(first).num_rows:
            skip -= md.row_group(first).num_rows
            first += 1
        if first >= md.num_row_groups:
            return
        for batch in self.file.iter_batches(batch_size=256, row_groups=range(first, md.num_row_groups),
                                            columns=self.wanted, use_threads=False):
            rows = batch.to_pylist()
            if skip:
                rows, skip = rows[skip:], max(0, skip - len(rows))
            for row in rows:
                yield (index, index + 1), (index + 1, index + 2), index + 1, row
                index += 1

    def fingerprint(self) -> str:
        return _file_fingerprint(self.p)


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from `datasets` (the sidecar's stderr is a log), restored after."""
    import datasets
    from datasets.utils import logging as ds_logging

    was = datasets.are_progress_bars_disabled()
    level = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        if not was:
            datasets.enable_progress_bars()
        ds_logging.set_verbosity(level)


def _need_datasets(what: str, place: str):
    try:
        import datasets  # noqa: F401
    except ImportError as e:
        raise DatasetError(f"{what} needs the `datasets` package ({e}); pip install datasets", place) from e


def _pick_split(names: list[str], split: str | None, for_eval: bool, path: str, what: str) -> str:
    if split is not None:
        if split not in names:
            raise DatasetError(f"{what} has no split {split!r}; its splits are {names}", path, field="split")
        return split
    for name in ("validation", "test", "train") if for_eval else ("train",):
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise DatasetError(f"{what} has the splits {names}; choose one with split", path, field="split")


class _ArrowSource(_Source):
    """A `datasets.Dataset` (a save_to_disk folder, or a Hub dataset in the cache): Arrow
    files memory-mapped by `datasets`, read in batches from any row."""

    kind = "arrow"
    unit = "row"

    def __init__(self, ds: Any, path: str, kind: str, identity: str):
        self.ds, self.path, self.kind, self.identity = ds, path, kind, identity
        self.size = len(ds)
        self.columns = list(ds.column_names)
        self.nbytes = int(ds.data.nbytes)
        self.wanted: list[str] | None = None

    def rows(self, cursor: Cursor | None = None):
        index = (cursor or self.start)[0]
        if index >= len(self.ds):
            return
        ds = self.ds if self.wanted is None else self.ds.select_columns(self.wanted)
        for batch in ds.skip(index).iter(batch_size=256):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield (index, index + 1), (index + 1, index + 2), index + 1, dict(zip(keys, values))
                index += 1

    def fingerprint(self) -> str:
        return f"{self.identity}:{len(self.ds)}:{getattr(self.ds, '_fingerprint', '')}"


class _IterableSource(_Source):
    """A Hub dataset streamed by `datasets` (streaming=True: nothing is downloaded into the
    cache); a position is the number of rows read, resumed with IterableDataset.skip."""

    kind = "hub-stream"
    unit = "row"

    def __init__(self, ds: Any, path: str, identity: str, size: int | None):
        self.ds, self.path, self.identity, self.size = ds, path, identity, size
        self.columns = list(ds.column_names) if getattr(ds, "column_names", None) else None
        self.wanted: list[str] | None = None

    def rows(self, cursor: Cursor | None = None):
        index = (cursor or self.start)[0]
        ds = self.ds.skip(index) if index else self.ds
        if self.wanted is not None and self.columns is not None:
            ds = ds.select_columns(self.wanted)
        for row in ds:
            yield (index, index + 1), (index + 1, index + 2), index + 1, dict(row)
            index += 1

    def fingerprint(self) -> str:
        return self.identity


def _looks_like_hub_id(path: str) -> bool:
    return (_HUB_ID.fullmatch(path) is not None and not path.startswith(".")
            and not path.lower().endswith(_FILE_SUFFIXES))


def open_source(path: str | os.PathLike, split: str | None = None, config: str | None = None,
                revision: str | None = None, streaming: bool | None = None, for_eval: bool = False) -> _Source:
    """The source `path` names: a local file (by extension: .csv/.tsv, .parquet/.pq, else
    JSON/JSONL), a save_to_disk folder, or else, when it looks like one ("name" or
    "org/name" with no file extension), a Hub dataset id. `split` picks a DatasetDict's
    or Hub dataset's split (default "train"; for_eval: "validation", then "test", then
    "train"); `config` and `revision` are for Hub datasets. streaming=True streams a Hub
    dataset through `datasets` instead of downloading it into the cache."""
    p = Path(path)
    display = str(p)
    if p.exists():
        for key, value in (("config", config), ("revision", revision)):
            if value is not None:
                raise DatasetError(f"{key} is for Hub datasets; {display} is a local path", display, field=key)
        if p.is_dir():
            if not any((p / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
                raise DatasetError("data path is a folder but not a datasets save_to_disk folder (no "
                                   "dataset_dict.json or dataset_info.json in it)", display)
            _need_datasets("a save_to_disk folder", display)
            import datasets

            try:
                with _quiet_datasets():
                    ds = datasets.load_from_disk(str(p))
            except Exception as e:
                raise DatasetError(f"cannot load the save_to_disk folder: {e}", display) from e
            if isinstance(ds, datasets.DatasetDict):
                name = _pick_split(list(ds), split, for_eval, display, "the DatasetDict")
                ds, display = ds[name], f"{display}[{name}]"
            elif split is not None and split != "train":
                raise DatasetError(f"the folder holds one Dataset, not a DatasetDict with splits; split {split!r} "
                                   "does not apply", display, field="split")
            return _ArrowSource(ds, display, "save_to_disk", _file_fingerprint_dir(p))
        if split is not None and split != "train":
            raise DatasetError(f"a single file has one split (train); split {split!r} does not apply", display,
                               field="split")
        suffix = p.suffix.lower()
        if suffix in _CSV_SUFFIXES:
            return _CsvSource(p, _CSV_SUFFIXES[suffix])
        if suffix in _PARQUET_SUFFIXES:
            return _ParquetSource(p)
        return _JsonSource(p)
    if not _looks_like_hub_id(str(path)):  # as written: "./name" is a local path
        raise DatasetError("data file does not exist", display)
    return _open_hub(str(path), split, config, revision, bool(streaming), for_eval)


def _file_fingerprint_dir(p: Path) -> str:
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return hashlib.blake2b("|".join(f"{f.relative_to(p)}:{f.stat().st_size}" for f in files).encode(),
                           digest_size=12).hexdigest()


def _open_hub(name: str, split: str | None, config: str | None, revision: str | None, streaming: bool,
              for_eval: bool) -> _Source:
    _need_datasets(f"the Hub dataset {name!r}", name)
    import datasets

    cache = str(datasets.config.HF_DATASETS_CACHE)
    offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False))
    what = f"{name!r}" + (f" (config {config!r})" if config else "") + (f" at {revision!r}" if revision else "")
    try:
        with _quiet_datasets():
            if split is None and for_eval:
                builder = datasets.load_dataset_builder(name, config, revision=revision)
                split = _pick_split(list(builder.info.splits or {}) or ["train"], None, True, name,
                                    f"the Hub dataset {what}")
            split = split or "train"
            ds = datasets.load_dataset(name, config, split=split, revision=revision, streaming=streaming)
    except DatasetError:
        raise
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, ValueError) and "split" in msg.lower():
            raise DatasetError(f"the Hub dataset {what}: {msg}", name, field="split") from e
        raise DatasetError(
            f"not a local file or folder, and the datasets library could not load it as a Hub dataset {what}: "
            f"{type(e).__name__}: {msg} (datasets cache: {cache}; "
            + ("offline (HF_HUB_OFFLINE): only datasets already in that cache load)" if offline else
               "set HF_HUB_OFFLINE=1 to use only that cache, HF_TOKEN for private datasets)"), name) from e
    display = f"{name}[{split}]"
    identity = f"hub:{name}:{config}:{split}:{revision}"
    if streaming:
        splits = getattr(getattr(ds, "info", None), "splits", None) or {}
        size = splits[split].num_examples if split in splits and splits[split].num_examples else None
        return _IterableSource(ds, display, identity, size)
    return _ArrowSource(ds, display, "hub", identity)


# ---------------------------------------------------------------------------
# Fields, formats, templates

def _check_fields(fields: dict[str, str] | None, place: _Place) -> dict[str, str]:
    if not fields:
        return {}
    out = {}
    for ours, column in fields.items():
        if ours not in FIELDS:
            raise place.error(f"fields: unknown field {ours!r}; map any of {list(FIELDS)} to a column", None,
                              f"fields.{ours}")
        if column is None:
            continue
        if not isinstance(column, str) or not column:
            raise place.error(f"fields.{ours}: expected a column name, got {column!r}", None, f"fields.{ours}")
        out[ours] = column
    return out


def _check_columns(source: _Source, fields: dict[str, str]) -> None:
    """Tabular sources know their columns: a mapped column that is not one of them is an
    error before any row is read."""
    if source.columns is None:
        return
    for ours, column in fields.items():
        if column not in source.columns:
            raise DatasetError(f"fields maps it to the column {column!r}, which {source.path} does not have; its "
                               f"columns are {source.columns}", source.path, field=ours)


def _map_row(row: dict[str, Any], fields: dict[str, str], place: _Place, n: int) -> dict[str, Any]:
    if not fields:
        return row
    out = dict(row)
    for ours, column in fields.items():
        if column not in row:
            raise place.error(f"fields maps it to the column {column!r}, which this row does not have; the row has "
                              f"{sorted(row)}", n, ours)
        out[ours] = row[column]
    return out


def _detect_format(rows: list[tuple[int, dict]], place: _Place | Path, columns: list[str] | None = None) -> str:
    """The format of the first row; `columns`: the source's, named in the error (a
    tabular source reads only the columns that matter)."""
    place = place if isinstance(place, _Place) else _Place(str(place))
    line, row = rows[0]
    for fmt, key in (("chat", "messages"), ("instruction", "instruction"), ("text", "text")):
        if key in row:
            return fmt
    what = f"fields {sorted(row)}" if columns is None else f"the columns {columns}"
    raise place.error(f"cannot tell the format from {what}: expected 'text', 'instruction'/'output' or 'messages' "
                      "(or pass format=, or map columns with fields=)", line)


def _string(row: dict, key: str, place: _Place, line: int, required: bool = True) -> str:
    if key not in row or (row[key] is None and not required):
        if required:
            raise place.error("missing required field", line, key)
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise place.error(f"expected a string, got {type(value).__name__}", line, key)
    return value


def _segments(fmt: str, row: dict, line: int, place: _Place, tokenizer,
              template: str = "alpaca") -> list[tuple[str, bool]]:
    """The example as (text, is_response) pieces in order, special tokens as text."""
    if fmt == "text":
        return [(_string(row, "text", place, line), True)]
    if fmt == "instruction":
        instruction = _string(row, "instruction", place, line)
        inp = _string(row, "input", place, line, required=False)
        output = _string(row, "output", place, line)
        if template == "chat":  # Note [chat template on instruction rows]
            content = instruction + (f"\n\n{inp}" if inp else "")
            return _chat_segments([{"role": "user", "content": content}, {"role": "assistant", "content": output}],
                                  line, place, tokenizer, "instruction")
        return [(render_template(template, instruction, inp, tokenizer), False), (output, True)]
    if "messages" not in row:
        raise place.error("missing required field", line, "messages")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise place.error("expected a non-empty list of {role, content}", line, "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise place.error(f"expected an object, got {type(m).__name__}", line, f"messages[{i}]")
        for key in ("role", "content"):
            if key not in m:
                raise place.error("missing required field", line, f"messages[{i}].{key}")
            if not isinstance(m[key], str):
                raise place.error(f"expected a string, got {type(m[key]).__name__}", line, f"messages[{i}].{key}")
    return _chat_segments(messages, line, place, tokenizer, "messages")


def _chat_segments(messages: list[dict], line: int, place: _Place, tokenizer, key: str) -> list[tuple[str, bool]]:
    """Render growing prefixes; what the i-th assistant turn adds is a response."""

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors raised by the template itself (e.g. role order)
            raise place.error(f"the chat template failed: {e}", line, key) from e

    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[:i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise place.error("the tokenizer's chat template does not render conversations prefix by prefix; "
                              "cannot find the assistant tokens", line, key)
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = render(messages, False)
    if rest.startswith(done) and len(rest) > len(done):
        out.append((rest[len(done):], False))
    return [(text, resp) for text, resp in out if text]


# ---------------------------------------------------------------------------
# Tokenizing

@dataclass
class _Encoder:
    """How rows become token ids: the settings load_dataset resolved, shared by the
    in-memory and the streaming paths so both make the same examples."""

    tokenizer: Any
    fmt: str
    cutoff: int
    train_on_inputs: bool
    template: str
    fields: dict[str, str]
    packing: bool

    @property
    def special(self) -> bool:
        """bos and eos around each example: not for chat templates, which write their own."""
        return self.fmt != "chat" and not (self.fmt == "instruction" and self.template == "chat")

    def bos_eos(self) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None and self.special else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None and self.special else []
        return bos, eos

    def examples(self, rows: list[tuple[int, dict]], place: _Place, stats: dict[str, int]):
        """(ids, labels, line) per kept row (cut to cutoff); counts into `stats`."""
        rows = [(n, _map_row(row, self.fields, place, n)) for n, row in rows]
        segs = [_segments(self.fmt, row, n, place, self.tokenizer, self.template) for n, row in rows]
        flat = [text for s in segs for text, _ in s]
        encoded = self.tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []  # one batched call
        bos, eos = self.bos_eos()
        out = []
        k = 0
        stats["rows"] += len(rows)
        for (line, _), s in zip(rows, segs):
            ids, labels = list(bos), [IGNORE_INDEX] * len(bos)
            for _, is_response in s:
                piece = encoded[k]
                k += 1
                ids += piece
                labels += piece if (is_response or self.train_on_inputs) else [IGNORE_INDEX] * len(piece)
            ids += eos
            labels += eos  # eos is always learned: it is how the model learns to stop
            if len(ids) > self.cutoff:
                stats["truncated"] += 1
                ids, labels = ids[:self.cutoff], labels[:self.cutoff]
            # Position 0 is never a target: the model predicts token t+1 from tokens <= t.
            targets = len(labels) - 1 - labels[1:].count(IGNORE_INDEX)
            if targets == 0:
                stats["dropped"] += 1
                continue
            stats["examples"] += 1
            stats["tokens"] += len(ids)
            stats["target_tokens"] += targets
            out.append((ids, labels, line))
        return out

    def documents(self, rows: list[tuple[int, dict]], place: _Place, stats: dict[str, int]):
        """Packing: (ids, line) per row, the whole document (bos + text + eos, no cutoff)."""
        rows = [(n, _map_row(row, self.fields, place, n)) for n, row in rows]
        texts = [_string(row, "text", place, n) for n, row in rows]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        bos, eos = self.bos_eos()
        stats["rows"] += len(rows)
        out = []
        for (n, _), ids in zip(rows, encoded):
            doc = bos + ids + eos
            if not doc:
                stats["dropped"] += 1
                continue
            out.append((doc, n))
        return out


def _new_stats() -> dict[str, int]:
    return {"rows": 0, "examples": 0, "truncated": 0, "dropped": 0, "tokens": 0, "target_tokens": 0}


class _Packer:
    """Cuts a stream of documents into blocks of exactly `cutoff` tokens (Note [packing]).
    add() returns the blocks it completed: (ids, labels, position_ids, line of the
    block's first token); `left` counts the tokens of the unfinished block."""

    def __init__(self, cutoff: int):
        self.cutoff = cutoff
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.pos: list[int] = []
        self.line = 0

    @property
    def left(self) -> int:
        return len(self.ids)

    def add(self, doc: list[int], line: int, skip: int = 0, limit: int | None = None):
        """Adds doc[skip:] and returns (blocks, used): at most `limit` blocks; `used` is the
        index in doc where it stopped (len(doc) when all of it went in)."""
        blocks, i = [], skip
        while i < len(doc) and (limit is None or len(blocks) < limit):
            if not self.ids:
                self.line = line
            take = min(self.cutoff - len(self.ids), len(doc) - i)
            piece = doc[i:i + take]
            self.ids += piece
            self.labels += [IGNORE_INDEX] + piece[1:] if i == 0 else piece  # a document start is never a target
            self.pos += range(take)  # a piece starts a document or a block: either way at position 0
            i += take
            if len(self.ids) == self.cutoff:
                blocks.append((self.ids, self.labels, self.pos, self.line))
                self.ids, self.labels, self.pos = [], [], []
        return blocks, i


def _pack_stats(blocks: list, stats: dict[str, int]) -> None:
    stats["examples"] += len(blocks)
    stats["tokens"] += sum(len(b[0]) for b in blocks)
    stats["target_tokens"] += sum(len(b[1]) - 1 - b[1][1:].count(IGNORE_INDEX) for b in blocks)


@dataclass
class TokenizedDataset:
    """Tokenized examples; `input_ids[i]` and `labels[i]` are lists of the same length
    (and `position_ids[i]` too for packed blocks, Note [packing])."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    lines: list[int]  # the source line (or row) of each example (1-based); a block's: of its first token
    pad_id: int
    path: str
    shuffle: bool = True
    seed: int = 0
    position_ids: list[list[int]] | None = None  # packed blocks only

    streaming = False

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
            for pos in self.position_ids or ():
                h.update(array("q", pos).tobytes())
            cached = self.__dict__["_fingerprint"] = (len(self.input_ids), h.hexdigest())
        return cached[1]

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.input_ids[i] for i in indices], [self.labels[i] for i in indices], self.pad_id,
                       None if self.position_ids is None else [self.position_ids[i] for i in indices])

    def batches(self, batch_size: int, drop_last: bool = False, epochs: int | None = None,
                shuffle: bool | None = None) -> "BatchIterator":
        """An iterator of padded batches; endless by default (epochs=None)."""
        return BatchIterator(self, batch_size, drop_last=drop_last, epochs=epochs,
                             shuffle=self.shuffle if shuffle is None else shuffle)


@dataclass
class LoadedDataset:
    train: "TokenizedDataset | StreamingDataset"
    eval: TokenizedDataset | None
    # format, path, source, template, packed, streaming, cutoff, train_on_inputs,
    # train/eval counts (rows, examples, tokens, truncated, dropped, ...)
    info: dict[str, Any] = field(default_factory=dict)


def _tokenize(rows, enc: _Encoder, place: _Place) -> tuple[TokenizedDataset, dict[str, int]]:
    stats = _new_stats()
    pad = enc.tokenizer.pad_token_id if enc.tokenizer.pad_token_id is not None else enc.tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    if enc.packing:
        packer, blocks = _Packer(enc.cutoff), []
        for doc, line in enc.documents(rows, place, stats):
            blocks += packer.add(doc, line)[0]
        _pack_stats(blocks, stats)
        stats["dropped_tokens"] = packer.left
        ds = TokenizedDataset([b[0] for b in blocks], [b[1] for b in blocks], [b[3] for b in blocks], pad_id=pad,
                              path=place.path, position_ids=[list(b[2]) for b in blocks])
        return ds, stats
    examples = enc.examples(rows, place, stats)
    ds = TokenizedDataset([e[0] for e in examples], [e[1] for e in examples], [e[2] for e in examples],
                          pad_id=pad, path=place.path)
    return ds, stats


# ---------------------------------------------------------------------------
# Loading

def load_dataset(path: str | os.PathLike, tokenizer, format: str = "auto", cutoff: int = 256,
                 train_on_inputs: bool = False, seed: int = 0, shuffle: bool = True,
                 eval_fraction: float = 0.0, eval_path: str | os.PathLike | None = None, *,
                 split: str | None = None, config: str | None = None, revision: str | None = None,
                 fields: dict[str, str] | None = None, template: str | None = None, packing: bool = False,
                 streaming: bool | None = None, shuffle_buffer: int = 1024) -> LoadedDataset:
    """Reads and tokenizes a finetuning set (see the module doc for sources and formats).

    format: "auto" (default: from the first row's fields), "text", "instruction"
        (aliases "alpaca", "commonsense") or "chat".
    cutoff: the most tokens per example (default 256, as in LLM-Adapters); longer ones lose their end.
        With packing: the length of every block.
    train_on_inputs: False (default) = loss on responses only; True = on prompts too.
    seed, shuffle: the training order (see the module doc); the eval set keeps file order.
    eval_fraction: hold out this fraction of the rows (chosen with `seed`) as `eval`; 0 = none.
        Streaming: the head of the source instead (Note [streaming]).
    eval_path: a separate held-out source in the same format (exclusive with eval_fraction);
        a DatasetDict or Hub id gives its "validation" split, else "test", else "train".
    split, config, revision: which part of a save_to_disk DatasetDict or Hub dataset.
    fields: our field -> the source's column ({"instruction": "question", "output": "answer"}).
    template: how instruction rows become prompts (templates.py; default "alpaca").
    packing: text rows: full `cutoff`-token blocks, no padding (Note [packing]).
    streaming: read as training goes (Note [streaming]); None: when the source is over STREAM_BYTES.
    shuffle_buffer: streaming: the rows (blocks, with packing) of one shuffled window.
    """
    display = str(Path(path))
    fmt = _ALIASES.get(format, format)
    if fmt not in FORMATS and fmt != "auto":
        raise DatasetError(f"unknown format {format!r}; use 'auto' or one of {list(FORMATS)}", display, field="format")
    if not isinstance(cutoff, int) or cutoff < 2:
        raise DatasetError(f"cutoff must be an integer >= 2, got {cutoff!r}", display, field="cutoff")
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}", display, field="eval_fraction")
    if eval_fraction and eval_path is not None:
        raise DatasetError("give eval_fraction or eval_path, not both", display, field="eval_path")
    if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
        raise DatasetError(f"shuffle_buffer must be a positive integer, got {shuffle_buffer!r}", display,
                           field="shuffle_buffer")
    try:
        template = check_template(template or "alpaca")
    except TemplateError as e:
        raise DatasetError(str(e), display, field="template") from None
    fields = _check_fields(fields, _Place(display))
    if fmt == "auto" and fields:  # a mapping says what the rows are
        fmt = "chat" if "messages" in fields else "instruction" if "instruction" in fields else \
            "text" if "text" in fields else "auto"

    source = open_source(path, split, config, revision, streaming)
    place = source.place
    _check_columns(source, fields)
    _read_only_ours(source, fields)
    if streaming is None:
        streaming = source.nbytes > STREAM_BYTES and not getattr(source, "array", False)
    streaming = streaming or isinstance(source, _IterableSource)

    # The first rows: the format, and the head held out when streaming.
    if streaming:
        head = []
        for _, _, n, row in source.rows():
            head.append((n, row))
            break
    else:
        head = rows = source.read_all()
    if not head:
        raise DatasetError("the dataset is empty (no rows)", source.path)
    if fmt == "auto":
        fmt = _detect_format([(head[0][0], _map_row(head[0][1], fields, place, head[0][0]))], place, source.columns)
    if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("chat rows need a tokenizer with a chat template, and this one has none "
                           "(use an instruct model's tokenizer, or the 'instruction' format)", source.path,
                           field="messages")
    if fmt == "instruction" and template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError("the 'chat' template needs a tokenizer with a chat template, and this one has none; use "
                           "'alpaca', 'raw' or a format string", source.path, field="template")
    if packing and fmt != "text":
        raise DatasetError(f"packing applies to text rows (plain-text corpora); these are {fmt} rows, whose prompts "
                           "are masked per example", source.path, field="packing")
    if packing:
        from transformers import masking_utils  # noqa: F401 (transformers >= 4.53)

        if not hasattr(masking_utils, "find_packed_sequence_indices"):
            raise DatasetError("packing needs transformers >= 4.53 (attention kept within each document from "
                               "position_ids)", source.path, field="packing")
    enc = _Encoder(tokenizer, fmt, cutoff, train_on_inputs, template, fields, bool(packing))
    info: dict[str, Any] = {"format": fmt, "path": display, "source": source.kind, "cutoff": cutoff,
                            "train_on_inputs": train_on_inputs, "template": template if fmt == "instruction" else None,
                            "packed": bool(packing), "streaming": bool(streaming), "eval": None}

    eval_rows, eval_place = None, place
    if eval_path is not None:
        hub = not Path(eval_path).exists()  # the same Hub dataset's configuration and revision
        eval_source = open_source(eval_path, None, config if hub else None, revision if hub else None, False,
                                  for_eval=True)
        eval_place = eval_source.place
        _check_columns(eval_source, fields)
        _read_only_ours(eval_source, fields)
        eval_rows = eval_source.read_all()
        if not eval_rows:
            raise DatasetError("the eval dataset is empty (no rows)", eval_source.path)
    train_start = source.start
    if streaming:
        if eval_fraction:
            eval_rows, train_start = _head(source, eval_fraction)
        train = StreamingDataset(source, enc, train_start, seed=seed, shuffle=shuffle, window=shuffle_buffer)
        info["train"] = dict(train.first_stats)
    else:
        if eval_fraction:
            n_eval = max(1, round(eval_fraction * len(rows)))
            if n_eval >= len(rows):
                raise DatasetError(f"eval_fraction={eval_fraction} of {len(rows)} rows leaves no training rows",
                                   source.path, field="eval_fraction")
            held = set(torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n_eval].tolist())
            eval_rows = [r for i, r in enumerate(rows) if i in held]
            rows = [r for i, r in enumerate(rows) if i not in held]
        train, info["train"] = _tokenize(rows, enc, place)
        train.shuffle, train.seed = shuffle, seed
    if not len(train):
        _nothing_left(info["train"], enc, source.path, "")
    evalset = None
    if eval_rows is not None:
        evalset, info["eval"] = _tokenize(eval_rows, enc, eval_place)
        if not len(evalset):
            _nothing_left(info["eval"], enc, eval_place.path, "eval ")
        evalset.shuffle, evalset.seed = False, seed
    return LoadedDataset(train=train, eval=evalset, info=info)


def _read_only_ours(source: _Source, fields: dict[str, str]) -> None:
    """Tabular sources read only the columns that can matter (other columns may be large)."""
    if hasattr(source, "wanted") and source.columns is not None:
        needed = {fields.get(k, k) for k in FIELDS}
        source.wanted = [c for c in source.columns if c in needed] or None  # none: read all, for the errors


def _nothing_left(stats: dict[str, int], enc: _Encoder, path: str, what: str) -> None:
    if enc.packing:
        raise DatasetError(f"the {what}documents hold {stats.get('dropped_tokens', 0)} tokens, fewer than one block "
                           f"of cutoff={enc.cutoff} (packing drops the last partial block)", path, field="cutoff")
    raise DatasetError(f"no {what}example has a response token left after cutoff={enc.cutoff} "
                       f"({stats['dropped']} of {stats['rows']} rows dropped)", path)


def _head(source: _Source, fraction: float) -> tuple[list[tuple[int, dict]], Cursor]:
    """Streaming's held-out set: the rows starting in the first `fraction` of the source
    (bytes for JSONL/CSV, rows otherwise; at least one row), and where training starts."""
    if source.size is None:
        raise DatasetError("eval_fraction needs the size of the source, which this streamed dataset does not tell; "
                           "give eval_path instead", source.path, field="eval_fraction")
    begin = source.start[0]
    limit = begin + max(1, round(fraction * (source.size - begin)))
    rows = []
    for here, _, n, row in source.rows():
        if here[0] >= limit and rows:
            return rows, here
        rows.append((n, row))
    raise DatasetError(f"eval_fraction={fraction} holds out the whole source ({len(rows)} rows); no training rows "
                       "are left", source.path, field="eval_fraction")


# ---------------------------------------------------------------------------
# Streaming

class StreamingDataset:
    """Training examples read and tokenized as training goes, in shuffled windows
    (Note [streaming]). `first_stats` counts the first window, read at load time to
    check the rows and to fingerprint the data."""

    streaming = True

    def __init__(self, source: _Source, enc: _Encoder, start: Cursor, seed: int = 0, shuffle: bool = True,
                 window: int = 1024):
        self.source, self.enc, self.start = source, enc, tuple(start)
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self.path = source.path
        tok = enc.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.first_stats = _new_stats()
        first = self.fill(self.start, 0, self.first_stats)
        self._first = ((self.start, 0), first)
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps([source.fingerprint(), list(self.start), enc.fmt, enc.template, enc.cutoff,
                             enc.train_on_inputs, enc.packing, sorted(enc.fields.items()), window]).encode())
        for ids, labels, _, _ in first[0]:
            h.update(ids.tobytes())
            h.update(labels.tobytes())
        self.fingerprint = h.hexdigest()

    def __len__(self) -> int:
        """The examples of the first window: what is known without reading everything."""
        return len(self._first[1][0])

    def fill(self, cursor: Cursor, skip: int, stats: dict[str, int] | None = None):
        """The window at (cursor, skip): (examples in source order, next cursor, next skip,
        exhausted). An example is (ids, labels, position_ids or None, line), int32 arrays."""
        if self._first is not None and (tuple(cursor), skip) == self._first[0]:
            return self._first[1]
        stats = stats if stats is not None else _new_stats()
        return (self._fill_packed if self.enc.packing else self._fill_examples)(tuple(cursor), skip, stats)

    _first: Any = None

    def _read(self, cursor: Cursor, limit: int | None = None):
        """Rows from cursor, tokenized in chunks of 64: yields ([(n, row)], [their cursors],
        the cursor after them); stops after `limit` rows."""
        rows, cursors, read = [], [], 0
        for here, nxt, n, row in self.source.rows(cursor):
            rows.append((n, row))
            cursors.append(here)
            read += 1
            if len(rows) == 64 or read == limit:
                yield rows, cursors, nxt
                rows, cursors = [], []
                if read == limit:
                    return
        if rows:
            yield rows, cursors, nxt

    def _fill_examples(self, cursor: Cursor, skip: int, stats: dict[str, int]):
        out, nxt, read = [], cursor, 0
        for rows, _, nxt in self._read(cursor, self.window):
            for ids, labels, line in self.enc.examples(rows, self.source.place, stats):
                out.append((array("i", ids), array("i", labels), None, line))
            read += len(rows)
        return out, nxt, 0, read < self.window

    def _fill_packed(self, cursor: Cursor, skip: int, stats: dict[str, int]):
        packer, out = _Packer(self.enc.cutoff), []
        for rows, cursors, _ in self._read(cursor):
            docs = self.enc.documents(rows, self.source.place, stats)
            at = {n: c for (n, _), c in zip(rows, cursors)}
            for doc, line in docs:
                blocks, used = packer.add(doc, line, skip if at[line] == cursor else 0, self.window - len(out))
                out += [(array("i", b[0]), array("i", b[1]), array("i", b[2]), b[3]) for b in blocks]
                _pack_stats(blocks, stats)
                if len(out) == self.window:
                    # The next window continues in this document (or re-reads it and skips all of it).
                    return out, at[line], used, False
        stats["dropped_tokens"] = stats.get("dropped_tokens", 0) + packer.left
        return out, cursor, 0, True

    def progress(self, cursor: Cursor, nxt: Cursor, taken: int, size: int) -> float:
        """How far into the epoch (0..1) a position is, by bytes or rows of the source."""
        total = None if self.source.size is None else self.source.size - self.start[0]
        if not total:
            return 0.0
        done = cursor[0] - self.start[0] + (nxt[0] - cursor[0]) * (taken / size if size else 1.0)
        return min(1.0, max(0.0, done / total))

    def batches(self, batch_size: int, drop_last: bool = False, epochs: int | None = None,
                shuffle: bool | None = None) -> "StreamingBatchIterator":
        return StreamingBatchIterator(self, batch_size, shuffle=self.shuffle if shuffle is None else shuffle,
                                      epochs=epochs)

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        tensors = [torch.frombuffer(bytearray(e[0]), dtype=torch.int32).long() for e in examples]
        labels = [torch.frombuffer(bytearray(e[1]), dtype=torch.int32).long() for e in examples]
        positions = None if examples[0][2] is None else \
            [torch.frombuffer(bytearray(e[2]), dtype=torch.int32).long() for e in examples]
        return collate(tensors, labels, self.pad_id, positions)


class StreamingBatchIterator:
    """Batches of a StreamingDataset: window by window, each window shuffled on its own
    (Note [streaming]); a batch never spans two epochs. `state_dict()` is the position
    {epoch, cursor, skip, taken} (plus what it must match on resume); load_state_dict()
    continues exactly there, re-reading one window."""

    def __init__(self, dataset: StreamingDataset, batch_size: int, shuffle: bool = True,
                 epochs: int | None = None):
        if batch_size < 1:
            raise DatasetError(f"batch_size must be >= 1, got {batch_size}", field="batch_size")
        self.dataset, self.batch_size, self.shuffle, self.epochs = dataset, batch_size, shuffle, epochs
        self.epoch = 0
        self.cursor: Cursor = dataset.start  # where the window being read starts
        self.skip = 0  # packing: tokens of the cursor's document that the previous window used
        self.taken = 0  # examples of this window already returned
        self._window: tuple | None = None  # (examples in visiting order, next cursor, next skip, exhausted)
        self._seen = 0  # examples returned in this epoch (an epoch with none is an error)

    @property
    def index(self) -> int:
        return self.taken

    def _load(self):
        if self._window is None:
            examples, nxt, nskip, exhausted = self.dataset.fill(self.cursor, self.skip)
            if self.shuffle and len(examples) > 1:
                g = torch.Generator().manual_seed(_window_seed(self.dataset.seed, self.epoch, self.cursor, self.skip))
                examples = [examples[i] for i in torch.randperm(len(examples), generator=g).tolist()]
            self._window = (examples, nxt, nskip, exhausted)
        return self._window

    @property
    def progress(self) -> float:
        """Epochs read so far (fractional: by bytes or rows of the source)."""
        if self._window is None:
            return self.epoch + self.dataset.progress(self.cursor, self.cursor, 0, 1)
        examples, nxt, _, _ = self._window
        return self.epoch + self.dataset.progress(self.cursor, nxt, self.taken, len(examples))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        out: list = []
        while len(out) < self.batch_size:
            examples, nxt, nskip, exhausted = self._load()
            if self.taken < len(examples):
                take = examples[self.taken:self.taken + self.batch_size - len(out)]
                out += take
                self.taken += len(take)
                self._seen += len(take)
                continue
            if not exhausted:  # the next window
                self.cursor, self.skip, self.taken, self._window = nxt, nskip, 0, None
                continue
            if out:  # the epoch's last batch is short
                break
            if self._seen == 0:
                raise DatasetError("a whole pass over the source gave no training example (every row dropped)",
                                   self.dataset.path)
            self.epoch, self.cursor, self.skip, self.taken, self._window = \
                self.epoch + 1, self.dataset.start, 0, 0, None
            self._seen = 0
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
        return self.dataset.collate(out)

    def with_batch_size(self, batch_size: int) -> "StreamingBatchIterator":
        """The same position, another batch size."""
        it = StreamingBatchIterator(self.dataset, batch_size, self.shuffle, self.epochs)
        it.epoch, it.cursor, it.skip, it.taken, it._window, it._seen = \
            self.epoch, self.cursor, self.skip, self.taken, self._window, self._seen
        return it

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        return {"streaming": True, "epoch": self.epoch, "cursor": list(self.cursor), "skip": self.skip,
                "taken": self.taken, "batch_size": self.batch_size, "seed": ds.seed, "shuffle": self.shuffle,
                "window": ds.window, "fingerprint": ds.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues at `state` (a state_dict(), maybe through JSON). Checks everything
        first: a DatasetError (field "data_state.<key>") leaves the position unchanged."""
        if not isinstance(state, dict):
            raise DatasetError(f"data position: expected a map, got {type(state).__name__}", field="data_state")
        if not state.get("streaming"):
            raise DatasetError("data position: the checkpoint's position is for a dataset loaded in memory, and this "
                               "one streams; load it the same way (streaming: false)", field="data_state.streaming")
        for key in ("epoch", "skip", "taken"):
            v = state.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise DatasetError(f"data position: {key} must be a non-negative integer, got {v!r}",
                                   field=f"data_state.{key}")
        cursor = state.get("cursor")
        if not (isinstance(cursor, (list, tuple)) and len(cursor) == 2
                and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cursor)):
            raise DatasetError(f"data position: cursor must be [position, line], got {cursor!r}",
                               field="data_state.cursor")
        mine = {"seed": self.dataset.seed, "shuffle": self.shuffle, "window": self.dataset.window,
                "fingerprint": self.dataset.fingerprint}
        for key, here in mine.items():
            if key in state and state[key] != here:
                what = "the data differ (another file, or other tokenizer or settings)" if key == "fingerprint" \
                    else f"{key}={state[key]!r} in the checkpoint but {here!r} here"
                raise DatasetError(f"data position: {what}; resuming would not continue the same data order",
                                   field=f"data_state.{key}")
        self.epoch, self.cursor, self.skip, self.taken = state["epoch"], tuple(cursor), state["skip"], state["taken"]
        self._window, self._seen = None, state["taken"]


def _window_seed(seed: int, epoch: int, cursor: Cursor, skip: int) -> int:
    h = hashlib.blake2b(f"{seed}:{epoch}:{cursor[0]}:{skip}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


# ---------------------------------------------------------------------------
# Batching

def collate(input_ids: list, labels: list, pad_id: int, position_ids: list | None = None) -> dict[str, torch.Tensor]:
    """Right-pads to the longest example: padding has attention_mask 0 and label -100.
    position_ids (packed blocks, which all have the same length) come along as
    "position_ids". Rows may be lists or 1-D tensors."""
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)  # (B, T)
    lab = torch.full((len(input_ids), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)  # (B, T)
    for i, (x, y) in enumerate(zip(input_ids, labels)):
        ids[i, :len(x)] = torch.as_tensor(x)
        lab[i, :len(y)] = torch.as_tensor(y)
        mask[i, :len(x)] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": lab}
    if position_ids is not None:
        pos = torch.zeros((len(input_ids), width), dtype=torch.long)  # (B, T)
        for i, p in enumerate(position_ids):
            pos[i, :len(p)] = torch.as_tensor(p)
        out["position_ids"] = pos
    return out


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

    @property
    def progress(self) -> float:
        """Epochs read so far (fractional)."""
        return self.epoch + self.index / max(1, len(self.dataset))

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

    def with_batch_size(self, batch_size: int) -> "BatchIterator":
        """The same position, another batch size."""
        it = BatchIterator(self.dataset, batch_size, self.shuffle, self.drop_last, self.epochs)
        it.epoch, it.index = self.epoch, self.index
        return it

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
        if state.get("streaming"):
            raise DatasetError("data position: the checkpoint's position is for a streamed dataset, and this one is "
                               "loaded in memory; load it the same way (streaming: true)",
                               field="data_state.streaming")
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
