// Writes what protocol/schema.ts generates: protocol/schema.json (the contract as
// JSON Schema, for any language) and python/nanotune/wire.py (the sidecar's msgspec
// Structs, with the schema's constraints). `npm run protocol:generate`; the protocol
// tests fail when either file is stale.
//
// wire.py is made from the JSON Schema, not from zod internals: every construct the
// schema uses must map to msgspec (object, array, tuple, record, enum, const, anyOf,
// number/integer ranges, string length); anything else stops the generator with the
// path of the construct, so a new zod feature cannot slip through untyped.
import { writeFileSync } from "node:fs";
import { toJSON } from "./schema.ts";

export const schemaJsonPath = new URL("./schema.json", import.meta.url);
export const schemaJsonText = () => JSON.stringify(toJSON(), null, 2) + "\n";

export const wirePyPath = new URL("../python/nanotune/wire.py", import.meta.url);

type JSONSchema = {
  type?: string | string[];
  properties?: Record<string, JSONSchema>;
  required?: string[];
  additionalProperties?: boolean | JSONSchema;
  propertyNames?: JSONSchema;
  items?: JSONSchema | false;
  prefixItems?: JSONSchema[];
  minItems?: number;
  maxItems?: number;
  anyOf?: JSONSchema[];
  enum?: unknown[];
  const?: unknown;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  exclusiveMaximum?: number;
  minLength?: number;
  maxLength?: number;
  description?: string;
  title?: string;
  default?: unknown;
};

const SAFE = Number.MAX_SAFE_INTEGER;
const PY_KEYWORDS = new Set(["from", "import", "class", "def", "global", "lambda", "pass", "in", "is", "not", "and", "or", "if", "else", "return", "yield", "with", "as", "try", "except", "raise", "del", "for", "while", "break", "continue", "assert", "async", "await", "None", "True", "False", "nonlocal", "finally", "elif"]);

const pascal = (name: string) =>
  name
    .split(/[^A-Za-z0-9]+/)
    .filter(Boolean)
    .map((w) => w[0]!.toUpperCase() + w.slice(1))
    .join("");
const snake = (name: string) => name.replace(/([a-z0-9])([A-Z])/g, "$1_$2").replace(/([A-Z])([A-Z][a-z])/g, "$1_$2").toLowerCase();
const pyLiteral = (v: unknown): string => {
  if (v === null) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v === "string" || typeof v === "number") return JSON.stringify(v);
  throw new Error(`no Python literal for ${JSON.stringify(v)}`);
};
const comment = (s: string | undefined) => (s ? `  # ${s.replace(/\s+/g, " ")}` : "");

/** Turns JSON Schemas into msgspec Struct classes, in dependency order. */
class PythonStructs {
  readonly classes: string[] = [];
  private readonly byName = new Map<string, string>(); // class name -> canonical JSON of its schema
  private readonly titled = new Map<string, JSONSchema>(); // Structs named by a .meta({ title }), candidates for subclassing

  /** The Python type of `s`; `name` is the class name an object schema without a title gets. */
  type(s: JSONSchema, name: string, where: string): string {
    if (s.anyOf) {
      const parts = s.anyOf.map((x, i) => this.type(x, s.anyOf!.length > 2 ? `${name}${i}` : name, `${where}.anyOf[${i}]`));
      return [...new Set(parts)].join(" | ");
    }
    if (Array.isArray(s.type)) {
      // {"type": ["number", "null"]}: a nullable primitive
      return s.type.map((t) => this.type({ ...s, type: t }, name, where)).join(" | ");
    }
    if (s.const !== undefined) return `Literal[${pyLiteral(s.const)}]`;
    if (s.enum) return `Literal[${s.enum.map(pyLiteral).join(", ")}]`;
    switch (s.type) {
      case "null":
        return "None";
      case "boolean":
        return "bool";
      case "string":
        return this.constrained("str", { min_length: s.minLength, max_length: s.maxLength });
      case "integer":
        return this.constrained("int", {
          ge: s.minimum === -SAFE ? undefined : s.minimum,
          le: s.maximum === SAFE ? undefined : s.maximum,
          gt: s.exclusiveMinimum,
          lt: s.exclusiveMaximum,
        });
      case "number":
        return this.constrained("float", { ge: s.minimum, le: s.maximum, gt: s.exclusiveMinimum, lt: s.exclusiveMaximum });
      case "array":
        if (s.prefixItems) return `tuple[${s.prefixItems.map((x, i) => this.type(x, `${name}${i}`, `${where}[${i}]`)).join(", ")}]`;
        if (!s.items) throw new Error(`${where}: an array without items`);
        return this.constrained(`list[${this.type(s.items, `${name}Item`, `${where}[]`)}]`, { min_length: s.minItems, max_length: s.maxItems });
      case "object":
        if (s.properties) return this.struct(s, s.title ?? name, where);
        if (typeof s.additionalProperties === "object") return `dict[str, ${this.type(s.additionalProperties, `${name}Value`, `${where}{}`)}]`;
        throw new Error(`${where}: an object without properties or value schema`);
      case undefined:
        if (Object.keys(s).filter((k) => k !== "description" && k !== "default").length === 0) return "Any"; // z.unknown()
    }
    throw new Error(`${where}: cannot map ${JSON.stringify(s)} to a Python type; extend protocol/generate.ts`);
  }

  private constrained(base: string, meta: Record<string, number | undefined>): string {
    const args = Object.entries(meta)
      .filter(([, v]) => v !== undefined)
      .map(([k, v]) => `${k}=${v}`);
    return args.length ? `Annotated[${base}, Meta(${args.join(", ")})]` : base;
  }

  /** Defines (once) the Struct for an object schema and returns its name. */
  struct(s: JSONSchema, name: string, where: string): string {
    const key = JSON.stringify(s);
    const seen = this.byName.get(name);
    if (seen !== undefined) {
      if (seen === key) return name;
      throw new Error(`${where}: two different schemas want the Python name ${name}; give one a distinct .meta({ title })`);
    }
    this.byName.set(name, key);
    if (s.additionalProperties !== false) throw new Error(`${where}: wire objects must be strict (z.strictObject)`);
    const required = new Set(s.required ?? []);
    const base = this.baseOf(s);
    if (s.title) this.titled.set(name, s);
    const fields: string[] = [];
    for (const [wireName, prop] of Object.entries(s.properties ?? {})) {
      if (base && wireName in base.schema.properties!) continue; // inherited
      const field = PY_KEYWORDS.has(snake(wireName)) ? `${snake(wireName)}_` : snake(wireName);
      let type = this.type(prop, name + pascal(wireName), `${where}.${wireName}`);
      const rename = field === wireName ? null : JSON.stringify(wireName);
      let value: string | null = null;
      if (prop.default !== undefined) value = pyLiteral(prop.default);
      else if (!required.has(wireName)) {
        if (!type.split(" | ").includes("None")) type = `${type} | None`;
        value = "None";
      }
      const rhs =
        rename && value !== null ? ` = msgspec.field(default=${value}, name=${rename})` : rename ? ` = msgspec.field(name=${rename})` : value !== null ? ` = ${value}` : "";
      fields.push(`    ${field}: ${type}${rhs}${comment(prop.description)}`);
    }
    const doc = s.description ? `    """${s.description.replace(/"""/g, "'''")}"""\n\n` : "";
    this.classes.push(`class ${name}(${base?.name ?? "Model"}, kw_only=True):\n${doc}${fields.join("\n") || "    pass"}\n`);
    return name;
  }

  /**
   * The largest titled Struct whose fields this object schema has too, unchanged
   * (what zod's `.extend()` makes): the new Struct subclasses it, so Python code can
   * treat it as one (SetMaskPolicyParams is a MaskDecision).
   */
  private baseOf(s: JSONSchema): { name: string; schema: JSONSchema } | null {
    let best: { name: string; schema: JSONSchema } | null = null;
    for (const [name, t] of this.titled) {
      const props = Object.entries(t.properties ?? {});
      const extends_ =
        props.length < Object.keys(s.properties ?? {}).length &&
        props.every(([k, v]) => JSON.stringify(s.properties?.[k]) === JSON.stringify(v)) &&
        (t.required ?? []).every((k) => s.required?.includes(k)) &&
        (s.required ?? []).filter((k) => k in t.properties!).length === (t.required ?? []).length;
      if (extends_ && (!best || props.length > Object.keys(best.schema.properties!).length)) best = { name, schema: t };
    }
    return best;
  }
}

/** python/nanotune/wire.py: the whole file. */
export function wirePyText(json: ReturnType<typeof toJSON> = toJSON()): string {
  const structs = new PythonStructs();
  structs.struct(json.envelope.tensorRef as JSONSchema, "TensorRef", "TensorRef");
  // titled objects first, so an untitled `.extend()` of one anywhere can subclass it
  const titled = (s: unknown, where: string): void => {
    if (Array.isArray(s)) return s.forEach((x, i) => titled(x, `${where}[${i}]`));
    if (typeof s !== "object" || s === null) return;
    for (const [k, v] of Object.entries(s)) titled(v, `${where}.${k}`);
    const o = s as JSONSchema;
    if (o.title && o.type === "object" && o.properties) structs.struct(o, o.title, where);
  };
  titled(json.methods, "methods");
  titled(json.events, "events");
  const methodRows: string[] = [];
  for (const [name, m] of Object.entries(json.methods)) {
    const base = pascal(name);
    // a titled schema keeps its title (MaskResult serves two methods), else Method + Params/Result
    const params = structs.type(m.params as JSONSchema, `${base}Params`, `methods.${name}.params`);
    const result = structs.type(m.result as JSONSchema, `${base}Result`, `methods.${name}.result`);
    methodRows.push(`    ${JSON.stringify(name)}: MethodSpec(${params}, ${result}, ${JSON.stringify(m.thread)}, ${JSON.stringify(m.description)}),`);
  }
  const eventRows = Object.entries(json.events).map(([name, s]) => `    ${JSON.stringify(name)}: ${structs.struct(s as JSONSchema, pascal(name), `events.${name}`)},`);
  const codes = Object.entries(json.errorCodes);
  return `"""The nanotune wire protocol's types for Python, generated from protocol/schema.ts.

Do not edit: run \`npm run protocol:generate\` after changing protocol/schema.ts
(tests/ts/protocol.test.ts fails while this file is stale). Python names are
snake_case; each Struct maps them to the camelCase names on the wire. Decoding a
message validates it against the schema, constraints included (ranges, lengths,
enums, required and unknown fields), so handlers never re-check those by hand.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = ${json.protocolVersion}


class ErrorCode:
    """The error-code table; \`ERROR_CODES\` has each code's origin and description."""

${codes.map(([c, v]) => `    ${c} = ${JSON.stringify(c)}  # ${v.origin}: ${v.description}`).join("\n")}


ERROR_CODES: dict[str, dict[str, Any]] = {
${codes.map(([c, v]) => `    ${JSON.stringify(c)}: {"origin": ${JSON.stringify(v.origin)}, "user_error": ${pyLiteral(v.userError)}, "description": ${JSON.stringify(v.description)}},`).join("\n")}
}

DTYPES = (${json.dtypes.map((d) => JSON.stringify(d)).join(", ")})


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Base of every wire Struct: unknown fields are errors; absent optional fields are
    omitted. A field whose wire name differs from its Python name says so with
    msgspec.field(name=...), rather than a blanket rename rule. Every subclass is
    kw_only=True too (msgspec applies it per class), so an optional field may come
    before a required one."""


${structs.classes.join("\n\n")}

class MethodSpec(NamedTuple):
    params: type[Model]
    result: type[Model]
    thread: Literal["io", "compute"]  # "io": answered at once by the I/O thread; "compute": one at a time
    description: str


METHODS: dict[str, MethodSpec] = {
${methodRows.join("\n")}
}

EVENTS: dict[str, type[Model]] = {
${eventRows.join("\n")}
}
`;
}

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split("/").pop()!)) {
  writeFileSync(schemaJsonPath, schemaJsonText());
  writeFileSync(wirePyPath, wirePyText());
  console.log(`wrote ${schemaJsonPath.pathname} and ${wirePyPath.pathname}`);
}
