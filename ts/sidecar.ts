// The TS side of the bridge: starts `python -m nanotune.sidecar`, talks to it over a
// ZeroMQ DEALER with msgpack envelopes (protocol/schema.ts), and makes sure the
// process never outlives us. See DESIGN.md "Wire rules".
//
// Concurrency: calls may overlap; "io" methods (ping, status, cancel, ...) are answered
// at once, but the sidecar runs one "compute" call at a time and answers a second one
// with BUSY instead of queueing it.
// Parent death: the sidecar asks Linux for SIGTERM when the thread that spawned it
// exits (PR_SET_PDEATHSIG) and also polls our pid. Start it from the main thread: a
// Sidecar started in a worker_thread dies with that thread.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { Dealer } from "zeromq";
import type { z } from "zod";
import { PROTOCOL_VERSION, events as eventSchemas, methods, type EventName, type MethodName, type TensorRef } from "../protocol/schema.ts";
import { SidecarError, wireCode, type ErrorCode } from "./errors.ts";
import { findPython, noPythonMessage, packageRoot, pythonPathWith } from "./paths.ts";
import { Tensor } from "./tensor.ts";
import { bigIntegers, decode, encode, refsToTensors, tensorsToRefs } from "./wire.ts";

/** @deprecated use packageRoot (ts/paths.ts): the directory of nanotune's package.json. */
export const repoRoot = packageRoot;

/** The part of the spawned process the Sidecar uses (an execa subprocess). */
interface SidecarProcess {
  readonly pid?: number | undefined;
  readonly exitCode: number | null;
  readonly signalCode: NodeJS.Signals | null;
  kill(signal: NodeJS.Signals): boolean;
}

/** Wire types with every TensorRef replaced by a Tensor (what call() takes and returns). */
export type WithTensors<T> = T extends TensorRef
  ? Tensor
  : T extends readonly (infer U)[]
    ? WithTensors<U>[]
    : T extends Tensor | Uint8Array
      ? T
      : T extends object
        ? { [K in keyof T]: WithTensors<T[K]> }
        : T;
export type Params<M extends MethodName> = WithTensors<z.input<(typeof methods)[M]["params"]>>;
export type Result<M extends MethodName> = WithTensors<z.output<(typeof methods)[M]["result"]>>;
export type HelloInfo = Result<"hello">;
export type SidecarEvent = { [E in EventName]: { event: E; data: z.output<(typeof eventSchemas)[E]> } }[EventName];

export interface SidecarOptions {
  /**
   * Python interpreter. Default, in this order: env NANOTUNE_PYTHON, the checkout's
   * .venv/bin/python (a development clone), the environment `npx nanotune setup`
   * made under NANOTUNE_HOME (~/.cache/nanotune) for this version; START_FAILED when none exists.
   */
  python?: string;
  /** "auto": CUDA (bf16) when torch sees a GPU, else CPU (fp32). "cuda" fails without one. Default "auto". */
  device?: "auto" | "cpu" | "cuda";
  /** How long the process may take to print its endpoint and answer hello (imports torch). Default 120 000. */
  startTimeoutMs?: number;
  /** Extra environment for the process (merged over process.env; undefined removes a variable). */
  env?: Record<string, string | undefined>;
  /** "ipc" (default; a socket in a private temp dir) or "tcp" (127.0.0.1, random port). ipc falls back to tcp by itself where it cannot bind. */
  transport?: "ipc" | "tcp";
  /** Default timeout of call(); Infinity (the default) waits as long as the process lives, so a long GPU step is never cut off. */
  callTimeoutMs?: number;
  /** Each line the process writes to stderr; default: copied to our stderr. The last lines are kept for SIDECAR_CRASHED either way. */
  onStderr?: (line: string) => void;
  /** The protocol version we claim in hello; only for testing version skew. Default PROTOCOL_VERSION. */
  protocolVersion?: number;
}

export interface CallOptions {
  /** Reject with TIMEOUT (after asking the sidecar to cancel) when no answer came by then. Default: SidecarOptions.callTimeoutMs. */
  timeoutMs?: number;
  /** Aborting cancels the call in the sidecar; the promise rejects with CANCELLED once the sidecar stopped it. */
  signal?: AbortSignal;
}

const STDERR_LINES = 40; // kept for SIDECAR_CRASHED
const CLOSE_STEP_MS = 2000; // close(): how long each of shutdown, SIGTERM, SIGKILL may take
const CANCEL_WAIT_MS = 3000; // how long an aborted/timed-out call waits for the sidecar to confirm (> its forced-cancel delay)

interface Pending {
  method: string;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
  /** set once aborted or timed out: the call rejects with this whatever the sidecar answers */
  failWith?: SidecarError;
  timers: NodeJS.Timeout[];
  unlisten?: () => void;
}

class EventStream implements AsyncIterableIterator<SidecarEvent> {
  private buffer: SidecarEvent[] = [];
  private waiting: ((r: IteratorResult<SidecarEvent>) => void) | null = null;
  ended = false;
  constructor(private readonly onReturn: (s: EventStream) => void) {}
  push(ev: SidecarEvent) {
    if (this.ended) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w({ value: ev, done: false });
    } else this.buffer.push(ev);
  }
  end() {
    this.ended = true;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = null;
      w({ value: undefined, done: true });
    }
  }
  next(): Promise<IteratorResult<SidecarEvent>> {
    const ev = this.buffer.shift();
    if (ev !== undefined) return Promise.resolve({ value: ev, done: false });
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => (this.waiting = resolve));
  }
  return(): Promise<IteratorResult<SidecarEvent>> {
    this.end();
    this.onReturn(this);
    return Promise.resolve({ value: undefined, done: true });
  }
  [Symbol.asyncIterator]() {
    return this;
  }
}

export class Sidecar {
  /** What the sidecar said at hello: protocol, torch, device, CUDA memory, methods. */
  info!: HelloInfo;
  /** The ZeroMQ endpoint the sidecar serves (ipc:// or tcp://). */
  readonly endpoint: string;
  readonly pid: number;

  private readonly socket = new Dealer({ linger: 0 });
  private readonly pending = new Map<number, Pending>();
  private readonly streams = new Set<EventStream>();
  private readonly stderrTail: string[] = [];
  private readonly exited: Promise<void>;
  private outbox: { parts: Uint8Array[]; resolve: () => void; reject: (e: unknown) => void }[] = [];
  private sending = false;
  private nextId = 1;
  private dead: SidecarError | null = null; // set when the process is gone or we closed
  private closing: Promise<void> | null = null;
  private shuttingDown = false; // close() began: an exit now is not a crash

  private constructor(
    private readonly child: SidecarProcess,
    endpoint: string,
    private readonly tempDir: string | null,
    private readonly opts: SidecarOptions,
    stderrTail: string[],
    exited: Promise<void>,
  ) {
    this.endpoint = endpoint;
    this.pid = child.pid!;
    this.stderrTail = stderrTail;
    this.exited = exited;
    this.socket.connect(endpoint);
    void this.receiveLoop();
  }

  /** Starts the sidecar process and completes the hello handshake (PROTOCOL_MISMATCH if versions differ). */
  static async start(options: SidecarOptions = {}): Promise<Sidecar> {
    const opts = { device: "auto", startTimeoutMs: 120_000, transport: "ipc", callTimeoutMs: Infinity, ...options } satisfies SidecarOptions;
    const merged: Record<string, string | undefined> = { ...process.env, ...opts.env };
    const found = findPython(opts.python, merged);
    if (!found) throw new SidecarError("START_FAILED", noPythonMessage(merged), { data: { reason: "no-python" } });
    const python = found.python;
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(merged)) if (v !== undefined) env[k] = v;
    env.PYTHONUNBUFFERED = "1";
    env.PYTHONPATH = pythonPathWith(merged.PYTHONPATH);
    const tempDir = opts.transport === "ipc" ? mkdtempSync(join(tmpdir(), "nanotune-")) : null;
    const endpoint = tempDir ? `ipc://${join(tempDir, "sidecar.sock")}` : "tcp://127.0.0.1:*";
    const deadline = Date.now() + opts.startTimeoutMs;
    const cleanupDir = () => tempDir && rmSync(tempDir, { recursive: true, force: true });

    // --parent-pid: the sidecar also asks Linux for SIGTERM when this thread dies
    // (PR_SET_PDEATHSIG); execa's cleanup kills it when Node exits normally.
    const child = execa(python, ["-m", "nanotune.sidecar", "--endpoint", endpoint, "--device", opts.device, "--parent-pid", String(process.pid)], {
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env,
      extendEnv: false,
      buffer: false,
      reject: false,
      cleanup: true,
      forceKillAfterDelay: false, // close() runs its own SIGTERM -> SIGKILL ladder
    });
    // With reject: false the promise resolves once the process is gone; a spawn
    // failure (ENOENT, EACCES) resolves it with neither exit code nor signal.
    const spawnError = child.then((r) => (r.exitCode === undefined && r.signal === undefined ? r : null));
    const stderrTail: string[] = [];
    const onStderr = opts.onStderr ?? ((line: string) => process.stderr.write(`${line}\n`));
    lines(child.stderr!, (line) => {
      stderrTail.push(line);
      if (stderrTail.length > STDERR_LINES) stderrTail.shift();
      onStderr(line);
    });
    const stderrEnded = new Promise<void>((r) => child.stderr!.once("close", () => r()));
    let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    const exited = new Promise<void>((resolve) => {
      child.once("exit", (code, signal) => {
        exitInfo = { code, signal };
        // stderr may still hold the last lines (a traceback); wait briefly for them
        void Promise.race([stderrEnded, new Promise((r) => setTimeout(r, 100))]).then(() => resolve());
      });
      void spawnError.then((r) => r && resolve());
    });

    let ready: string;
    let timer: NodeJS.Timeout | undefined;
    try {
      ready = await new Promise<string>((resolve, reject) => {
        timer = setTimeout(
          () => reject(new SidecarError("START_FAILED", `sidecar (${python}) did not start within ${opts.startTimeoutMs} ms; last stderr:\n${stderrTail.join("\n")}`)),
          opts.startTimeoutMs,
        );
        void spawnError.then((r) => {
          if (!r) return;
          const from = found.source === "option" ? "options.python" : found.source;
          const why = `cannot run ${python} (from ${from}): ${r.originalMessage || r.shortMessage}`;
          const fix = "pass options.python, set NANOTUNE_PYTHON, or run `npx nanotune setup` (`npm run setup` in a checkout)";
          reject(new SidecarError("START_FAILED", `${why}; ${fix}`, { cause: r.cause, data: { python, source: found.source, code: r.code } }));
        });
        void exited.then(() => {
          if (!exitInfo) return; // it never ran: spawnError says why
          reject(
            new SidecarError(
              "START_FAILED",
              `sidecar (${python}) exited before it was ready (${describeExit(exitInfo)}); last stderr:\n${stderrTail.join("\n")}`,
              { data: { ...exitInfo, stderr: [...stderrTail] } },
            ),
          );
        });
        lines(child.stdout!, (line) => {
          try {
            const msg = JSON.parse(line) as { ready?: string };
            if (typeof msg.ready === "string") resolve(msg.ready);
          } catch {
            onStderr(`[sidecar stdout] ${line}`);
          }
        });
      }).finally(() => clearTimeout(timer)); // else the start timer keeps a finished script alive
    } catch (e) {
      child.kill("SIGKILL");
      cleanupDir();
      throw e;
    }

    const sc = new Sidecar(child, ready, tempDir, opts, stderrTail, exited);
    void exited.then(() => sc.onExit(exitInfo));
    try {
      sc.info = await sc.hello({ timeoutMs: Math.max(1, deadline - Date.now()) });
    } catch (e) {
      await sc.close();
      if (e instanceof SidecarError && e.code === "TIMEOUT") {
        throw new SidecarError("START_FAILED", `sidecar did not answer hello within ${opts.startTimeoutMs} ms`, { cause: e });
      }
      throw e;
    }
    return sc;
  }

  /** The handshake: checks protocol versions, returns the runtime (torch, device, CUDA memory). */
  async hello(options: CallOptions = {}): Promise<HelloInfo> {
    const mine = this.opts.protocolVersion ?? PROTOCOL_VERSION;
    const info = await this.call("hello", { protocol: mine, client: "nanotune-ts" }, options);
    if (info.protocol !== mine) {
      throw new SidecarError("PROTOCOL_MISMATCH", `hello: the client speaks protocol v${mine} but the sidecar answered v${info.protocol}`, {
        method: "hello",
        data: { client: mine, sidecar: info.protocol },
      });
    }
    return info;
  }

  /** Calls `method` with params checked against protocol/schema.ts; tensors travel as raw frames. */
  call<M extends MethodName>(method: M, params: Params<M>, options: CallOptions = {}): Promise<Result<M>> {
    return this.request(method, params, options) as Promise<Result<M>>;
  }

  /**
   * Untyped call(): `method` may be a name the TS schema does not know (it is then
   * sent unchecked and the sidecar validates it). For tests and experiments.
   */
  request(method: string, params: unknown, options: CallOptions = {}): Promise<unknown> {
    if (this.dead) return Promise.reject(this.dead);
    const { signal } = options;
    if (signal?.aborted) {
      return Promise.reject(new SidecarError("CANCELLED", `${method}: aborted before it was sent`, { method, cause: signal.reason }));
    }
    const frames: Uint8Array[] = [];
    const wireParams = tensorsToRefs(params ?? {}, frames);
    const schema = (methods as Record<string, { params: z.ZodType; result: z.ZodType }>)[method];
    if (schema) {
      const parsed = schema.params.safeParse(wireParams);
      if (!parsed.success) return Promise.reject(invalidParams(method, parsed.error));
    }
    const id = this.nextId++;
    const v = method === "hello" ? (this.opts.protocolVersion ?? PROTOCOL_VERSION) : PROTOCOL_VERSION;
    const envelope = encode({ v, id, method, params: bigIntegers(wireParams) });
    return new Promise((resolve, reject) => {
      const p: Pending = { method, resolve, reject, timers: [] };
      this.pending.set(id, p);
      const giveUp = (err: SidecarError) => {
        if (p.failWith) return;
        p.failWith = err;
        if (this.methodThread(method) === "compute") {
          this.request("cancel", { id }).catch(() => undefined);
          // settle when the sidecar confirms (so the next call finds it idle), or after CANCEL_WAIT_MS
          p.timers.push(setTimeout(() => this.settle(id, err), CANCEL_WAIT_MS));
        } else this.settle(id, err);
      };
      const timeoutMs = options.timeoutMs ?? this.opts.callTimeoutMs ?? Infinity;
      if (Number.isFinite(timeoutMs)) {
        p.timers.push(
          setTimeout(
            () => giveUp(new SidecarError("TIMEOUT", `${method} (id ${id}) did not answer within ${timeoutMs} ms; cancelled it`, { method })),
            timeoutMs,
          ),
        );
      }
      if (signal) {
        const onAbort = () => giveUp(new SidecarError("CANCELLED", `${method} (id ${id}) was aborted`, { method, cause: signal.reason }));
        signal.addEventListener("abort", onAbort, { once: true });
        p.unlisten = () => signal.removeEventListener("abort", onAbort);
      }
      this.send([envelope, ...frames]).catch((e) => this.settle(id, this.dead ?? new SidecarError("INTERNAL", `${method}: send failed: ${e}`, { method, cause: e })));
    });
  }

  /** Unsolicited events `{event, data}` from now on; the iterator ends when the sidecar closes or dies. */
  events(): AsyncIterableIterator<SidecarEvent> {
    const s = new EventStream((x) => this.streams.delete(x));
    if (this.dead) s.end();
    else this.streams.add(s);
    return s;
  }

  /** Stops the sidecar: `shutdown`, then SIGTERM, then SIGKILL, each given 2 s; removes the temp dir. Idempotent. */
  close(): Promise<void> {
    this.closing ??= this.doClose();
    return this.closing;
  }

  private async doClose(): Promise<void> {
    const alive = () => this.child.exitCode === null && this.child.signalCode === null;
    const waitExit = (ms: number) => Promise.race([this.exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms).unref())]);
    this.shuttingDown = true;
    if (alive() && !this.dead) {
      await this.request("shutdown", {}, { timeoutMs: CLOSE_STEP_MS }).catch(() => undefined);
    }
    this.kill(new SidecarError("CLOSED", "the sidecar was closed"));
    if (alive() && !(await waitExit(CLOSE_STEP_MS))) {
      this.child.kill("SIGTERM");
      if (!(await waitExit(CLOSE_STEP_MS))) {
        this.child.kill("SIGKILL");
        await waitExit(CLOSE_STEP_MS);
      }
    }
    this.socket.close();
    if (this.tempDir) rmSync(this.tempDir, { recursive: true, force: true });
  }

  // ---- internals -------------------------------------------------------------

  private methodThread(method: string): "io" | "compute" {
    return (methods as Record<string, { thread: "io" | "compute" }>)[method]?.thread ?? "compute";
  }

  /** zeromq.js allows one send in flight per socket; this keeps the rest in order. */
  private send(parts: Uint8Array[]): Promise<void> {
    if (!this.sending) {
      // fast path (every call when calls do not overlap): no queue entry, no extra promise
      this.sending = true;
      const sent = this.socket.send(parts);
      void sent.then(
        () => this.flush(),
        () => this.flush(),
      );
      return sent;
    }
    return new Promise((resolve, reject) => this.outbox.push({ parts, resolve, reject }));
  }

  /** Sends what queued up while a send was in flight, in order. */
  private async flush() {
    for (let m = this.outbox.shift(); m; m = this.outbox.shift()) {
      try {
        await this.socket.send(m.parts);
        m.resolve();
      } catch (e) {
        m.reject(e);
      }
    }
    this.sending = false;
  }

  private async receiveLoop() {
    try {
      for await (const [envelope, ...frames] of this.socket) {
        this.onMessage(envelope!, frames);
      }
    } catch (e) {
      if (!this.dead) this.kill(new SidecarError("INTERNAL", `receiving from the sidecar failed: ${e}`, { cause: e }));
    }
  }

  private onMessage(envelope: Buffer, frames: Buffer[]) {
    let msg: Record<string, unknown>;
    try {
      msg = decode(envelope) as Record<string, unknown>;
    } catch (e) {
      process.emitWarning(`nanotune: dropped an undecodable message from the sidecar: ${e}`);
      return;
    }
    if (typeof msg.event === "string") {
      const schema = (eventSchemas as Record<string, z.ZodType>)[msg.event];
      const parsed = schema ? schema.safeParse(msg.data) : { success: true as const, data: msg.data };
      if (!parsed.success) {
        process.emitWarning(`nanotune: event ${msg.event} does not match the protocol: ${parsed.error.message}`);
        return;
      }
      const ev = { event: msg.event, data: refsToTensors(parsed.data, frames) } as SidecarEvent;
      for (const s of this.streams) s.push(ev);
      return;
    }
    const id = msg.id as number;
    const p = this.pending.get(id);
    if (!p) {
      if (msg.error) process.emitWarning(`nanotune: sidecar error for unknown request ${String(id)}: ${JSON.stringify(msg.error)}`);
      return;
    }
    if (p.failWith) return this.settle(id, p.failWith);
    if (msg.error) {
      const err = msg.error as { code?: unknown; message?: unknown; data?: unknown; traceback?: string | null };
      return this.settle(
        id,
        new SidecarError(wireCode(err.code), String(err.message ?? err.code), { data: err.data, traceback: err.traceback ?? null, method: p.method }),
      );
    }
    const schema = (methods as Record<string, { result: z.ZodType }>)[p.method];
    if (schema) {
      const parsed = schema.result.safeParse(msg.result);
      if (!parsed.success) {
        const issue = parsed.error.issues[0]!;
        return this.settle(
          id,
          new SidecarError("INTERNAL", `${p.method}: the sidecar's result does not match the protocol at result.${issue.path.join(".")}: ${issue.message}`, {
            method: p.method,
            data: { issues: parsed.error.issues },
          }),
        );
      }
    }
    try {
      this.settle(id, undefined, refsToTensors(msg.result, frames));
    } catch (e) {
      this.settle(id, new SidecarError("INTERNAL", `${p.method}: bad tensor in result: ${e}`, { method: p.method, cause: e }));
    }
  }

  private settle(id: number, error: SidecarError | undefined, result?: unknown) {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    for (const t of p.timers) clearTimeout(t);
    p.unlisten?.();
    if (error) p.reject(error);
    else p.resolve(result);
  }

  /** Rejects everything pending with `err`, ends event streams; later calls reject with it. */
  private kill(err: SidecarError) {
    if (this.dead) return;
    this.dead = err;
    for (const id of [...this.pending.keys()]) this.settle(id, err);
    for (const s of this.streams) s.end();
    this.streams.clear();
  }

  private onExit(exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null) {
    if (this.dead) return;
    if (this.shuttingDown) return this.kill(new SidecarError("CLOSED", "the sidecar was closed"));
    const stderr = [...this.stderrTail];
    const busy = [...this.pending.values()].map((p) => p.method);
    this.kill(
      new SidecarError(
        "SIDECAR_CRASHED",
        `sidecar (pid ${this.pid}) ${describeExit(exitInfo)}` +
          (busy.length ? ` while ${busy.join(", ")} ${busy.length > 1 ? "were" : "was"} pending` : "") +
          `; last stderr:\n${stderr.join("\n") || "(empty)"}`,
        { data: { pid: this.pid, signal: exitInfo?.signal ?? null, exitCode: exitInfo?.code ?? null, stderr } },
      ),
    );
    this.socket.close();
    if (this.tempDir) rmSync(this.tempDir, { recursive: true, force: true });
  }
}

function describeExit(info: { code: number | null; signal: NodeJS.Signals | null } | null): string {
  if (!info) return "could not be run";
  return info.signal ? `was killed by ${info.signal}` : `exited with code ${info.code}`;
}

function invalidParams(method: string, error: z.ZodError): SidecarError {
  const issue = error.issues[0]!;
  const field = ["params", ...issue.path.map(String)].join(".");
  return new SidecarError("INVALID_PARAMS", `${method}: invalid params at ${field}: ${issue.message}`, {
    method,
    data: { field, issues: error.issues },
  });
}

function lines(stream: NodeJS.ReadableStream, onLine: (line: string) => void) {
  let rest = "";
  stream.setEncoding("utf8");
  stream.on("data", (chunk: string) => {
    const parts = (rest + chunk).split("\n");
    rest = parts.pop()!;
    for (const l of parts) onLine(l);
  });
  stream.on("end", () => rest && onLine(rest));
}

export type { ErrorCode };
