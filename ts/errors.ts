// One error class for everything the bridge raises; `code` comes from the protocol's
// error-code table (protocol/schema.ts `errorCodes`).
import { ErrorCode, errorCodes } from "../protocol/schema.ts";

export { ErrorCode, errorCodes };

export interface SidecarErrorOptions {
  /** Machine-readable details: `field` for INVALID_PARAMS, signal/stderr for SIDECAR_CRASHED, ... */
  data?: unknown;
  /** The Python traceback, for INTERNAL and OUT_OF_MEMORY errors raised in the sidecar. */
  traceback?: string | null;
  /** The method of the call that failed, when there was one. */
  method?: string;
  cause?: unknown;
}

export class SidecarError extends Error {
  override name = "SidecarError";
  readonly code: ErrorCode;
  readonly data: unknown;
  readonly traceback: string | null;
  readonly method: string | undefined;

  constructor(code: ErrorCode, message: string, options: SidecarErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.data = options.data;
    this.traceback = options.traceback ?? null;
    this.method = options.method;
  }
}

/** Maps a code that arrived from the sidecar to our table; an unknown one becomes INTERNAL. */
export function wireCode(code: unknown): ErrorCode {
  return typeof code === "string" && code in errorCodes ? (code as ErrorCode) : "INTERNAL";
}
