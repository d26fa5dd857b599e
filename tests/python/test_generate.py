"""Generation from templates (issue 14): the prompt a finetuned model is asked with
has the ids of its training prompts (Note [generation prompts] in training.py),
greedy output is transformers' own, stop strings cut and end generation, and
streamed pieces concatenate to the text (Note [streamed text])."""

import pytest
import torch

from nanotune import wire
from nanotune.data import IGNORE_INDEX, load_dataset
from nanotune.errors import NanotuneError
from nanotune.session import Session
from nanotune.templates import render
from nanotune.training import _settled, complete, generate, prompt_ids

ROWS = [
    {"instruction": "Name a fruit.", "input": "", "output": "apple"},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Say {hi} in French.", "input": "  ", "output": "bonjour"},  # braces; a blank input
]
CUSTOM = "Q: {instruction}\n{input}\nA:"


@pytest.mark.parametrize("template", ["alpaca", "raw", CUSTOM, "chat"])
def test_generation_prompt_ids_equal_the_training_prompt_ids(template, tiny_tokenizer, write_jsonl):
    tok = tiny_tokenizer
    # alpaca is load_dataset's default: that case holds without the template argument.
    kw = {} if template == "alpaca" else {"template": template}
    data = load_dataset(write_jsonl(ROWS), tok, shuffle=False, **kw)
    assert data.info.get("template", "alpaca") == template
    for row, ids, labels in zip(ROWS, data.train.input_ids, data.train.labels):
        text, gen_ids = prompt_ids(tok, row["instruction"], template, row["input"])
        assert text == render(template, row["instruction"], row["input"], tokenizer=tok)
        # The training example is prompt + response + eos, its prompt the tokens without loss.
        n_prompt = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        assert gen_ids == ids[:n_prompt], template
        # Then the response: the output and eos (under "chat", the assistant turn's own end after it).
        response = tok(row["output"], add_special_tokens=False)["input_ids"]
        assert ids[n_prompt:n_prompt + len(response) + 1] == response + [tok.eos_token_id]


def test_raw_string_and_chat_messages_keep_their_old_tokenization(tiny_tokenizer):
    tok = tiny_tokenizer
    assert prompt_ids(tok, "The cat")[1] == [tok.bos_token_id] + tok("The cat", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, "The cat", input="x")[0] == "The cat\n\nx"
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tok, messages) == (text, tok(text, add_special_tokens=False)["input_ids"])
    # The chat template writes bos itself: a string prompt under "chat" gets no second one.
    chat_text, chat_ids = prompt_ids(tok, "hi", "chat")
    assert chat_text == text and chat_ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("template,input", [("alpaca", ""), ("alpaca", "12 and 30"), ("raw", ""), (CUSTOM, "x")])
def test_greedy_output_is_transformers_own(template, input, tiny):
    tok, model = tiny.tokenizer, tiny.model
    out = complete(model, tok, "Add the numbers.", template=template, input=input, max_new_tokens=16)
    # transformers' usual way: the rendered prompt through the tokenizer (which puts bos in front).
    ids = tok(out.prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == out.prompt_ids
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:].tolist()
    assert out.ids == ref
    assert out.text == tok.decode(ref, skip_special_tokens=True)
    assert out.finish_reason == ("eos" if ref[-1] == tok.eos_token_id else "length")


def sampled(model, tok, **kw):
    # A random tiny model's greedy text is one token over and over; seeded sampling varies.
    return complete(model, tok, "The cat", max_new_tokens=40, temperature=1.0, seed=3, **kw)


def test_stop_cuts_the_text_and_ends_generation_early(tiny):
    tok, model = tiny.tokenizer, tiny.model
    full = sampled(model, tok)
    assert full.finish_reason == "length" and len(full.ids) == 40 and len(full.text) > 20
    stop = full.text[10:12]
    at = full.text.find(stop)
    out = sampled(model, tok, stop=[stop, "never appears"])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:at]
    assert len(out.ids) < len(full.ids) and out.ids == full.ids[:len(out.ids)]  # the same tokens, fewer of them
    assert stop in tok.decode(out.ids, skip_special_tokens=True)
    # The first stop string to appear wins, whichever of the list it is.
    assert sampled(model, tok, stop=["never appears", stop]).text == full.text[:at]


def test_streamed_pieces_concatenate_to_the_text_and_never_show_a_stop_string(tiny):
    tok, model = tiny.tokenizer, tiny.model
    for seed in range(4):  # random bytes: characters split across tokens come out whole
        pieces: list[str] = []
        out = complete(model, tok, "The cat", max_new_tokens=48, temperature=1.0, seed=seed, on_text=pieces.append)
        assert len(pieces) >= 2 and all(pieces) and "".join(pieces) == out.text
    full = sampled(model, tok)
    stop = full.text[10:14]
    pieces = []
    out = sampled(model, tok, stop=[stop], on_text=pieces.append)
    assert "".join(pieces) == out.text == full.text[:full.text.find(stop)]


def test_settled_holds_back_what_may_still_change():
    assert _settled("abc", []) == 3
    assert _settled("abc\ufffd", []) == 3  # a character whose bytes are not all there
    assert _settled("abc\n#", ["\n###"]) == 3  # may become the stop string
    assert _settled("abc\n#x", ["\n###"]) == 6
    assert _settled("abcEN", ["END", "Nope"]) == 3  # the longest tail that starts any stop string


def test_generate_keeps_its_string_api(tiny):
    a = generate(tiny.model, tiny.tokenizer, "The cat", max_new_tokens=6)
    assert a == complete(tiny.model, tiny.tokenizer, "The cat", max_new_tokens=6).text
    assert tiny.model.training  # restored


def test_session_generate_templates_stop_stream_and_errors(tiny_dir):
    s = Session(device="cpu")
    s.load_model(path="tiny-llama")
    r = s.generate(prompt="Name a fruit.", template="alpaca", max_new_tokens=5)
    assert r.prompt == render("alpaca", "Name a fruit.") and r.tokens == 5 and r.finish_reason == "length"
    assert s.generate(prompt="The cat", max_new_tokens=5).prompt == "The cat"  # default raw
    pieces: list[str] = []
    r = s.generate(prompt="The cat", max_new_tokens=20, temperature=1.0, seed=1, stream=True, on_text=pieces.append)
    assert "".join(pieces) == r.text and len(pieces) >= 2
    pieces.clear()
    s.generate(prompt="The cat", max_new_tokens=5, on_text=pieces.append)  # no stream: no pieces
    assert pieces == []
    with pytest.raises(NanotuneError, match="unknown template 'alpacca'") as e:
        s.generate(prompt="x", template="alpacca")
    assert e.value.data["field"] == "template"
    with pytest.raises(NanotuneError, match="chat messages are rendered by the tokenizer's chat template"):
        s.generate(prompt=[wire.ChatMessage(role="user", content="hi")], template="alpaca")
    assert s.generate(prompt=[wire.ChatMessage(role="user", content="hi")], template="chat", max_new_tokens=2).text \
        is not None
    calls = []

    def cancel() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what the sidecar's check raises is a BaseException too

    with pytest.raises(KeyboardInterrupt):
        s.generate(prompt="The cat", max_new_tokens=10, check=cancel)
    assert s.loaded.model.training  # the session's mode came back


def test_the_sidecar_handler_streams_generate_token_events_with_the_call_id(tiny_dir):
    from nanotune.methods.train import _generate
    from nanotune.sidecar.dispatch import Context, State

    state = State()
    state.session = Session(device="cpu")
    state.session.load_model(path="tiny-llama")
    events = []
    ctx = Context(state, 41, "generate", [], lambda name, data: events.append((name, data)), None)
    p = wire.GenerateParams(prompt="The cat", max_new_tokens=24, temperature=1.0, seed=2, stream=True)
    r = _generate(ctx, p)
    assert len(events) >= 2 and {name for name, _ in events} == {"generate:token"}
    assert [d.id for _, d in events] == [41] * len(events)
    assert [d.index for _, d in events] == list(range(len(events)))
    assert "".join(d.text for _, d in events) == r.text
    events.clear()
    _generate(ctx, wire.GenerateParams(prompt="The cat", max_new_tokens=4))
    assert events == []
    ctx.cancelled = True
    from nanotune.sidecar.dispatch import Cancelled

    with pytest.raises(Cancelled):
        _generate(ctx, wire.GenerateParams(prompt="The cat", max_new_tokens=4))


def test_generation_leaves_the_training_rng_and_mode_alone(tiny):
    state = torch.get_rng_state()
    complete(tiny.model, tiny.tokenizer, "The cat", max_new_tokens=4, temperature=1.0, seed=5, stop=["x"])
    assert torch.equal(torch.get_rng_state(), state) and tiny.model.training
