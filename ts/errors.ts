// One error class for everything nanotune raises in TypeScript: `NanotuneError`,
// whose `code` comes from the protocol's error-code table (protocol/schema.ts
// `errorCodes`), so a caller catches one class and switches on `code`.
// `SidecarError` is the same class under its older name; `ConfigError` is the
// INVALID_CONFIG case with the wrong fields listed in `issues`.
import type { z } from "zod";
import { type ErrorCode as Code, errorCodes } from "../protocol/schema.ts";

export { errorCodes };
export type ErrorCode = Code;
export const ErrorCode = Object.fromEntries(Object.keys(errorCodes).map((k) => [k, k])) as { [K in ErrorCode]: K };

export interface NanotuneErrorOptions {
  /** Machine-readable details: `field` for INVALID_PARAMS, signal/stderr for SIDECAR_CRASHED, ... */
  data?: unknown;
  /** The Python traceback, for INTERNAL and OUT_OF_MEMORY errors raised in the sidecar. */
  traceback?: string | null;
  /** The method of the call that failed, when there was one. */
  method?: string;
  cause?: unknown;
}
/** @deprecated the old name of NanotuneErrorOptions */
export type SidecarErrorOptions = NanotuneErrorOptions;

export class NanotuneError extends Error {
  override name = "NanotuneError";
  readonly code: ErrorCode;
  readonly data: unknown;
  readonly traceback: string | null;
  readonly method: string | undefined;

  constructor(code: ErrorCode, message: string, options: NanotuneErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.data = options.data;
    this.traceback = options.traceback ?? null;
    this.method = options.method;
  }
}

/** The same class as NanotuneError (the bridge's errors were called SidecarError first). */
export const SidecarError = NanotuneError;
export type SidecarError = NanotuneError;

/** A wrong option or config file (code INVALID_CONFIG); `issues` names every wrong field by its path. */
export class ConfigError extends NanotuneError {
  override name = "ConfigError";
  readonly issues: { path: string; message: string }[];

  /** `source` says where the input came from ("Trainer options", a file path). */
  constructor(source: string, error: z.ZodError | { path: string; message: string }[]) {
    const issues = Array.isArray(error)
      ? error
      : error.issues.flatMap(openUnion).map((i) => ({ path: i.path.map(String).join(".") || "(root)", message: describeIssue(i) }));
    super("INVALID_CONFIG", `${source}: ${issues.map((i) => `${i.path}: ${i.message}`).join("; ")}`, {
      data: { source, issues },
      cause: Array.isArray(error) ? undefined : error,
    });
    this.issues = issues;
  }
}

function describeIssue(i: z.core.$ZodIssue): string {
  if (i.code === "unrecognized_keys") return `unknown field${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => `'${k}'`).join(", ")}`;
  if (i.code === "invalid_union") {
    const all = branches(i);
    if (all.length && all.every((branch) => branch.every((x) => x.path.length === 0))) {
      // no branch got further than the value itself: say what each expected
      const each = [...new Set(all.flatMap((branch) => branch.map((x) => x.message.replace(/^Invalid input: /, ""))))];
      if (each.length) return `Invalid input: ${each.join("; or ")}`;
    }
  }
  return i.message;
}

/**
 * A union's issue opened up: where exactly one branch matched the value's kind (`model`
 * is an object, not a string) and failed only deeper in (its `lora.targetModules`),
 * that branch's issues with full paths instead of one "Invalid input" at the union. A
 * branch did not match when an issue is about the value itself (path []) or a literal
 * (a `type: "cosine"` that is not "warmup").
 */
function openUnion(i: z.core.$ZodIssue): z.core.$ZodIssue[] {
  if (i.code !== "invalid_union" || !i.errors.length) return [i];
  const mismatch = (x: z.core.$ZodIssue) => x.path.length === 0 || (x.code === "invalid_value" && x.values.length === 1);
  const matched = branches(i).filter((branch) => branch.length > 0 && !branch.some(mismatch));
  if (matched.length !== 1) return [i];
  return matched[0]!.flatMap((x) => openUnion({ ...x, path: [...i.path, ...x.path] } as z.core.$ZodIssue));
}

/** A union's branches, with a union inside a union (at the same value) as its own branches. */
function branches(i: z.core.$ZodIssue): z.core.$ZodIssue[][] {
  if (i.code !== "invalid_union") return [[i]];
  return i.errors.flatMap((branch) => (branch.length === 1 && branch[0]!.code === "invalid_union" && branch[0]!.path.length === 0 ? branches(branch[0]!) : [branch]));
}

/** Maps a code that arrived from the sidecar to our table; an unknown one becomes INTERNAL. */
export function wireCode(code: unknown): ErrorCode {
  return typeof code === "string" && code in errorCodes ? (code as ErrorCode) : "INTERNAL";
}

/** Errors the user can fix (bad input, config, arguments, a missing setup): the CLI exits 2 on these, 1 on the rest. */
export function isUserError(e: unknown): e is NanotuneError {
  return e instanceof NanotuneError && (errorCodes[e.code].userError as boolean);
}
