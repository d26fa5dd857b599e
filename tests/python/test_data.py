import json

import pytest
import torch

from nanotune.data import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, DatasetError, collate,
                           load_dataset, read_rows)

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there."},
]
COMMONSENSE = [  # LLM-Adapters commonsense_170k layout: "answer" is the bare label
    {"instruction": "Please choose the correct answer to the question: Where is the cat?\n\n"
                    "Answer1: in the garden Answer2: on the moon\n\nAnswer format: answer1/answer2",
     "input": "", "output": "the correct answer is answer1", "answer": "answer1"},
]
CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                  {"role": "assistant", "content": "see you"}]},
]


def decode_targets(tok, ids, labels):
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE_INDEX])


def test_text_format_trains_on_every_token(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    data = load_dataset(write_jsonl([{"text": "The cat sees the dog."}, {"text": "What is 2 plus 2?"}]), tok)
    assert data.info["format"] == "text" and len(data.train) == 2 and data.eval is None
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert ids == [tok.bos_token_id] + tok("The cat sees the dog.", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]
    assert labels[1:] == ids[1:]


@pytest.mark.parametrize("row, template", [(ALPACA[0], ALPACA_PROMPT), (ALPACA[1], ALPACA_PROMPT_NO_INPUT),
                                           (COMMONSENSE[0], ALPACA_PROMPT_NO_INPUT)])
def test_instruction_format_masks_the_prompt(tiny_tokenizer, write_jsonl, row, template):
    tok = tiny_tokenizer
    data = load_dataset(write_jsonl([row]), tok)
    assert data.info["format"] == "instruction"
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    prompt = template.format(instruction=row["instruction"], input=row["input"])
    n_prompt = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])  # bos + prompt
    assert tok.decode(ids[:n_prompt]) == "<s>" + prompt
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]  # every response token and eos are targets
    assert decode_targets(tok, ids, labels) == row["output"] + "</s>"


def test_train_on_inputs_keeps_prompt_labels(tiny_tokenizer, write_jsonl):
    data = load_dataset(write_jsonl(ALPACA), tiny_tokenizer, train_on_inputs=True, shuffle=False)
    for ids, labels in zip(data.train.input_ids, data.train.labels):
        assert labels[1:] == ids[1:]


def test_instruction_json_array_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps(COMMONSENSE * 3, indent=2))
    data = load_dataset(path, tiny_tokenizer, format="commonsense")
    assert data.info["format"] == "instruction" and len(data.train) == 3
    assert data.train.lines == [2, 8, 14]  # every row keeps the line it starts on


def test_chat_format_trains_on_assistant_turns_only(tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    data = load_dataset(write_jsonl(CHAT), tok)
    assert data.info["format"] == "chat"
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    full = tok.apply_chat_template(CHAT[0]["messages"], tokenize=False)
    assert tok.decode(ids) == full and ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert decode_targets(tok, ids, labels) == "hello</s>\nsee you</s>\n"
    targets = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    assert tok.decode(ids[:targets[0]]).endswith("<|user|>\nhi</s>\n<|assistant|>\n")


def test_cutoff_truncates_and_drops_rows_without_targets(tiny_tokenizer, write_jsonl):
    rows = [{"text": "one two three " * 50}, {"instruction": "x " * 200, "output": "y"}]
    with pytest.raises(DatasetError, match=":2: field 'text': missing"):  # one format per file
        load_dataset(write_jsonl(rows), tiny_tokenizer, format="text")  # (the text row is first)
    data = load_dataset(write_jsonl(rows[:1]), tiny_tokenizer, cutoff=16)
    assert len(data.train.input_ids[0]) == 16 and data.info["train"]["truncated"] == 1
    data = load_dataset(write_jsonl([rows[1], ALPACA[0]]), tiny_tokenizer, cutoff=100)
    assert data.info["train"]["dropped"] == 1 and len(data.train) == 1 and data.train.lines == [2]
    assert data.info["train"]["truncated"] == 1  # the dropped row was cut first
    with pytest.raises(DatasetError, match="no example has a response token left after cutoff=32"):
        load_dataset(write_jsonl(rows[1:]), tiny_tokenizer, cutoff=32)


# --------------------------------------------------------------------------- errors

def test_missing_file_names_the_path(tiny_tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_dataset(tmp_path / "nope.jsonl", tiny_tokenizer)
    assert e.value.path == str(tmp_path / "nope.jsonl") and str(tmp_path / "nope.jsonl") in str(e.value)


def test_bad_jsonl_row_names_file_and_line(tiny_tokenizer, write_jsonl):
    path = write_jsonl([{"text": "a"}, "", '{"text": "b",}', {"text": "c"}])
    with pytest.raises(DatasetError) as e:
        load_dataset(path, tiny_tokenizer)
    assert (e.value.path, e.value.line) == (str(path), 3)
    assert str(e.value).startswith(f"{path}:3: invalid JSON")


def test_bad_json_array_names_the_line(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b" "c"}\n]\n')
    with pytest.raises(DatasetError, match="invalid JSON") as e:
        load_dataset(path, tiny_tokenizer)
    assert e.value.line == 3
    path.write_text('[\n {"text": "a"},\n 7\n]\n')
    with pytest.raises(DatasetError, match="expected a JSON object, got int") as e:
        load_dataset(path, tiny_tokenizer)
    assert e.value.line == 3


@pytest.mark.parametrize("rows, line, field, message", [
    ([ALPACA[0], {"instruction": "x"}], 2, "output", "missing required field"),
    ([ALPACA[0], {"instruction": "x", "output": 5}], 2, "output", "expected a string, got int"),
    ([{"text": "a"}, {"txt": "b"}], 2, "text", "missing required field"),
    ([CHAT[0], {"messages": [{"role": "user"}]}], 2, "messages[0].content", "missing required field"),
    ([CHAT[0], {"messages": "hi"}], 2, "messages", "expected a non-empty list"),
    ([{"prompt": "a"}], 1, None, "cannot tell the format"),
])
def test_bad_row_names_line_and_field(tiny_tokenizer, write_jsonl, rows, line, field, message):
    path = write_jsonl(rows)
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset(path, tiny_tokenizer)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), line, field)
    assert str(e.value).startswith(f"{path}:{line}: ")
    if field:
        assert f"field {field!r}" in str(e.value)


def test_empty_dataset_is_an_error(tiny_tokenizer, write_jsonl, tmp_path):
    with pytest.raises(DatasetError, match="empty") as e:
        load_dataset(write_jsonl(["", "  "]), tiny_tokenizer)
    assert e.value.path is not None
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(DatasetError, match="empty"):
        load_dataset(tmp_path / "e.json", tiny_tokenizer)


def test_bad_options_name_the_option(tiny_tokenizer, write_jsonl):
    path = write_jsonl([{"text": "a"}])
    for kwargs, field in [({"format": "csv"}, "format"), ({"cutoff": 1}, "cutoff"),
                          ({"eval_fraction": 1.5}, "eval_fraction")]:
        with pytest.raises(DatasetError) as e:
            load_dataset(path, tiny_tokenizer, **kwargs)
        assert e.value.field == field


# --------------------------------------------------------------------------- splits and batching

def rows(n):
    return [{"text": f"Row number {i}: " + "word " * (i % 7)} for i in range(n)]


def test_eval_fraction_holds_out_a_fixed_disjoint_set(tiny_tokenizer, write_jsonl):
    path = write_jsonl(rows(40))
    a = load_dataset(path, tiny_tokenizer, eval_fraction=0.25, seed=1)
    b = load_dataset(path, tiny_tokenizer, eval_fraction=0.25, seed=1)
    c = load_dataset(path, tiny_tokenizer, eval_fraction=0.25, seed=2)
    assert (len(a.train), len(a.eval)) == (30, 10)
    assert set(a.train.lines).isdisjoint(a.eval.lines) and len(set(a.train.lines) | set(a.eval.lines)) == 40
    assert a.eval.lines == b.eval.lines != c.eval.lines
    assert a.eval.lines == sorted(a.eval.lines) and not a.eval.shuffle


def test_eval_path(tiny_tokenizer, write_jsonl):
    data = load_dataset(write_jsonl(rows(5)), tiny_tokenizer, eval_path=write_jsonl(rows(3), "eval.jsonl"))
    assert (len(data.train), len(data.eval)) == (5, 3) and data.info["eval"]["examples"] == 3
    with pytest.raises(DatasetError, match="does not exist") as e:
        load_dataset(write_jsonl(rows(5)), tiny_tokenizer, eval_path="/nonexistent/eval.jsonl")
    assert e.value.path == "/nonexistent/eval.jsonl"


def test_collate_pads_right_with_masked_labels():
    batch = collate([[0, 5, 6], [0, 7]], [[-100, 5, 6], [-100, 7]], pad_id=2)
    assert batch["input_ids"].tolist() == [[0, 5, 6], [0, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]


def test_shuffle_is_seeded_and_every_epoch_covers_all(tiny_tokenizer, write_jsonl):
    path = write_jsonl(rows(10))
    a = load_dataset(path, tiny_tokenizer, seed=3).train.batches(4)
    b = load_dataset(path, tiny_tokenizer, seed=3).train.batches(4)
    c = load_dataset(path, tiny_tokenizer, seed=4).train.batches(4)
    assert a.order(0) == b.order(0) != c.order(0) and a.order(0) != a.order(1)
    assert a.order(0) != list(range(10))
    sizes = []
    for _ in range(3):  # 4 + 4 + 2 = one epoch; a batch never spans two epochs
        batch = next(a)
        sizes.append(len(batch["input_ids"]))
    assert sizes == [4, 4, 2] and a.state_dict()["epoch"] == 0 and a.batches_per_epoch == 3
    next(a)
    assert a.state_dict()["epoch"] == 1 and a.state_dict()["index"] == 4
    fixed = load_dataset(path, tiny_tokenizer, shuffle=False).train.batches(10)
    assert next(fixed)["input_ids"].shape[0] == 10 and fixed.order(5) == list(range(10))


def test_position_resumes_the_exact_data_order(tiny_tokenizer, write_jsonl):
    ds = load_dataset(write_jsonl(rows(7)), tiny_tokenizer, seed=5).train
    it = ds.batches(3)
    for _ in range(4):  # into the second epoch
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # survives JSON
    expected = [next(it) for _ in range(5)]
    resumed = ds.batches(3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(5)]):
        for key in want:
            assert torch.equal(want[key], got[key])
    other = load_dataset(write_jsonl(rows(8), "other.jsonl"), tiny_tokenizer, seed=5).train.batches(3)
    with pytest.raises(ValueError, match="num_examples=7 in the checkpoint but 8 here"):
        other.load_state_dict(state)


def test_finite_epochs_for_evaluation(tiny_tokenizer, write_jsonl):
    ds = load_dataset(write_jsonl(rows(5)), tiny_tokenizer).train
    batches = list(ds.batches(2, epochs=1, shuffle=False))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert [len(b["input_ids"]) for b in ds.batches(2, epochs=2, drop_last=True)] == [2, 2, 2, 2]
    assert ds.batches(2, drop_last=True).batches_per_epoch == 2


def test_read_rows_rejects_a_directory(tmp_path):
    with pytest.raises(DatasetError, match="not a file"):
        read_rows(tmp_path)


def test_chat_rows_need_a_chat_template(tiny_dir, write_jsonl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = None
    with pytest.raises(DatasetError, match="no.*chat template|chat template.*none") as e:
        load_dataset(write_jsonl(CHAT), tok)
    assert e.value.field == "messages"


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_chat_with_a_llama3_style_template(tiny_dir, write_jsonl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.chat_template = LLAMA3_STYLE
    data = load_dataset(write_jsonl(CHAT), tok)
    ids, labels = data.train.input_ids[0], data.train.labels[0]
    assert decode_targets(tok, ids, labels) == "hello<|eot_id|>see you<|eot_id|>"


def test_chat_template_that_rewrites_history_is_an_error(tiny_dir, write_jsonl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    # Marks only the final turn: rendering a longer conversation changes the earlier text.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                         "{% if loop.last %} [last]{% endif %}\n{% endfor %}")
    with pytest.raises(DatasetError, match="prefix by prefix") as e:
        load_dataset(write_jsonl([CHAT[0]] * 2), tok)
    assert (e.value.line, e.value.field) == (1, "messages")


def test_jsonl_rows_may_hold_unicode_line_separators(tiny_tokenizer, tmp_path):
    # JSON allows U+2028/U+2029 unescaped inside strings (json.dumps(ensure_ascii=False)
    # writes them so); only "\n" ends a JSONL line, so the row and the line numbers hold.
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                            for r in [{"text": "a\u2028b"}, {"text": "c\u0085d"}, {"text": "e"}]), encoding="utf-8")
    data = load_dataset(path, tiny_tokenizer, shuffle=False)
    assert data.train.lines == [1, 2, 3]
