"""Data beyond local JSON/JSONL: CSV, parquet, save_to_disk folders and Hub datasets
(through `datasets` and its cache), column mapping, named templates, packing and
streaming (docs/data.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanotune import templates
from nanotune.data import IGNORE_INDEX, DatasetError, load_dataset
from nanotune.session import Session
from nanotune.training import _loss_sum

ROOT = Path(__file__).resolve().parents[2]
QA = [{"question": f"Add {i} and {i + 1}.", "answer": f"{2 * i + 1}", "context": "" if i % 2 else f"i={i}"}
      for i in range(24)]
FIELDS = {"instruction": "question", "output": "answer", "input": "context"}


def docs(n):
    return [{"text": f"Document {i}: " + "the cat sat on a mat " * (i % 5 + 1)} for i in range(n)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its lock files and caches in a temp dir, never in ~/.cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-datasets"


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)  # several row groups
    return path


def write_csv(path, rows, header=None):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def train_steps(session, steps=2, **step):
    session.create_optimizer(name="adamw", lr=1e-3)
    return [session.train_step(lr=1e-3, micro_batch=4, **step) for _ in range(steps)]


def write_source(tmp_path, kind, rows):
    """``rows`` as a parquet file, a CSV file or a save_to_disk folder under tmp_path."""
    if kind == "parquet":
        return write_parquet(tmp_path / "qa.parquet", rows)
    if kind == "csv":
        return write_csv(tmp_path / "qa.csv", rows)
    import datasets

    path = tmp_path / "qa-disk"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path

# --------------------------------------------------------------------------- sources

@pytest.mark.parametrize("kind", ["parquet", "csv", "save_to_disk"])
def test_trains_from_parquet_csv_and_save_to_disk(tiny_dir, tmp_path, kind):
    path = write_source(tmp_path, kind, QA)
    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    r = s.load_dataset(path=str(path), fields=FIELDS, eval_fraction=0.25, seed=1)
    assert (r.format, r.train_examples, r.eval_examples, r.template, r.packed, r.streaming) == \
        ("instruction", 18, 6, "alpaca", False, False)
    steps = train_steps(s)
    assert all(torch.isfinite(torch.tensor(x.loss)) for x in steps) and steps[1].step == 1
    assert s.evaluate(batch_size=4).tokens > 0
    # The same examples whatever the container: the JSONL twin tokenizes identically.
    twin = tmp_path / "qa.jsonl"
    twin.write_text("".join(json.dumps(r) + "\n" for r in QA))
    a = load_dataset(path, s.loaded.tokenizer, fields=FIELDS, shuffle=False)
    b = load_dataset(twin, s.loaded.tokenizer, fields=FIELDS, shuffle=False)
    assert a.train.input_ids == b.train.input_ids and a.train.labels == b.train.labels


def test_csv_cells_are_text_and_rows_keep_their_lines(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('\ufefftext,id\n"two\nlines",1\nNA,2\n\n5,3\n', encoding="utf-8")
    data = load_dataset(path, tiny_tokenizer, shuffle=False)
    assert data.info["source"] == "csv" and data.train.lines == [2, 4, 6]  # a quoted cell spans lines 2-3
    texts = [tiny_tokenizer.decode(ids[1:-1]) for ids in data.train.input_ids]
    assert texts == ["two\nlines", "NA", "5"]  # no type guessing: "NA" and "5" stay text
    path.write_text("text,id\na,1\nb,2,3\n")
    with pytest.raises(DatasetError, match="expected 2 cells") as e:
        load_dataset(path, tiny_tokenizer)
    assert (e.value.path, e.value.line) == (str(path), 3) and str(e.value).startswith(f"{path}:3: ")


def test_a_mapped_column_that_is_missing_names_file_column_and_columns(tiny_tokenizer, tmp_path, write_jsonl):
    path = write_csv(tmp_path / "qa.csv", QA)
    with pytest.raises(DatasetError) as e:
        load_dataset(path, tiny_tokenizer, fields={"instruction": "prompt", "output": "answer"})
    assert (e.value.path, e.value.field) == (str(path), "instruction")
    assert "'prompt'" in str(e.value) and "['question', 'answer', 'context']" in str(e.value)
    parquet = write_parquet(tmp_path / "qa.parquet", QA)
    with pytest.raises(DatasetError, match="'reply'.*columns are") as e:
        load_dataset(parquet, tiny_tokenizer, fields={"instruction": "question", "output": "reply"})
    assert (e.value.path, e.value.field) == (str(parquet), "output")
    # JSONL has no columns up front: the row that lacks it is named.
    rows = write_jsonl([{"q": "a", "a": "b"}, {"q": "c"}])
    with pytest.raises(DatasetError, match="column 'a'.*the row has \\['q'\\]") as e:
        load_dataset(rows, tiny_tokenizer, fields={"instruction": "q", "output": "a"})
    assert (e.value.line, e.value.field) == (2, "output")
    with pytest.raises(DatasetError, match="unknown field 'question'") as e:
        load_dataset(rows, tiny_tokenizer, fields={"question": "q"})


def test_rows_without_lines_are_named_by_row(tiny_tokenizer, tmp_path):
    rows = [{"text": "fine"}] * 4 + [{"text": None}]
    path = write_parquet(tmp_path / "t.parquet", rows)
    with pytest.raises(DatasetError, match="expected a string, got NoneType") as e:
        load_dataset(path, tiny_tokenizer)
    assert (e.value.path, e.value.row, e.value.line, e.value.field) == (str(path), 5, None, "text")
    assert str(e.value).startswith(f"{path}: row 5: field 'text': ")
    assert e.value.data == {"path": str(path), "row": 5, "field": "text"}


def test_save_to_disk_splits(tiny_tokenizer, tmp_path):
    import datasets

    path = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(docs(12)),
                          "test": datasets.Dataset.from_list(docs(3))}).save_to_disk(str(path))
    data = load_dataset(path, tiny_tokenizer, eval_path=path)  # eval: the folder's "test" split
    assert (len(data.train), len(data.eval), data.info["source"]) == (12, 3, "save_to_disk")
    assert len(load_dataset(path, tiny_tokenizer, split="test").train) == 3
    with pytest.raises(DatasetError, match="no split 'validation'; its splits are \\['train', 'test'\\]") as e:
        load_dataset(path, tiny_tokenizer, split="validation")
    assert e.value.field == "split"
    with pytest.raises(DatasetError, match="not a datasets save_to_disk folder"):
        load_dataset(tmp_path, tiny_tokenizer)
    with pytest.raises(DatasetError, match="config is for Hub datasets") as e:
        load_dataset(path, tiny_tokenizer, config="default")


def build_hub_cache(cache: Path, repo_id: str, splits: dict, tmp_path: Path) -> None:
    """The datasets cache exactly as `load_dataset(repo_id)` leaves it after downloading a
    parquet Hub dataset: <cache>/<org>___<name>/default/0.0.0/<commit>/ with
    dataset_info.json and <name>-<split>.arrow. Built by datasets' own Parquet builder,
    then put under the Hub dataset's name (what the Hub module factory passes it)."""
    import shutil

    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    files = {split: [str(write_parquet(tmp_path / f"{split}.parquet", rows))] for split, rows in splits.items()}
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name=name, hash="0123456789abcdef",
                      config_name="default", data_files=DataFilesDict.from_patterns(files, base_path=str(tmp_path)))
    builder.download_and_prepare()
    target = cache / f"{org}___{name}" / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(builder.cache_dir, target / "0123456789abcdef")


def test_a_hub_dataset_loads_offline_from_the_datasets_cache(tiny_tokenizer, tmp_path, datasets_cache, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    build_hub_cache(datasets_cache, "nanotune-test/tiny_qa", {"train": QA[:20], "test": QA[20:]}, tmp_path)
    data = load_dataset("nanotune-test/tiny_qa", tiny_tokenizer, fields=FIELDS, eval_path="nanotune-test/tiny_qa")
    assert (len(data.train), len(data.eval), data.info["source"]) == (20, 4, "hub")
    assert len(load_dataset("nanotune-test/tiny_qa", tiny_tokenizer, fields=FIELDS, split="test").train) == 4
    with pytest.raises(DatasetError, match="split") as e:
        load_dataset("nanotune-test/tiny_qa", tiny_tokenizer, fields=FIELDS, split="validation")
    assert e.value.field == "split"
    # An id that is in no cache: the error names the id, the cache and offline mode.
    with pytest.raises(DatasetError) as e:
        load_dataset("nanotune-test/missing", tiny_tokenizer)
    msg = str(e.value)
    assert e.value.path == "nanotune-test/missing" and msg.startswith("nanotune-test/missing: ")
    assert "Hub dataset 'nanotune-test/missing'" in msg and str(datasets_cache) in msg and "HF_HUB_OFFLINE" in msg


def test_a_missing_local_file_is_not_taken_for_a_hub_id(tiny_tokenizer, tmp_path):
    for path in (tmp_path / "nope.parquet", "data/train.csv", "./x"):
        with pytest.raises(DatasetError, match="data file does not exist") as e:
            load_dataset(path, tiny_tokenizer)
        assert e.value.path == str(Path(path))  # as before: the path normalized ("./x" is "x")


# --------------------------------------------------------------------------- templates

@pytest.mark.parametrize("template", ["alpaca", "raw", "Q: {instruction} ({input})\nA:"])
def test_instruction_rows_render_with_the_named_template(tiny_tokenizer, write_jsonl, template):
    tok = tiny_tokenizer
    row = {"instruction": "Add 2 and 3.", "input": "quickly", "output": "5"}
    data = load_dataset(write_jsonl([row]), tok, template=template)
    assert data.info["template"] == template
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    prompt = templates.render(template, row["instruction"], row["input"], tok)
    n = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ids[:n] == [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    assert labels[:n] == [IGNORE_INDEX] * n and tok.decode(ids[n:]) == "5</s>"


def test_the_chat_template_trains_on_the_prompt_generation_uses(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    row = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
    data = load_dataset(write_jsonl([row]), tok, template="chat")
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    prompt = templates.render("chat", row["instruction"], tokenizer=tok)  # what Session.generate sends
    n = labels.index(next(y for y in labels if y != IGNORE_INDEX))
    assert tok.decode(ids[:n]) == prompt and ids.count(tok.bos_token_id) == 1  # the template's own bos only
    assert tok.decode(ids[n:]).startswith("5</s>")


def test_template_errors_name_the_field(tiny_dir, tiny_tokenizer, write_jsonl):
    from transformers import AutoTokenizer

    path = write_jsonl([{"instruction": "a", "output": "b"}])
    with pytest.raises(DatasetError, match="only \\{instruction\\} and \\{input\\}") as e:
        load_dataset(path, tiny_tokenizer, template="Q: {instruction} {question}")
    assert (e.value.field, e.value.path) == ("template", str(path))
    plain = AutoTokenizer.from_pretrained(tiny_dir)
    plain.chat_template = None
    with pytest.raises(DatasetError, match="'chat' template needs a tokenizer with a chat template") as e:
        load_dataset(path, plain, template="chat")
    assert e.value.field == "template"
    assert load_dataset(write_jsonl(docs(2), "t.jsonl"), tiny_tokenizer, template="raw").info["template"] is None


# --------------------------------------------------------------------------- packing

def segments(row_positions):
    starts = [i for i, p in enumerate(row_positions) if p == 0] + [len(row_positions)]
    return list(zip(starts, starts[1:]))


def test_packing_makes_full_blocks_with_document_starts_masked(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    rows = docs(40)
    data = load_dataset(write_jsonl(rows), tok, packing=True, cutoff=48, shuffle=False)
    ds, info = data.train, data.info["train"]
    assert data.info["packed"] and all(len(x) == 48 for x in ds.input_ids) and len(ds) == info["examples"]
    stream = [t for r in rows for t in [tok.bos_token_id] + tok(r["text"], add_special_tokens=False)["input_ids"]
              + [tok.eos_token_id]]
    assert info["tokens"] + info["dropped_tokens"] == len(stream) and info["dropped_tokens"] < 48
    assert [t for x in ds.input_ids for t in x] == stream[:len(ds) * 48]  # documents in order, cut anywhere
    batch = ds.collate(list(range(len(ds))))
    assert batch["attention_mask"].all() and batch["input_ids"].shape == (len(ds), 48)  # no padding
    for ids, labels, pos in zip(ds.input_ids, ds.labels, ds.position_ids):
        for i, (t, y, p) in enumerate(zip(ids, labels, pos)):
            if t == tok.bos_token_id:  # a document starts: no loss from the previous one, positions restart
                assert y == IGNORE_INDEX and p == 0
            elif p == 0:
                assert i == 0  # else positions restart only at the block start (a document continues)
            else:
                assert y == t


def test_a_packed_blocks_loss_is_the_sum_of_its_documents_losses(tiny, write_jsonl):
    """No token attends across a document boundary: the block's summed loss equals the
    documents' (pieces') losses computed each on its own."""
    data = load_dataset(write_jsonl(docs(30)), tiny.tokenizer, packing=True, cutoff=64, shuffle=False)
    ds = data.train
    batch = ds.collate([0, 1, 2])
    tiny.model.eval()
    with torch.no_grad():
        packed = _loss_sum(tiny.model, batch)
        alone = torch.zeros(())
        for r in range(3):
            for a, b in segments(ds.position_ids[r]):
                piece = {"input_ids": batch["input_ids"][r:r + 1, a:b], "labels": batch["labels"][r:r + 1, a:b],
                         "attention_mask": torch.ones(1, b - a, dtype=torch.long)}
                alone += _loss_sum(tiny.model, piece)
        leaky = _loss_sum(tiny.model, {k: v for k, v in batch.items() if k != "position_ids"})
    assert sum(len(segments(ds.position_ids[r])) for r in range(3)) > 6  # several documents per block
    assert torch.allclose(packed, alone, rtol=1e-5), (packed, alone)
    assert not torch.allclose(packed, leaky, rtol=1e-3)  # attending across documents would change it


def test_packed_training_and_evaluation_in_a_session(tiny_dir, write_jsonl):
    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    r = s.load_dataset(path=str(write_jsonl(docs(60))), packing=True, cutoff=32, eval_fraction=0.2)
    assert r.packed and r.format == "text" and r.template is None
    steps = train_steps(s, 2)
    assert all(x.tokens > 0 for x in steps) and all(x.input_tokens == 4 * 32 for x in steps)
    assert s.evaluate(batch_size=4).tokens > 0


def test_packing_errors(tiny_tokenizer, write_jsonl):
    with pytest.raises(DatasetError, match="packing applies to text rows") as e:
        load_dataset(write_jsonl([{"instruction": "a", "output": "b"}]), tiny_tokenizer, packing=True)
    assert e.value.field == "packing"
    with pytest.raises(DatasetError, match="fewer than one block of cutoff=256") as e:
        load_dataset(write_jsonl(docs(2)), tiny_tokenizer, packing=True)
    assert e.value.field == "cutoff"


# --------------------------------------------------------------------------- streaming

def test_streamed_batches_cover_every_row_once_per_epoch_and_resume_exactly(tiny_tokenizer, write_jsonl):
    rows = [{"text": f"row {i}"} for i in range(50)]
    data = load_dataset(write_jsonl(rows), tiny_tokenizer, streaming=True, shuffle_buffer=16, seed=2)
    assert data.info["streaming"] and data.info["train"]["examples"] == 16  # what the first window read
    it = data.train.batches(4)
    seen = []
    while it.epoch == 0 or not seen:
        batch = next(it)
        if it.epoch == 0:
            seen += [tiny_tokenizer.decode(ids[1:m.sum() - 1]) for ids, m in zip(batch["input_ids"],
                                                                                  batch["attention_mask"])]
        if len(seen) == 50:
            break
    assert sorted(seen) == sorted(r["text"] for r in rows) and seen[:16] != [r["text"] for r in rows[:16]]
    assert it.progress == pytest.approx(1.0)
    # A position in the middle of a window, through JSON, continues the same stream.
    it = data.train.batches(3)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    want = [next(it) for _ in range(30)]  # across windows and into the next epochs
    again = load_dataset(write_jsonl(rows), tiny_tokenizer, streaming=True, shuffle_buffer=16, seed=2)
    resumed = again.train.batches(3)
    resumed.load_state_dict(state)
    for a, b in zip(want, [next(resumed) for _ in range(30)]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert it.epoch >= 1 and it.state_dict() == resumed.state_dict()
    with pytest.raises(DatasetError, match="seed=2 in the checkpoint but 3 here"):
        load_dataset(write_jsonl(rows), tiny_tokenizer, streaming=True, shuffle_buffer=16,
                     seed=3).train.batches(3).load_state_dict(state)
    with pytest.raises(DatasetError, match="for a streamed dataset") as e:
        load_dataset(write_jsonl(rows), tiny_tokenizer).train.batches(3).load_state_dict(state)
    assert e.value.field == "data_state.streaming"


def test_streamed_packing_makes_the_in_memory_blocks(tiny_tokenizer, write_jsonl):
    path = write_jsonl(docs(40))
    memory = load_dataset(path, tiny_tokenizer, packing=True, cutoff=40, shuffle=False).train
    streamed = load_dataset(path, tiny_tokenizer, packing=True, cutoff=40, shuffle=False, streaming=True,
                            shuffle_buffer=5).train
    it = streamed.batches(4)
    blocks = []
    while it.epoch == 0:
        batch = next(it)
        if it.epoch == 0:
            blocks += batch["input_ids"].tolist()
            positions = batch["position_ids"]
    assert blocks == memory.input_ids and positions.shape[1] == 40


def test_streamed_rows_are_checked_when_read_and_errors_name_the_line(tiny_tokenizer, write_jsonl):
    rows = [{"text": f"row {i}"} for i in range(40)] + ['{"text": 7}']
    data = load_dataset(write_jsonl(rows), tiny_tokenizer, streaming=True, shuffle_buffer=8)  # reads rows 1-8
    it = data.train.batches(8)
    with pytest.raises(DatasetError, match="expected a string, got int") as e:
        for _ in range(10):
            next(it)
    assert (e.value.line, e.value.field) == (41, "text")
    array = write_jsonl([], "a.json")
    array.write_text(json.dumps(docs(3)))
    with pytest.raises(DatasetError, match="streaming needs JSONL") as e:
        load_dataset(array, tiny_tokenizer, streaming=True)
    assert e.value.field == "streaming"


def test_streaming_holds_out_the_head_of_the_file(tiny_tokenizer, write_jsonl):
    rows = [{"text": f"row {i} " + "x" * (i % 3)} for i in range(100)]
    data = load_dataset(write_jsonl(rows), tiny_tokenizer, streaming=True, eval_fraction=0.1, shuffle=False)
    n = len(data.eval)
    assert 5 <= n <= 15 and data.eval.lines == list(range(1, n + 1))  # the rows in the first 10% of the bytes
    first = next(data.train.batches(1))["input_ids"][0]
    assert tiny_tokenizer.decode(first[1:-1]) == rows[n]["text"]  # training starts after them


def test_a_streamed_run_resumes_from_a_checkpoint(tiny_dir, tmp_path, write_jsonl):
    path = str(write_jsonl([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(60)]))

    def session():
        s = Session(device="cpu")
        s.load_model(path="tiny-llama")
        r = s.load_dataset(path=path, streaming=True, eval_fraction=0.1, seed=4)
        s.create_optimizer(name="adamw", lr=1e-3)
        return s, r

    s, r = session()
    assert r.streaming and r.template == "alpaca" and r.eval_examples > 0
    for _ in range(3):
        s.train_step(lr=1e-2, micro_batch=4, grad_accum=2)
    s.save_checkpoint(path=str(tmp_path / "ckpt"))
    tail = [s.train_step(lr=1e-2, micro_batch=4, grad_accum=2) for _ in range(5)]  # into the second epoch
    again, _ = session()
    again.load_checkpoint(path=str(tmp_path / "ckpt"))
    resumed = [again.train_step(lr=1e-2, micro_batch=4, grad_accum=2) for _ in range(5)]
    assert [x.loss for x in resumed] == [x.loss for x in tail]
    assert [x.epoch for x in resumed] == [x.epoch for x in tail] and tail[-1].epoch > 1


@pytest.mark.parametrize("kind", ["parquet", "csv", "save_to_disk"])
def test_large_tabular_sources_stream_and_resume(tiny_tokenizer, tmp_path, monkeypatch, kind):
    """Any source over STREAM_BYTES streams (made tiny here): an epoch gives the examples
    of the in-memory load, and a position resumes from a row of a later row group
    (parquet), a byte offset (CSV) or a row index (save_to_disk)."""
    import nanotune.data as data_module

    rows = [dict(r, question=f"{r['question']} (#{i})") for i, r in enumerate(QA * 3)]
    path = write_source(tmp_path, kind, rows)
    memory = load_dataset(path, tiny_tokenizer, fields=FIELDS, shuffle=False)
    monkeypatch.setattr(data_module, "STREAM_BYTES", 100)
    data = load_dataset(path, tiny_tokenizer, fields=FIELDS, shuffle_buffer=10, seed=1)
    assert data.info["streaming"] and data.info["source"] == memory.info["source"]
    it = data.train.batches(4)
    epoch = []
    while it.epoch == 0:
        batch = next(it)
        if it.epoch == 0:
            epoch += [ids[:m.sum()].tolist() for ids, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert sorted(epoch) == sorted(memory.train.input_ids) and len(epoch) == len(rows)
    it = data.train.batches(4)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))
    assert state["cursor"][0] > 0 and state["taken"] > 0  # inside a later window
    want = [next(it) for _ in range(25)]
    resumed = load_dataset(path, tiny_tokenizer, fields=FIELDS, shuffle_buffer=10, seed=1).train.batches(4)
    resumed.load_state_dict(state)
    for a, b in zip(want, [next(resumed) for _ in range(25)]):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_hub_dataset_streams_from_the_cache(tiny_tokenizer, tmp_path, datasets_cache, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    build_hub_cache(datasets_cache, "nanotune-test/tiny_docs", {"train": docs(30)}, tmp_path)
    data = load_dataset("nanotune-test/tiny_docs", tiny_tokenizer, streaming=True, shuffle_buffer=8, shuffle=False,
                        eval_fraction=0.1)
    assert (data.info["source"], data.info["streaming"], len(data.eval)) == ("hub-stream", True, 3)
    it = data.train.batches(9)
    texts = []
    for _ in range(3):
        batch = next(it)
        texts += [tiny_tokenizer.decode(ids[1:m.sum() - 1]) for ids, m in zip(batch["input_ids"],
                                                                               batch["attention_mask"])]
    assert texts == [d["text"] for d in docs(30)[3:]] and it.progress == pytest.approx(1.0)


RSS_SCRIPT = r"""
import json, sys, time
from nanotune.session import Session

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

s = Session(device="cpu")
s.load_model(path="tiny-llama")
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts at the current RSS
t0 = time.perf_counter()
r = s.load_dataset(path=sys.argv[1], eval_fraction=0.0005)
s.create_optimizer(name="adamw", lr=1e-3)
losses = [s.train_step(lr=1e-3, micro_batch=4).loss for _ in range(3)]
print(json.dumps({"growth": status("VmHWM:") - base, "streaming": r.streaming, "eval": r.eval_examples,
                  "losses": losses, "seconds": time.perf_counter() - t0}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the RSS peak")
def test_a_200_mb_jsonl_trains_in_bounded_memory(tiny_dir, tmp_path):
    """The file is over STREAM_BYTES, so it streams by default: the peak RSS grows by
    less than 100 MB over the RSS after load_model (reading it whole would take GBs)."""
    chunk = "".join(json.dumps({"text": f"Line {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 6)}) + "\n"
                    for i in range(4000)).encode()
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for _ in range(-(-200 * 2**20 // len(chunk))):
            f.write(chunk)
    assert path.stat().st_size >= 200 * 2**20
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                      os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["streaming"] and result["eval"] > 0 and len(result["losses"]) == 3
    assert result["growth"] < 100 * 2**20, result
