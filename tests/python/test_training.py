import math

import pytest
import torch

from nanotune.data import collate, load_dataset
from nanotune.training import OptimizerError, create_optimizer, evaluate, generate, train_step

TEXTS = ["The cat sees the dog near the river.", "What is 12 plus 30? 12 + 30 = 42.",
         "The old tree holds the bird in the garden.", "Hi.",
         "Question: Where is the ship? Answer: The ship is on the road.", "The red car follows the train."]


def examples(tok, texts=TEXTS):
    ids = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    return ids, [list(x) for x in ids]


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_accumulated_micro_batches_equal_one_big_batch(tiny_dir):
    from nanotune.models import load_model

    a, b = load_model("tiny-llama", device="cpu"), load_model("tiny-llama", device="cpu")
    ids, labels = examples(a.tokenizer, TEXTS[:4])
    labels[0][:4] = [-100] * 4  # uneven target counts per micro-batch
    big = [collate(ids, labels, pad_id=2)]
    micro = [collate(ids[:1], labels[:1], 2), collate(ids[1:3], labels[1:3], 2), collate(ids[3:], labels[3:], 2)]
    # SGD with lr=1 makes the parameter change equal to the gradient itself.
    ra = train_step(a.model, torch.optim.SGD(a.model.parameters()), big, lr=1.0)
    rb = train_step(b.model, torch.optim.SGD(b.model.parameters()), micro, lr=1.0)
    assert ra["tokens"] == rb["tokens"] == sum(len(x) - 1 for x in ids) - 3  # position 0 is never a target
    assert ra["input_tokens"] == rb["input_tokens"] == sum(len(x) for x in ids)
    assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
    assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    pa, pb = params(a.model), params(b.model)
    for n in pa:
        torch.testing.assert_close(pb[n], pa[n], rtol=1e-5, atol=1e-7, msg=n)
    # A mean of per-micro-batch means would differ here: the split is deliberately uneven.
    means = [evaluate(b.model, [m])["loss"] for m in micro]
    assert abs(sum(means) / 3 - evaluate(b.model, big)["loss"]) > 1e-3


def test_step_loss_is_the_token_mean_before_the_update(tiny):
    ids, labels = examples(tiny.tokenizer)
    batches = [collate(ids[:3], labels[:3], 2), collate(ids[3:], labels[3:], 2)]
    before = evaluate(tiny.model, batches)
    result = train_step(tiny.model, create_optimizer(tiny.model, "adamw"), batches, lr=1e-2)
    assert result["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert result["tokens"] == before["tokens"]
    assert evaluate(tiny.model, batches)["loss"] < before["loss"]
    assert set(result) == {"loss", "grad_norm", "tokens", "input_tokens", "time_s", "lr", "density",
                           "mask_refreshed"}
    assert result["density"] == 1.0 and result["mask_refreshed"] is False  # AdamW fallbacks
    assert result["time_s"] > 0


def test_lr_is_set_on_every_group_and_grad_clip_applies(tiny):
    ids, labels = examples(tiny.tokenizer)
    batch = [collate(ids, labels, 2)]
    model = tiny.model
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    rest = [p for n, p in model.named_parameters() if "norm" in n]
    opt = torch.optim.SGD([{"params": decay, "lr": 5.0}, {"params": rest, "lr": 7.0}])
    before = params(model)
    r = train_step(model, opt, batch, lr=1.0, grad_clip=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]
    assert r["grad_norm"] > 1e-3  # reported before clipping
    change = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - before[n])
                                                   for n, p in model.named_parameters()]))
    assert float(change) == pytest.approx(1e-3, rel=1e-3)  # lr 1 * clipped gradient of norm 1e-3


def test_training_lowers_the_loss_on_a_small_set(tiny, write_jsonl):
    data = load_dataset(write_jsonl([{"instruction": f"Say {w}.", "output": w} for w in
                                     ("red", "blue", "green", "cold")]), tiny.tokenizer)
    it = data.train.batches(2)
    opt = create_optimizer(tiny.model, "adamw")
    losses = [train_step(tiny.model, opt, [next(it), next(it)], lr=3e-2)["loss"] for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0]


def test_train_step_rejects_bad_input(tiny):
    opt = create_optimizer(tiny.model, "adamw")
    with pytest.raises(ValueError, match="at least one micro-batch"):
        train_step(tiny.model, opt, [], lr=1e-3)
    with pytest.raises(ValueError, match="no target tokens"):
        train_step(tiny.model, opt, [collate([[0, 5, 6]], [[-100, -100, -100]], 2)], lr=1e-3)
    with pytest.raises(ValueError, match="lr must be"):
        train_step(tiny.model, opt, [collate([[0, 5, 6]], [[0, 5, 6]], 2)], lr=float("nan"))


def test_evaluate_reports_loss_perplexity_and_tokens(tiny):
    ids, labels = examples(tiny.tokenizer)
    r = evaluate(tiny.model, [collate(ids[:2], labels[:2], 2), collate(ids[2:], labels[2:], 2)])
    assert r["tokens"] == sum(len(x) - 1 for x in ids)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert math.log(512) - 1 < r["loss"] < math.log(512) + 1  # random init: near uniform over the vocab
    assert tiny.model.training  # evaluate restores the mode


def test_create_optimizer_adamw_and_errors(tiny):
    opt = create_optimizer(tiny.model, "adamw", lr=3e-4, betas=(0.8, 0.9))
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"]) == (3e-4, (0.8, 0.9), 0.0)
    assert sum(p.numel() for p in g["params"]) == tiny.info["parameters"]  # the tied tensor once
    with pytest.raises(OptimizerError, match="adamw has no option 'densty'") as e:
        create_optimizer(tiny.model, "adamw", densty=0.1)
    assert e.value.option == "densty"
    with pytest.raises(OptimizerError, match="'sgd' is not") as e:
        create_optimizer(tiny.model, "sgd")
    assert e.value.option == "name"


def test_nanoadam_reports_density_and_mask_refresh(tiny):
    pytest.importorskip("nanotune.optim")
    ids, labels = examples(tiny.tokenizer)
    batch = [collate(ids, labels, 2)]
    opt = create_optimizer(tiny.model, "nanoadam", density=0.1, mask_interval=2)
    refreshed = []
    before = params(tiny.model)
    for _ in range(3):
        r = train_step(tiny.model, opt, batch, lr=1e-3)
        assert r["density"] == pytest.approx(0.1)
        refreshed.append(r["mask_refreshed"])
    assert refreshed == [True, False, True]
    w = "model.layers.0.mlp.up_proj.weight"
    changed = (dict(tiny.model.named_parameters())[w] != before[w]).float().mean().item()
    assert 0 < changed <= 0.2  # sparse: at most the two masks' entries moved
    with pytest.raises(OptimizerError, match="nanoadam has no option 'mask_intervall'"):
        create_optimizer(tiny.model, "nanoadam", mask_intervall=5)


def test_generate_greedy_chat_and_seeded_sampling(tiny):
    tok, model = tiny.tokenizer, tiny.model
    a = generate(model, tok, "The cat", max_new_tokens=8)
    assert a == generate(model, tok, "The cat", max_new_tokens=8)  # greedy is deterministic
    assert isinstance(a, str) and 0 < len(tok(a, add_special_tokens=False)["input_ids"]) <= 9
    chat = generate(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=4)
    assert isinstance(chat, str)
    state = torch.get_rng_state()
    s1 = generate(model, tok, "The cat", max_new_tokens=12, temperature=1.0, seed=7)
    s2 = generate(model, tok, "The cat", max_new_tokens=12, temperature=1.0, seed=7)
    s3 = generate(model, tok, "The cat", max_new_tokens=12, temperature=1.0, seed=8)
    assert s1 == s2 != s3
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is untouched
    assert model.training


def test_nanoadam_sparse_gradients_has_no_grad_norm_and_refuses_clipping(tiny):
    pytest.importorskip("nanotune.optim")
    ids, labels = examples(tiny.tokenizer)
    batch = [collate(ids, labels, 2)]
    opt = create_optimizer(tiny.model, "nanoadam", density=0.1, sparse_gradients=True)
    r = train_step(tiny.model, opt, batch, lr=1e-3)
    assert r["grad_norm"] is None and r["mask_refreshed"] is True
    with pytest.raises(ValueError, match="grad_clip needs the full gradients"):
        train_step(tiny.model, opt, batch, lr=1e-3, grad_clip=1.0)
