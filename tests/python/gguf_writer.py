"""Writes a Llama HF directory as a GGUF file the way llama.cpp's convert_hf_to_gguf.py does
(tensor names from gguf's own name map, q/k rows permuted for llama.cpp's RoPE layout, the
byte-level BPE vocabulary with its merges and control tokens, the chat template), with the
gguf package's GGUFWriter and quantizers. Test-only: it lets the GGUF tests build their files
from the tiny-llama preset instead of downloading one.

    python tests/python/gguf_writer.py HF_DIR OUT.gguf [--type F32|F16|Q8_0|Q4_0|...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rotary pairs interleaved per head."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: str | Path, out: str | Path, qtype: str = "F32", arch: str = "llama",
               raw_types: dict[str, str] | None = None) -> Path:
    """hf_dir (a LlamaForCausalLM directory with a byte-level BPE tokenizer.json) -> out.
    qtype: the type of every 2-D weight whose rows split into whole blocks (others stay F32,
    as llama.cpp falls back). raw_types: {gguf tensor name: type} written as that type's
    bytes (zeros) whatever the gguf package can quantize, to make files with types it cannot
    dequantize. arch: the general.architecture written (the tensors stay Llama's)."""
    import gguf
    from safetensors.torch import load_file

    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    n_head, n_kv, n_layer = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(out, arch)
    w.add_name("nanotune test " + hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layer)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == len(vocab) and all(vocab[t] == i for i, t in enumerate(tokens))
    special = {a["content"] for a in tok.get("added_tokens", []) if a.get("special")}
    tokens += ["[PAD%d]" % i for i in range(len(tokens), cfg["vocab_size"])]  # as llama.cpp pads: one token per embedding row
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else
                       gguf.TokenType.UNUSED if t.startswith("[PAD") else gguf.TokenType.NORMAL for t in tokens])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)
    template = tok_cfg.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    qt = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[qt][0]
    state = load_file(hf_dir / "model.safetensors")
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        arr = t.to(torch.float32).numpy()
        if name.endswith("q_proj.weight"):
            arr = _permute(arr, n_head, n_head)
        elif name.endswith("k_proj.weight"):
            arr = _permute(arr, n_head, n_kv)
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gname is not None, name
        if raw_types and gname in raw_types:
            rt = gguf.GGMLQuantizationType[raw_types[gname]]
            bs, ts = gguf.GGML_QUANT_SIZES[rt]
            w.add_tensor(gname, np.zeros((*arr.shape[:-1], arr.shape[-1] // bs * ts), np.uint8), raw_dtype=rt)
        elif arr.ndim == 2 and qt not in (gguf.GGMLQuantizationType.F32,) and arr.shape[-1] % block == 0:
            w.add_tensor(gname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--type", default="F32")
    a = ap.parse_args()
    print(write_gguf(a.hf_dir, a.out, a.type))
