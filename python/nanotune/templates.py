"""Prompt templates, named: how an instruction (and its optional input) becomes the
prompt a model is trained on and generates from. Training (data.load_dataset's
instruction rows) and generation (Session.generate) use the same function, so a
finetuned model is asked exactly the way it was taught.

    render("alpaca", "Name a fruit.")              # the Alpaca prompt, ending "### Response:\\n"
    render("chat", "Name a fruit.", tokenizer=tok)  # the tokenizer's chat template, one user turn
    render("raw", "Name a fruit.")                  # the text as it is
    render("Q: {instruction}\\nA:", "Name a fruit.") # a custom format string

- "alpaca": LLM-Adapters' Alpaca prompt (ALPACA_PROMPT, or ALPACA_PROMPT_NO_INPUT when
  the input is empty), the paper's finetuning format.
- "chat": one user message, instruction then (after a blank line) the input, through
  the tokenizer's chat template with the generation prompt (the assistant's turn
  follows); needs a tokenizer that has a chat template.
- "raw": the instruction, then the input after a blank line when there is one.
- anything else containing "{instruction}": a format string whose only fields are
  {instruction} and {input} ("{{" and "}}" for literal braces).

The TypeScript side exports the same templates (ts/templates.ts), rendered alike
(tests compare the two), for prompts built in TS.
"""

from __future__ import annotations

import string
from typing import Any

from .errors import InvalidParams

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "TEMPLATES", "TemplateError", "check_template", "render"]

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

TEMPLATES = ("alpaca", "chat", "raw")


class TemplateError(InvalidParams):
    """A template that cannot render (code INVALID_PARAMS, field "template")."""

    def __init__(self, message: str):
        super().__init__(message, field="template")


def check_template(template: str) -> str:
    """`template` if it names a template or is a valid custom format string."""
    if template in TEMPLATES:
        return template
    if "{instruction}" not in template:
        raise TemplateError(f"unknown template {template!r}: use one of {list(TEMPLATES)} or a format string with "
                            "{instruction} (and optionally {input})")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TemplateError(f"template {template!r} is not a valid format string: {e}") from None
    specs = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    fancy = [f for f, conv, spec in specs if conv is not None or spec]
    if fancy:  # the TypeScript side fills bare fields only (ts/templates.ts): both must render alike
        raise TemplateError(f"template {template!r}: {{{fancy[0]}}} has a conversion or format spec; write bare "
                            "{instruction} and {input} fields")
    bad = [f for f in fields if f not in ("instruction", "input")]
    if bad:
        raise TemplateError(f"template {template!r} has the field {{{bad[0]}}}; only {{instruction}} and {{input}} "
                            "are filled in (write {{ and }} for literal braces)")
    return template


def render(template: str, instruction: str, input: str = "", tokenizer: Any = None) -> str:
    """The prompt for `instruction` (and `input`) under `template` (see the module doc)."""
    check_template(template)
    if template == "alpaca":
        return (ALPACA_PROMPT if input.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction, input=input)
    if template == "raw":
        return instruction + (f"\n\n{input}" if input else "")
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the 'chat' template needs a tokenizer with a chat template, and this model's has "
                                "none; use 'alpaca', 'raw' or a format string")
        content = instruction + (f"\n\n{input}" if input else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return template.format(instruction=instruction, input=input)
