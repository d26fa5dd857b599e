// Prompt templates, named: how an instruction (and its optional input) becomes the
// prompt a model is trained on and generates from. The sidecar's
// python/nanotune/templates.py is the source of truth: training (load_dataset's
// instruction rows, `data.template`) and generation (`trainer.generate`, the
// `generate` method's `template`) both render there. This module renders the same
// templates in TypeScript for prompts built here (to show, log or send as "raw"),
// character for character like Python's `templates.render` (tests/ts/generate.test.ts
// compares the two through the project's Python).
//
//   renderTemplate("alpaca", { instruction: "Name a fruit." })   // the Alpaca prompt, ending "### Response:\n"
//   renderTemplate("raw", { instruction: "Name a fruit." })      // the text as it is
//   renderTemplate("Q: {instruction}\nA:", { instruction: "Name a fruit." })
//
// "chat" goes through the model's tokenizer (its chat template, a Jinja program that
// ships with the model), so only the sidecar renders it: renderTemplate("chat", ...)
// throws, and `renderedBySidecar("chat")` is true. Pass `template: "chat"` to
// trainer.generate or to the data config instead; generate's result carries the
// prompt as rendered (`prompt`).
//
// Note [format strings]: a custom template is a Python format string whose only
// fields are {instruction} and {input}, "{{" and "}}" standing for literal braces.
// We parse it as Python's string.Formatter does (a lone "}" or an unclosed "{" is
// an error) and accept bare fields only: no conversion ("!r") nor format spec
// (":>10"), which would make TS and Python render differently for no use here.
import { NanotuneError } from "./errors.ts";

/** The named templates; anything else containing "{instruction}" is a custom format string. */
export const TEMPLATE_NAMES = ["alpaca", "chat", "raw"] as const;
export type TemplateName = (typeof TEMPLATE_NAMES)[number];
/** A named template or a custom format string with {instruction} (and optionally {input}). */
export type Template = TemplateName | (string & {});

/** LLM-Adapters' Alpaca prompt, with an input (the paper's finetuning format). */
export const ALPACA_PROMPT =
  "Below is an instruction that describes a task, paired with an input that provides further context. " +
  "Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
/** The Alpaca prompt when the input is empty (or only whitespace). */
export const ALPACA_PROMPT_NO_INPUT =
  "Below is an instruction that describes a task. " +
  "Write a response that appropriately completes the request.\n\n" +
  "### Instruction:\n{instruction}\n\n### Response:\n";

/** What a template is filled with. */
export interface TemplateFields {
  instruction: string;
  /** The template's {input}; default "". */
  input?: string;
}

type Piece = string | { field: "instruction" | "input" };

function templateError(message: string): NanotuneError {
  return new NanotuneError("INVALID_ARGUMENT", message, { data: { field: "template" } });
}

/** Whether only the sidecar can render `template` (it needs the model's tokenizer): "chat". */
export function renderedBySidecar(template: Template): boolean {
  return template === "chat";
}

/**
 * `template` itself when it names a template or is a valid custom format string;
 * otherwise a NanotuneError INVALID_ARGUMENT (data.field "template") saying why,
 * as the sidecar would (INVALID_PARAMS there).
 */
export function checkTemplate(template: Template): Template {
  parseTemplate(template);
  return template;
}

/** The pieces of a custom template; null for a named one. Throws like checkTemplate. */
function parseTemplate(template: string): Piece[] | null {
  if (typeof template !== "string") throw templateError(`a template must be a string, got ${typeof template}`);
  if ((TEMPLATE_NAMES as readonly string[]).includes(template)) return null;
  if (!template.includes("{instruction}")) {
    throw templateError(
      `unknown template ${JSON.stringify(template)}: use one of ${TEMPLATE_NAMES.map((n) => `'${n}'`).join(", ")} or a format string with {instruction} (and optionally {input})`,
    );
  }
  const invalid = (why: string) => templateError(`template ${JSON.stringify(template)} is not a valid format string: ${why}`);
  const pieces: (string | { field: string })[] = [];
  let literal = "";
  let i = 0;
  while (i < template.length) {
    const c = template[i]!;
    if (c !== "{" && c !== "}") {
      literal += c;
      i++;
      continue;
    }
    if (template[i + 1] === c) {
      // "{{" and "}}": a literal brace
      literal += c;
      i += 2;
      continue;
    }
    if (c === "}") throw invalid("Single '}' encountered in format string");
    if (i + 1 >= template.length) throw invalid("Single '{' encountered in format string");
    // A field runs to its matching "}" (braces nest inside it, as in Python).
    let depth = 1;
    let j = i + 1;
    for (; j < template.length && depth > 0; j++) {
      if (template[j] === "{") depth++;
      else if (template[j] === "}") depth--;
    }
    if (depth > 0) throw invalid("expected '}' before end of string");
    if (literal) pieces.push(literal);
    literal = "";
    pieces.push({ field: template.slice(i + 1, j - 1) });
    i = j;
  }
  if (literal) pieces.push(literal);
  // Like Python: the whole string parses first, then the fields are looked at.
  const bad = pieces.find((p): p is { field: string } => typeof p !== "string" && p.field !== "instruction" && p.field !== "input");
  if (bad) {
    throw templateError(
      `template ${JSON.stringify(template)} has the field {${bad.field}}; only {instruction} and {input} are filled in, as they are (write {{ and }} for literal braces)`,
    );
  }
  return pieces as Piece[];
}

/** Python's str.isspace() for every character (JS's \s differs: U+FEFF, U+001C-U+001F, U+0085). */
const PY_SPACE = /^[\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*$/;

function fill(pieces: Piece[], instruction: string, input: string): string {
  return pieces.map((p) => (typeof p === "string" ? p : p.field === "instruction" ? instruction : input)).join("");
}

/**
 * The prompt for `instruction` (and `input`) under `template`, as the sidecar renders
 * it: "alpaca" (ALPACA_PROMPT, or ALPACA_PROMPT_NO_INPUT when the input is empty or
 * whitespace), "raw" (the instruction, then the input after a blank line when there
 * is one), or a custom format string (Note [format strings]). "chat" throws: the
 * sidecar renders it with the model's tokenizer (pass `template: "chat"` to
 * trainer.generate).
 */
export function renderTemplate(template: Template, fields: TemplateFields): string {
  const pieces = parseTemplate(template);
  const { instruction } = fields;
  const input = fields.input ?? "";
  if (typeof instruction !== "string" || typeof input !== "string") {
    throw new NanotuneError("INVALID_ARGUMENT", "renderTemplate: instruction and input must be strings", { data: { field: typeof instruction !== "string" ? "instruction" : "input" } });
  }
  if (pieces !== null) return fill(pieces, instruction, input);
  if (template === "alpaca") return fill(parseTemplate(PY_SPACE.test(input) ? ALPACA_PROMPT_NO_INPUT : ALPACA_PROMPT)!, instruction, input);
  if (template === "raw") return instruction + (input ? `\n\n${input}` : "");
  throw new NanotuneError(
    "INVALID_ARGUMENT",
    "the 'chat' template is rendered by the sidecar, through the model's tokenizer (its chat template): pass template 'chat' to trainer.generate or in the data config; the result's `prompt` is the rendered text",
    { data: { field: "template" } },
  );
}

/** The templates in one object, like `schedules` and `policies`. */
export const templates = {
  names: TEMPLATE_NAMES,
  render: renderTemplate,
  check: checkTemplate,
  renderedBySidecar,
  ALPACA_PROMPT,
  ALPACA_PROMPT_NO_INPUT,
} as const;
