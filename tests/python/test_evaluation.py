"""nanotune.evaluation: task layouts, log-likelihood scoring against hand
computation, generative answer extraction. Real tiny Llama + real tokenizer."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nanotune.evaluation import (
    PROMPT_TEMPLATE,
    TaskFormatError,
    canonical_task,
    evaluate_tasks,
    extract_answer,
    format_table,
    load_task,
    loglikelihoods,
)

CORPUS = [
    "Question: is fire hot?\nAnswer: yes no true false",
    "the correct answer is option1 option2 answer1 answer2 answer3 ending1 ending2 solution1 solution2",
    "extraordinarily " * 20,
    "The cat sat on the mat. A dog ran in the park. She poured water into the glass.",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def rigged_llama(vocab_size: int, favourite: int, logit: float) -> LlamaForCausalLM:
    """A Llama whose next-token distribution is the same at every position:
    logit ``logit`` for token ``favourite``, 0 for every other token. Blocks
    write nothing to the residual stream (o_proj, down_proj = 0), every
    embedding is the all-ones vector (RMSNorm keeps it), and the head reads it."""
    model = tiny_llama(vocab_size)
    h = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[favourite] = logit / h
    return model


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def direct_ll(model, tokenizer, context, continuation):
    """log p(continuation | context) by one unbatched, unpadded forward pass."""
    if context.endswith(" "):
        context, continuation = context[:-1], " " + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    n_ctx = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))


# --------------------------------------------------------------------------- layouts


def test_each_layout_parses(tmp_path):
    hs = load_task("hellaswag", write_jsonl(tmp_path / "hs.jsonl", [
        {"activity_label": "Cooking", "ctx_a": "She pours water.", "ctx_b": "then she",
         "ctx": "She pours water. then she", "endings": ["stirs [title] it.", "sleeps.", "runs.", "flies."],
         "label": "0"}]))[0]
    assert hs.contexts[0] == "Cooking: She pours water. Then she"
    assert hs.continuations[0] == " stirs. it." and hs.gold == 0 and hs.answers[-1] == "ending4"

    wg = load_task("winogrande", write_jsonl(tmp_path / "wg.jsonl", [
        {"sentence": "The cup broke the glass because _ was hard.", "option1": "the cup",
         "option2": "the glass", "answer": "1"}]))[0]
    assert wg.contexts == ("The cup broke the glass because the cup", "The cup broke the glass because the glass")
    assert wg.continuations == (" was hard.", " was hard.") and wg.gold == 0

    pq = load_task("piqa", write_jsonl(tmp_path / "pq.jsonl", [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}]))[0]
    assert pq.contexts[0] == "Question: Open a jar\nAnswer:" and pq.continuations == (" twist the lid", " eat the lid")

    nested = {"question": {"stem": "Sky colour?", "choices": [{"text": "blue", "label": "A"},
              {"text": "green", "label": "B"}]}, "answerKey": "A"}
    flat = {"question": "Sky colour?", "choices": {"text": ["blue", "green"], "label": ["1", "2"]}, "answerKey": "2"}
    arc = load_task("ARC-Easy", write_jsonl(tmp_path / "arc.jsonl", [nested, flat]))
    assert [a.gold for a in arc] == [0, 1] and arc[0].contexts[0] == "Question: Sky colour?\nAnswer:"
    assert "Answer2: green" in arc[1].instruction and arc[1].answers == ("answer1", "answer2")

    ob = load_task("obqa", write_jsonl(tmp_path / "ob.jsonl", [
        {"question_stem": "Plants need", "choices": {"text": ["light", "rocks"], "label": ["A", "B"]},
         "answerKey": "A"}]))[0]
    assert ob.contexts[0] == "Plants need" and ob.gold == 0

    si = load_task("social_i_qa", write_jsonl(tmp_path / "si.jsonl", [
        {"context": "Kai lent a pen.", "question": "How is Kai?", "answerA": "kind", "answerB": "mean",
         "answerC": "tall", "label": "3"}]))[0]
    assert si.contexts[0] == "Q: Kai lent a pen. How is Kai?\nA:" and si.gold == 2

    bq = load_task("boolq", write_jsonl(tmp_path / "bq.jsonl", [
        {"question": "is fire hot", "passage": "Fire is hot.", "answer": True}]))[0]
    assert bq.continuations == (" no", " yes") and bq.gold == 1 and bq.answers[bq.gold] == "true"
    assert bq.contexts[0] == "Fire is hot.\nQuestion: is fire hot?\nAnswer:"


def test_llm_adapters_layout_json_array(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([
        {"instruction": "Please choose the correct answer to fill in the blank: A _ B\n\nOption1: x\n\n"
                        "Option2: y\n\nAnswer format: option1/option2", "answer": "option2"}]))
    ex = load_task("winogrande", path)[0]
    assert ex.answers == ("option1", "option2") and ex.gold == 1
    assert ex.contexts[0].endswith("### Response:\nthe correct answer is")
    assert ex.continuations == (" option1", " option2")


@pytest.mark.parametrize("task,record,expected", [
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b"}, "pq.jsonl:2: field 'label' is missing"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 5}, "pq.jsonl:2: field 'label' is 5, out of range"),
    ("arc_easy", {"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"},
     "pq.jsonl:2: field 'answerKey' is 'C'"),
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
     "field 'sentence' should contain exactly one '_'"),
    ("boolq", {"question": "q", "passage": "p", "answer": "maybe"}, "field 'answer' should be true/false"),
    ("siqa", {"context": "c", "question": 3, "answerA": "a", "answerB": "b", "answerC": "c", "label": "1"},
     "field 'question' should be str, got int"),
])
def test_bad_records_name_file_line_field(tmp_path, task, record, expected):
    path = tmp_path / "pq.jsonl"
    path.write_text("\n" + json.dumps(record) + "\n")  # blank line 1 is skipped but counted
    with pytest.raises(TaskFormatError, match=expected.replace("?", r"\?").replace("(", r"\(")):
        load_task(task, path)


def test_bad_files_and_names(tmp_path):
    with pytest.raises(TaskFormatError, match="no such task file"):
        load_task("piqa", tmp_path / "missing.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"goal": "g"}\n{oops\n')
    with pytest.raises(TaskFormatError, match=r"broken.jsonl:2: invalid JSON"):
        load_task("piqa", tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        canonical_task("mmlu")
    assert canonical_task("ARC-Challenge") == "arc_challenge" and canonical_task("SIQA") == "siqa"


# --------------------------------------------------------------------------- log-likelihood


def test_rigged_model_knows_the_answer_and_matches_closed_form(tokenizer, tmp_path):
    """Every position predicts ' yes' with logit L and every other token with 0,
    so log p(t) = [t == yes] * L - log(e^L + V - 1), computable without a model."""
    yes = tokenizer(" yes")["input_ids"]
    assert len(yes) == 1, "fixture tokenizer should keep ' yes' whole"
    V, L = len(tokenizer), 6.0
    model = rigged_llama(V, yes[0], L)
    lse = math.log(math.exp(L) + V - 1)
    path = write_jsonl(tmp_path / "bq.jsonl", [
        {"question": "is fire hot", "passage": "Fire is hot.", "answer": True},
        {"question": "is ice hot", "passage": "Ice is cold.", "answer": False},
    ])
    (got,) = loglikelihoods(model, tokenizer, [("Fire is hot.\nQuestion: is fire hot?\nAnswer:", " yes")])
    assert got == pytest.approx(L - lse, abs=1e-4)
    n_no = len(tokenizer(" no")["input_ids"])
    (got_no,) = loglikelihoods(model, tokenizer, [("Answer:", " no")])
    assert got_no == pytest.approx(-n_no * lse, abs=1e-4)
    # The model always says yes: right on the first item, wrong on the second.
    res = evaluate_tasks(model, tokenizer, {"boolq": path})
    assert res == {"boolq": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}


def test_random_llama_matches_direct_forward_passes(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer), seed=3)
    records = [
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0},
        {"goal": "Dry a cup", "sol1": "use a towel", "sol2": "use water on the mat", "label": 1},
        {"goal": "Light a room", "sol1": "turn on the lamp", "sol2": "the cat", "label": 0},
        {"goal": "Cool tea", "sol1": "wait", "sol2": "add ice to the glass", "label": 1},
    ]
    path = write_jsonl(tmp_path / "piqa.jsonl", records)
    acc = acc_norm = 0
    for r in records:
        ctx = f"Question: {r['goal']}\nAnswer:"
        conts = [" " + r["sol1"], " " + r["sol2"]]
        ll = [direct_ll(model, tokenizer, ctx, c) for c in conts]
        norm = [v / len(r[k]) for v, k in zip(ll, ("sol1", "sol2"))]  # characters, no delimiter
        acc += int(max((0, 1), key=lambda i: ll[i]) == r["label"])
        acc_norm += int(max((0, 1), key=lambda i: norm[i]) == r["label"])
        batched = loglikelihoods(model, tokenizer, [(ctx, c) for c in conts], batch_size=3)
        assert batched == pytest.approx(ll, abs=1e-4)
    # batch_size=3 puts prompts of different lengths in one padded batch.
    res = evaluate_tasks(model, tokenizer, {"piqa": path}, batch_size=3)["piqa"]
    assert res == {"acc": acc / 4, "acc_norm": acc_norm / 4, "n": 4}


def test_acc_and_acc_norm_disagree_on_lengths(tokenizer, tmp_path):
    """Near-uniform random model: every token costs about log V nats. A 1-token
    choice wins the sum; a 3-token, 47-character choice wins per character."""
    model = tiny_llama(len(tokenizer), seed=1)
    long = "extraordinarily extraordinarily extraordinarily"
    assert len(tokenizer(" " + long)["input_ids"]) <= 4
    records = [{"question": "Pick", "choices": {"text": ["x", long], "label": ["A", "B"]}, "answerKey": "B"}]
    path = write_jsonl(tmp_path / "arc.jsonl", records)
    ll = [direct_ll(model, tokenizer, "Question: Pick\nAnswer:", " " + c) for c in ("x", long)]
    assert ll[0] > ll[1] and ll[0] / 1 < ll[1] / len(long)
    assert evaluate_tasks(model, tokenizer, {"arc_easy": path}) == {"arc_easy": {"acc": 0.0, "acc_norm": 1.0, "n": 1}}


def test_limit_and_mode_validation(tokenizer, tmp_path):
    model = tiny_llama(len(tokenizer))
    path = write_jsonl(tmp_path / "bq.jsonl", [{"question": "q", "passage": "p", "answer": True}] * 5)
    assert evaluate_tasks(model, tokenizer, {"boolq": path}, limit=2)["boolq"]["n"] == 2
    with pytest.raises(ValueError, match="mode must be"):
        evaluate_tasks(model, tokenizer, {"boolq": path}, mode="mc")
    table = format_table({"boolq": {"acc": 0.5, "acc_norm": None, "n": 2}, "piqa": {"acc": 1.0, "acc_norm": 1.0, "n": 1}})
    assert "| boolq | 2 | 50.00 | - |" in table and "| average | 3 | 75.00 | - |" in table


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("text,answers,expected", [
    ("the correct answer is option2", ("option1", "option2"), "option2"),
    ("The correct answer is Answer1.", ("answer1", "answer2", "answer3"), "answer1"),
    ("answer10 is wrong, answer3 is right", ("answer1", "answer2", "answer3"), "answer3"),
    ("It is untrue... actually false", ("false", "true"), "false"),
    ("true false", ("false", "true"), "true"),
    ("ending3\n### Instruction: ending1", ("ending1", "ending2", "ending3", "ending4"), "ending3"),
    ("solution", ("solution1", "solution2"), None),
    ("", ("true", "false"), None),
])
def test_extract_answer(text, answers, expected):
    assert extract_answer(text, answers) == expected


def test_generate_mode_with_rigged_model(tokenizer, tmp_path):
    true = tokenizer(" true")["input_ids"]
    assert len(true) == 1
    model = rigged_llama(len(tokenizer), true[0], 8.0)
    path = write_jsonl(tmp_path / "bq.jsonl", [
        {"question": "is fire hot", "passage": "p", "answer": True},
        {"question": "is ice hot", "passage": "p", "answer": False},
        {"question": "is the sun hot", "passage": "p", "answer": True},
    ])
    res = evaluate_tasks(model, tokenizer, {"boolq": path}, mode="generate", batch_size=2)
    assert res == {"boolq": {"acc": pytest.approx(2 / 3), "acc_norm": None, "n": 3}}
    assert PROMPT_TEMPLATE.format(instruction="I").endswith("### Instruction:\nI\n\n### Response:\n")


def test_command_line_prints_table(tokenizer, tmp_path, capsys):
    from nanotune.evaluation import main

    model = tiny_llama(len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    path = write_jsonl(tmp_path / "bq.jsonl", [{"question": "q", "passage": "p", "answer": True}] * 3)
    assert main(["--model", str(tmp_path / "m"), "--task", f"boolq={path}", "--limit", "2", "--json"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    direct = evaluate_tasks(model, tokenizer, {"boolq": path}, limit=2)
    assert json.loads(line) == direct
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "m"), "--task", "boolq"])
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_context_whitespace_moves_to_the_continuation(tokenizer):
    """As lm-eval: all trailing whitespace of the context (not only spaces) is
    scored as the start of the continuation; a context of whitespace alone is refused."""
    model = tiny_llama(len(tokenizer), seed=2)
    moved, explicit = loglikelihoods(model, tokenizer, [("Answer:\n\t ", "yes"), ("Answer:", "\n\t yes")])
    assert moved == pytest.approx(explicit, abs=1e-5)
    with pytest.raises(ValueError, match="only whitespace"):
        loglikelihoods(model, tokenizer, [(" \n", " yes")])
