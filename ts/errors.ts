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
      : error.issues.map((i) => ({ path: i.path.map(String).join(".") || "(root)", message: describeIssue(i) }));
    super("INVALID_CONFIG", `${source}: ${issues.map((i) => `${i.path}: ${i.message}`).join("; ")}`, {
      data: { source, issues },
      cause: Array.isArray(error) ? undefined : error,
    });
    this.issues = issues;
  }
}

function describeIssue(i: z.core.$ZodIssue): string {
  if (i.code === "unrecognized_keys") return `unknown field${i.keys.length > 1 ? "s" : ""} ${i.keys.map((k) => `'${k}'`).join(", ")}`;
  return i.message;
}

/** Maps a code that arrived from the sidecar to our table; an unknown one becomes INTERNAL. */
export function wireCode(code: unknown): ErrorCode {
  return typeof code === "string" && code in errorCodes ? (code as ErrorCode) : "INTERNAL";
}

/** Errors the user can fix (bad input, config, arguments, a missing setup): the CLI exits 2 on these, 1 on the rest. */
export function isUserError(e: unknown): e is NanotuneError {
  return e instanceof NanotuneError && (errorCodes[e.code].userError as boolean);
}
