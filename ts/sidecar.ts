// The TS side of the bridge: starts `python -m nanotune.sidecar`, talks to it over a
// ZeroMQ DEALER with msgpack envelopes (protocol/schema.ts), and makes sure the
// process never outlives us. See docs/protocol.md.
//
// Concurrency: calls may overlap; "io" methods (ping, status, cancel, ...) are answered
// at once, but the sidecar runs one "compute" call at a time and answers a second one
// with BUSY instead of queueing it.
// Parent death: the sidecar asks Linux for SIGTERM when the thread that spawned it
// exits (PR_SET_PDEATHSIG) and also polls our pid. Start it from the main thread: a
// Sidecar started in a worker_thread dies with that thread.
// Reliability (docs/protocol.md): tcp is always CURVE with keys made here per start and
// handed over on stdin; a heartbeat (`status` every heartbeatMs while a call is
// pending) turns a stopped or stuck sidecar into SIDECAR_UNRESPONSIVE and a lost reply
// into INTERNAL; call() never throws synchronously and never hangs.
// Groups (docs/distributed.md): with `distributed`, torchrun starts one sidecar per
// rank and global rank 0 serves us; `pid` is rank 0's, `launcherPid` torchrun's
// (Note [group processes] in ts/distributed.ts, Note [losing a rank] below).
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { constants, tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { Context, Dealer, curveKeyPair } from "zeromq";
import type { z } from "zod";
import { PROTOCOL_VERSION, events as eventSchemas, methods, type EventName, type MethodName, type TensorRef } from "../protocol/schema.ts";
import { type DistributedOptions, LaunchedGroup, parseDistributed, torchrunArgs } from "./distributed.ts";
import { NanotuneError, SidecarError, wireCode, type ErrorCode } from "./errors.ts";
import { findPython, noPythonMessage, packageRoot, pythonPathWith } from "./paths.ts";
import { Tensor } from "./tensor.ts";
import { MAX_PARAMS_DEPTH, bigIntegers, decode, encode, refsToTensors, tensorsToRefs, tooDeep } from "./wire.ts";

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
/** A sidecar group's ranks as hello reports them (`sidecar.info.distributed`). */
export type DistributedInfo = NonNullable<HelloInfo["distributed"]>;
type RankLost = z.output<(typeof eventSchemas)["rank:lost"]>;
export type { DistributedOptions };

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
  /**
   * "ipc" (default): a socket in a private (0700) temp dir. "tcp": 127.0.0.1 on a
   * random port, always with ZeroMQ CURVE: keys made per start, handed to the process
   * on stdin (never argv), and the sidecar lets in only our client's key. Where ipc
   * cannot bind, the sidecar falls back to tcp with CURVE and logs a warning.
   * `info.transport` and `info.security` say what was used.
   */
  transport?: "ipc" | "tcp";
  /** Default timeout of call(); Infinity (the default) waits as long as the process lives, so a long GPU step is never cut off. */
  callTimeoutMs?: number;
  /** Each line the process writes to stderr; default: copied to our stderr. The last lines are kept for SIDECAR_CRASHED either way. */
  onStderr?: (line: string) => void;
  /** The protocol version we claim in hello; only for testing version skew. Default PROTOCOL_VERSION. */
  protocolVersion?: number;
  /**
   * Heartbeat period, ms. While any call is pending the client asks the sidecar's I/O
   * thread for `status` this often; the I/O thread answers at once even during a long
   * compute step, so a slow step never trips it. When `heartbeatMisses` heartbeats in a
   * row go unanswered (nothing at all heard from the sidecar for about heartbeatMs x
   * heartbeatMisses: 6 s by default), every pending call rejects with
   * SIDECAR_UNRESPONSIVE (data.stacks: the sidecar's thread dump when it could give
   * one), the process is killed and later calls reject with the same error. The same
   * `status` also finds lost replies: a compute call that the sidecar says it is not
   * running, with no reply for it heartbeatMs later, rejects with INTERNAL ("lost
   * reply"). A heartbeat that fires late because our own event loop was blocked does
   * not count as a miss. It runs once start() is done (startTimeoutMs bounds the start).
   * Default 2000; Infinity turns the heartbeat off.
   */
  heartbeatMs?: number;
  /** Heartbeats in a row without any answer before the sidecar counts as unresponsive (see heartbeatMs). Default 3. */
  heartbeatMisses?: number;
  /**
   * Start a sidecar group: torchrun runs one sidecar per rank (`nprocPerNode` on this
   * node; with `nnodes` > 1 the other nodes join through `rdzvEndpoint`, each started
   * with `nanotune node`), and global rank 0, here, serves this client. Training
   * methods run on every rank (data parallel: microBatch is per rank). `info.distributed`
   * lists the ranks. A rank that dies takes the group down: pending and later calls
   * reject with SIDECAR_CRASHED naming it. See docs/distributed.md.
   */
  distributed?: DistributedOptions;
}

export interface CallOptions {
  /** Reject with TIMEOUT (after asking the sidecar to cancel) when no answer came by then. Default: SidecarOptions.callTimeoutMs. */
  timeoutMs?: number;
  /** Aborting cancels the call in the sidecar; the promise rejects with CANCELLED once the sidecar stopped it. */
  signal?: AbortSignal;
  /** Called with the call's request id once it has one, before it is sent: the events that carry it (generate:token's `id`) are this call's. */
  onRequestId?: (id: number) => void;
}

const STDERR_LINES = 40; // kept for SIDECAR_CRASHED
// A group: torchrun's own report of a failed launch (its traceback, then a block per
// failed rank: 30-50 lines) comes last, after the line a rank wrote about why it failed.
const GROUP_STDERR_LINES = 120;
const CLOSE_STEP_MS = 2000; // close(): how long each of shutdown, SIGTERM, SIGKILL may take
const CANCEL_WAIT_MS = 3000; // how long an aborted/timed-out call waits for the sidecar to confirm (> its forced-cancel delay)
const STACK_DUMP_MS = 300; // SIDECAR_UNRESPONSIVE: how long stderr is collected after SIGUSR1 (faulthandler's dump)
const AGENT_GRACE_MS = 1000; // a group that lost a rank: how long torchrun's agent may take to reap its killed ranks and exit before it is killed too
const RANK_WATCH_MS = 100; // a group: how often the client looks for a rank of this host that is gone (Note [losing a rank])

interface Pending {
  method: string;
  /** "compute" calls of the schema are checked against the heartbeat's `status` for lost replies */
  thread: "io" | "compute";
  /** the schema knows the method (and so its thread); an extension method's thread is a guess */
  known: boolean;
  /** a heartbeat probe of ours: not a user call (it neither keeps the heartbeat going nor is checked) */
  internal?: boolean;
  /** heartbeats in a row whose `status` said the sidecar is not running this (compute) call */
  notRunning?: number;
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
  /** The deepest params a call sends (msgpack levels; `{}` is 1); deeper or cyclic params reject with INVALID_PARAMS. */
  static readonly maxParamsDepth = MAX_PARAMS_DEPTH;
  /** What the sidecar said at hello: protocol, torch, device, CUDA memory, methods, transport and security. */
  info!: HelloInfo;
  /** The ZeroMQ endpoint the sidecar serves (ipc:// or tcp://). */
  readonly endpoint: string;
  /** The sidecar's process: in a group, global rank 0's (hello's pid). */
  readonly pid: number;
  /** The process start() spawned: torchrun's agent for a group, else the sidecar itself (= pid). */
  readonly launcherPid: number;
  /** On tcp: the sidecar's CURVE public key for this start (not a secret; the client's keys stay private). null on ipc. */
  readonly curveServerKey: string | null;

  private readonly socket: Dealer;
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
  // heartbeat (SidecarOptions.heartbeatMs)
  private readonly heartbeatMs: number;
  private readonly heartbeatMisses: number;
  private heartbeat: NodeJS.Timeout | null = null;
  private lastTick = 0; // performance.now() of the last heartbeat
  private lastHeard = 0; // performance.now() of the last message from the sidecar
  private readonly beat: Dealer; // the liveness connection (Note [heartbeat])
  private beatId = 1;
  private beatSentAt: number | null = null; // performance.now() of the last beat
  private beatSending = false;
  private misses = 0; // heartbeats in a row after which nothing had been heard since the previous one
  private failing = false; // declared unresponsive; collecting the stack dump
  private started = false; // hello answered: the heartbeat runs from then on (startTimeoutMs covers the start)
  private rankWatch: NodeJS.Timeout | null = null; // a group: Note [losing a rank]

  private constructor(
    private readonly child: SidecarProcess,
    endpoint: string,
    private readonly tempDir: string | null,
    private readonly opts: SidecarOptions,
    stderrTail: string[],
    exited: Promise<void>,
    private readonly stderrWatchers: Set<(line: string) => void>,
    keys: CurveKeys,
    /** a group's torchrun agent and ranks on this host; null: one process */
    private readonly group: LaunchedGroup | null,
    servingPid: number | null,
  ) {
    this.endpoint = endpoint;
    this.launcherPid = child.pid!;
    this.pid = servingPid ?? child.pid!;
    this.stderrTail = stderrTail;
    this.exited = exited;
    this.heartbeatMs = opts.heartbeatMs ?? 2000;
    this.heartbeatMisses = opts.heartbeatMisses ?? 3;
    // tcp: we are a CURVE client with this start's keys (Note [transport security] in transport.py)
    const tcp = endpoint.startsWith("tcp://");
    const curve = tcp ? { curveServerKey: keys.server.publicKey, curvePublicKey: keys.client.publicKey, curveSecretKey: keys.client.secretKey } : {};
    this.curveServerKey = tcp ? keys.server.publicKey : null;
    this.socket = new Dealer({ linger: 0, ...curve });
    this.socket.connect(endpoint);
    this.beat = new Dealer({ linger: 0, context: beatContext(), ...curve }); // connected after hello (Note [heartbeat])
    void this.receiveLoop();
    void this.beatLoop();
  }

  /** Starts the sidecar process and completes the hello handshake (PROTOCOL_MISMATCH if versions differ). */
  static async start(options: SidecarOptions = {}): Promise<Sidecar> {
    const opts = { device: "auto", startTimeoutMs: 120_000, transport: "ipc", callTimeoutMs: Infinity, heartbeatMs: 2000, heartbeatMisses: 3, ...options } satisfies SidecarOptions;
    // a wrong group option fails before anything runs
    const distributed = opts.distributed === undefined ? null : parseDistributed(opts.distributed, "Sidecar.start");
    if (!(opts.heartbeatMs > 0)) throw new NanotuneError("INVALID_ARGUMENT", `Sidecar.start: heartbeatMs must be a positive number of ms (Infinity: off), got ${opts.heartbeatMs}`);
    if (!Number.isInteger(opts.heartbeatMisses) || opts.heartbeatMisses < 1) {
      throw new NanotuneError("INVALID_ARGUMENT", `Sidecar.start: heartbeatMisses must be an integer >= 1, got ${opts.heartbeatMisses}`);
    }
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

    // CURVE keys for this start: always made and handed over, so that tcp (asked for,
    // or the sidecar's fallback where ipc cannot bind) is never unauthenticated. They go
    // on stdin: argv is visible to every local user (ps), and the environment is
    // inherited by whatever the sidecar spawns.
    const keys: CurveKeys = { server: curveKeyPair(), client: curveKeyPair() };
    const keysLine = JSON.stringify({
      curve: { serverPublicKey: keys.server.publicKey, serverSecretKey: keys.server.secretKey, clientPublicKey: keys.client.publicKey },
    });

    // --parent-pid: the sidecar also asks Linux for SIGTERM when this thread dies
    // (PR_SET_PDEATHSIG); execa's cleanup kills it when Node exits normally.
    // A group: torchrun runs the same command on every rank (only rank 0 binds the
    // endpoint and reads the keys; every rank watches --parent-pid), detached in its own
    // process group, and we keep its ranks (Note [group processes] in ts/distributed.ts):
    // execa's cleanup does not apply to a detached process, so an exit hook of ours
    // kills the group when Node exits with it still running.
    const sidecarArgs = ["-m", "nanotune.sidecar", "--endpoint", endpoint, "--device", opts.device, "--parent-pid", String(process.pid), "--keys-from-stdin"];
    const args = distributed ? [...torchrunArgs(distributed), ...sidecarArgs, ...(distributed.backend ? ["--backend", distributed.backend] : [])] : sidecarArgs;
    const child = execa(python, args, {
      stdin: "pipe",
      stdout: "pipe",
      stderr: "pipe",
      env,
      extendEnv: false,
      buffer: false,
      reject: false,
      cleanup: true,
      detached: distributed !== null,
      forceKillAfterDelay: false, // close() runs its own SIGTERM -> SIGKILL ladder
    });
    const group = distributed && child.pid !== undefined ? new LaunchedGroup(child.pid) : null;
    const killGroup = () => group?.signal("SIGKILL");
    if (group) process.on("exit", killGroup);
    // With reject: false the promise resolves once the process is gone; a spawn
    // failure (ENOENT, EACCES) resolves it with neither exit code nor signal.
    const spawnError = child.then((r) => (r.exitCode === undefined && r.signal === undefined ? r : null));
    child.stdin?.on("error", () => undefined); // EPIPE when it died at once: reported as START_FAILED below
    child.stdin?.end(`${keysLine}\n`);
    const stderrTail: string[] = [];
    const stderrWatchers = new Set<(line: string) => void>();
    const onStderr = opts.onStderr ?? ((line: string) => process.stderr.write(`${line}\n`));
    lines(child.stderr!, (line) => {
      stderrTail.push(line);
      if (stderrTail.length > (distributed ? GROUP_STDERR_LINES : STDERR_LINES)) stderrTail.shift();
      onStderr(line);
      for (const w of stderrWatchers) w(line);
    });
    const stderrEnded = new Promise<void>((r) => child.stderr!.once("close", () => r()));
    let exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null = null;
    const exited = new Promise<void>((resolve) => {
      child.once("exit", (code, signal) => {
        exitInfo = { code, signal };
        if (group) {
          // torchrun waits for its ranks, but one it could not stop (or an agent killed
          // with SIGKILL) would outlive it: nothing may stay behind (Note [group processes])
          killGroup();
          process.off("exit", killGroup);
        }
        // stderr may still hold the last lines (a traceback); wait briefly for them
        void Promise.race([stderrEnded, new Promise((r) => setTimeout(r, 100))]).then(() => resolve());
      });
      void spawnError.then((r) => {
        if (!r) return;
        process.off("exit", killGroup);
        resolve();
      });
    });

    let ready: string;
    let servingPid: number | null = null; // the ready line's pid: a group's rank 0
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
            const msg = JSON.parse(line) as { ready?: string; pid?: unknown };
            if (typeof msg.ready !== "string") return;
            if (group && typeof msg.pid === "number") servingPid = msg.pid;
            resolve(msg.ready);
          } catch {
            onStderr(`[sidecar stdout] ${line}`);
          }
        });
      }).finally(() => clearTimeout(timer)); // else the start timer keeps a finished script alive
    } catch (e) {
      if (group) killGroup();
      else child.kill("SIGKILL");
      cleanupDir();
      throw e;
    }

    const sc = new Sidecar(child, ready, tempDir, opts, stderrTail, exited, stderrWatchers, keys, group, servingPid);
    void exited.then(() => sc.onExit(exitInfo));
    try {
      sc.info = await sc.hello({ timeoutMs: Math.max(1, deadline - Date.now()) });
      // The heartbeat starts now: during the warm-up the compute thread imports torch, whose
      // extension loading (dlopen, seconds on a cold disk) holds the GIL, so the I/O thread
      // cannot answer; startTimeoutMs bounds the start instead.
      sc.started = true;
      sc.beat.connect(sc.endpoint);
      const expected = ready.startsWith("tcp://") ? { transport: "tcp", security: "curve" } : { transport: "ipc", security: "ipc-private-dir" };
      if (sc.info.transport !== expected.transport || sc.info.security !== expected.security) {
        throw new SidecarError(
          "START_FAILED",
          `the sidecar serves ${ready} but says transport ${sc.info.transport}, security ${sc.info.security} (expected ${expected.transport}, ${expected.security})`,
        );
      }
      if (distributed) {
        const d = sc.info.distributed ?? null;
        const worldSize = distributed.nprocPerNode * (distributed.nnodes ?? 1);
        if (d === null || d.worldSize !== worldSize) {
          throw new SidecarError(
            "START_FAILED",
            `torchrun started ${d ? `a group of ${d.worldSize} ranks` : "a sidecar that is not in a group (hello's distributed is null)"}, expected ${worldSize} (nprocPerNode ${distributed.nprocPerNode} x nnodes ${distributed.nnodes ?? 1})`,
            { data: { distributed: d } },
          );
        }
        group!.collect(d.ranks.map((r) => r.pid)); // every rank is up: this node's are the agent's children now
        sc.watchRanks(d);
      }
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
   * Never throws: whatever is wrong (params too deep, cyclic or not encodable, a dead
   * sidecar) comes back as a rejected promise.
   */
  request(method: string, params: unknown, options: CallOptions = {}): Promise<unknown> {
    try {
      return this.startCall(method, params, options ?? {});
    } catch (e) {
      // not reached by design: startCall reports every problem as a rejection
      const err = e instanceof NanotuneError ? e : new SidecarError("INTERNAL", `${String(method)}: ${e}`, { method: String(method), cause: e });
      return Promise.reject(err);
    }
  }

  private startCall(method: string, params: unknown, options: CallOptions): Promise<unknown> {
    if (this.dead) return Promise.reject(this.dead);
    if (typeof method !== "string") {
      return Promise.reject(new SidecarError("INVALID_ARGUMENT", `request: the method must be a string, got ${typeof method}`));
    }
    const { signal } = options;
    if (signal?.aborted) {
      return Promise.reject(new SidecarError("CANCELLED", `${method}: aborted before it was sent`, { method, cause: signal.reason }));
    }
    const id = this.nextId++;
    let parts: Uint8Array[];
    try {
      parts = this.prepare(id, method, params);
      options.onRequestId?.(id);
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) => {
      const thread = this.methodThread(method);
      const p: Pending = { method, thread, known: method in methods, resolve, reject, timers: [] };
      this.pending.set(id, p);
      const giveUp = (err: SidecarError) => {
        if (p.failWith) return;
        p.failWith = err;
        if (thread === "compute") {
          this.request("cancel", { id }).catch(() => undefined);
          // settle when the sidecar confirms (so the next call finds it idle), or after CANCEL_WAIT_MS
          p.timers.push(setTimeout(() => this.settle(id, err), CANCEL_WAIT_MS));
        } else this.settle(id, err);
      };
      try {
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
      } catch (e) {
        return this.settle(id, new SidecarError("INVALID_ARGUMENT", `${method}: bad call options: ${e}`, { method, cause: e }));
      }
      this.armHeartbeat();
      this.send(parts).catch((e) => this.settle(id, this.dead ?? new SidecarError("INTERNAL", `${method}: send failed: ${e}`, { method, cause: e })));
    });
  }

  /** [envelope, ...frames] of a call, or a thrown INVALID_PARAMS NanotuneError saying why it cannot be sent. */
  private prepare(id: number, method: string, params: unknown): Uint8Array[] {
    const value = params ?? {};
    const bad = (why: string, field: string, data: Record<string, unknown> = {}, cause?: unknown) =>
      new SidecarError("INVALID_PARAMS", `${method}: ${why}`, { method, data: { field, ...data }, cause });
    let deep: string[] | null;
    try {
      deep = tooDeep(value, MAX_PARAMS_DEPTH);
    } catch (e) {
      throw bad(`params cannot be read: ${e}`, "params", {}, e);
    }
    if (deep) {
      const field = ["params", ...deep.slice(0, 8), ...(deep.length > 8 ? ["..."] : [])].join(".");
      throw bad(`params nest deeper than ${MAX_PARAMS_DEPTH} levels (MAX_PARAMS_DEPTH; or they are cyclic) at ${field}`, field, { maxDepth: MAX_PARAMS_DEPTH });
    }
    const frames: Uint8Array[] = [];
    let wireParams: unknown;
    try {
      wireParams = tensorsToRefs(value, frames);
    } catch (e) {
      throw bad(`params cannot be sent: ${e}`, "params", {}, e);
    }
    const schema = (methods as Record<string, { params: z.ZodType; result: z.ZodType }>)[method];
    if (schema) {
      const parsed = schema.params.safeParse(wireParams);
      if (!parsed.success) throw invalidParams(method, parsed.error);
    }
    const v = method === "hello" ? (this.opts.protocolVersion ?? PROTOCOL_VERSION) : PROTOCOL_VERSION;
    try {
      return [encode({ v, id, method, params: bigIntegers(wireParams) }), ...frames];
    } catch (e) {
      throw bad(`params cannot be encoded as msgpack: ${e instanceof Error ? e.message : e}`, "params", {}, e);
    }
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
    this.disarmHeartbeat();
    if (alive() && !this.dead) {
      await this.request("shutdown", {}, { timeoutMs: CLOSE_STEP_MS }).catch(() => undefined);
    }
    this.fail(new SidecarError("CLOSED", "the sidecar was closed"));
    if (alive() && !(await waitExit(CLOSE_STEP_MS))) {
      this.signal("SIGTERM");
      if (!(await waitExit(CLOSE_STEP_MS))) {
        this.signal("SIGKILL");
        await waitExit(CLOSE_STEP_MS);
      }
    }
    this.teardown();
  }

  /**
   * Kills the process at once (SIGKILL, no shutdown), rejects pending calls with
   * CLOSED and removes the socket's temp dir, all before it returns: for a process
   * that must exit now (a second Ctrl-C). Prefer close(), which lets the sidecar
   * finish cleanly. Checkpoints stay whole either way: the sidecar swaps a complete
   * one into place.
   */
  kill(): void {
    this.shuttingDown = true;
    this.fail(new SidecarError("CLOSED", "the sidecar was killed"));
    this.signal("SIGKILL");
    this.teardown();
  }

  // ---- internals -------------------------------------------------------------

  /** Signals the process: a group's torchrun agent and every rank of it on this host (Note [group processes]). */
  private signal(signal: NodeJS.Signals): void {
    if (this.group) return this.group.signal(signal);
    try {
      this.child.kill(signal);
    } catch {
      // already gone
    }
  }

  private methodThread(method: string): "io" | "compute" {
    return (methods as Record<string, { thread: "io" | "compute" }>)[method]?.thread ?? "compute";
  }

  // ---- heartbeat: Note [heartbeat] ---------------------------------------------
  //
  // While a user call is pending, every heartbeatMs:
  // - Liveness. We send `status` on a second DEALER of our own (`beat`), a connection
  //   of its own to the same ROUTER: an io method, which the sidecar's I/O thread
  //   answers at once whatever the compute thread does; and on its own connection,
  //   with its own ZeroMQ I/O thread on both ends, it does not wait behind a big tensor
  //   in flight on the main one (CURVE encrypts and decrypts a whole message at once on
  //   an I/O thread: 128 MB takes ~1 s over tcp). Here `beatContext` has its own I/O
  //   thread; the sidecar's ROUTER context has two, and libzmq gives a new connection to
  //   the less loaded one: the listener sits on the first, the main connection takes the
  //   second, and the beat connection, made once hello has answered (so the main one is
  //   in place; made at the same time, both could land on the same thread), takes the
  //   first again. A heartbeat after which nothing at all was heard
  //   from the sidecar (on either socket: only its I/O thread sends) since the previous
  //   beat went out is a miss; heartbeatMisses misses in a row make it unresponsive
  //   (`unresponsive()`). A heartbeat that fires more than a period late means our own
  //   event loop was blocked (the answers may wait unread in the socket): no miss.
  // - Lost replies (compute methods of the schema; an extension method called with
  //   request() may be an io one, which `status` never shows). A `status` probe on the
  //   main socket: the sidecar forwards a compute call's reply before it forgets the
  //   call, and answers one connection's requests in the order they came, so a compute
  //   call sent before the probe that the probe's `status` says is not running has had
  //   its reply sent. If it has none when the next probe (heartbeatMs later) says so
  //   again, it was lost: INTERNAL "lost reply", naming the method and id.

  private userCallsPending(): boolean {
    for (const p of this.pending.values()) if (!p.internal) return true;
    return false;
  }

  private armHeartbeat() {
    if (this.heartbeat || !this.started || this.dead || this.shuttingDown || !Number.isFinite(this.heartbeatMs)) return;
    this.lastTick = this.lastHeard = performance.now();
    this.misses = 0;
    this.beatSentAt = null;
    this.heartbeat = setInterval(() => this.tick(), this.heartbeatMs);
    this.heartbeat.unref();
  }

  private disarmHeartbeat() {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    this.beatSentAt = null;
  }

  private tick() {
    if (this.dead || this.failing || this.shuttingDown || !this.userCallsPending()) return this.disarmHeartbeat();
    const now = performance.now();
    const late = now - this.lastTick > 2 * this.heartbeatMs; // our event loop stalled: the answer may be unread
    this.lastTick = now;
    if (this.beatSentAt !== null && this.lastHeard < this.beatSentAt) {
      if (!late) this.misses++;
    } else this.misses = 0;
    if (this.misses >= this.heartbeatMisses) {
      void this.unresponsive(now - this.lastHeard);
      return;
    }
    this.sendBeat();
    for (const p of this.pending.values()) {
      if (!p.internal && p.thread === "compute" && p.known && !p.failWith) {
        this.sendProbe();
        break;
      }
    }
  }

  /** A liveness `status` on the beat socket (its replies only tell us the I/O thread lives). */
  private sendBeat() {
    this.beatSentAt = performance.now();
    if (this.beatSending) return; // the last one is still being queued (it counts as this one)
    this.beatSending = true;
    const parts = [encode({ v: PROTOCOL_VERSION, id: this.beatId++, method: "status", params: {} })];
    this.beat.send(parts).then(
      () => (this.beatSending = false),
      () => (this.beatSending = false),
    );
  }

  private async beatLoop() {
    try {
      for await (const [envelope, ...frames] of this.beat) {
        this.lastHeard = performance.now();
        // The sidecar sends an event to the connection that called last, which may be
        // this one (rank:lost: Note [losing a rank]); its replies only said it lives.
        const msg = this.decodeEnvelope(envelope!);
        if (msg && typeof msg.event === "string") this.onEvent(msg, frames);
      }
    } catch {
      /* closed */
    }
  }

  /** A lost-reply probe: `status` on the main socket, behind every call sent before it. */
  private sendProbe() {
    const id = this.nextId++;
    const p: Pending = {
      method: "status",
      thread: "io",
      known: true,
      internal: true,
      resolve: (r) => this.onProbe(id, r as Result<"status">),
      reject: () => undefined,
      timers: [],
    };
    this.pending.set(id, p);
    const parts = [encode({ v: PROTOCOL_VERSION, id, method: "status", params: {} })];
    this.send(parts).catch(() => this.settle(id, new SidecarError("INTERNAL", "heartbeat: send failed")));
  }

  private onProbe(probeId: number, status: Result<"status">) {
    for (const [id, p] of this.pending) {
      if (id >= probeId || p.internal || p.thread !== "compute" || !p.known || p.failWith) continue;
      if (status.busy?.id === id) {
        p.notRunning = 0;
        continue;
      }
      p.notRunning = (p.notRunning ?? 0) + 1;
      if (p.notRunning >= 2) {
        this.settle(
          id,
          new SidecarError(
            "INTERNAL",
            `${p.method} (id ${id}): lost reply: the sidecar is not running it (status: ${status.busy ? `busy with ${status.busy.method} id ${status.busy.id}` : "idle"}) and no reply came for it`,
            { method: p.method, data: { id, busy: status.busy } },
          ),
        );
      }
    }
  }

  /** Closes both sockets (idempotent). */
  private closeSockets() {
    this.socket.close();
    this.beat.close();
  }

  /** No answer to heartbeatMisses heartbeats: dump its stacks if it can, reject everything, kill it. */
  private async unresponsive(silentMs: number) {
    if (this.dead || this.failing) return;
    this.failing = true;
    this.disarmHeartbeat();
    const state = procState(this.pid);
    const stopped = state === "T" || state === "t";
    let stacks: string | null = null;
    if (!stopped) {
      // faulthandler (registered on SIGUSR1 in runtime.main) writes every thread's stack to stderr
      // from the signal handler itself: it needs no GIL, so it works while Python is stuck in C code.
      const lines: string[] = [];
      const watch = (line: string) => lines.push(line);
      this.stderrWatchers.add(watch);
      try {
        process.kill(this.pid, "SIGUSR1");
        await new Promise((r) => setTimeout(r, STACK_DUMP_MS));
      } catch {
        /* already gone: the exit reports it */
      }
      this.stderrWatchers.delete(watch);
      stacks = lines.length ? lines.join("\n") : null;
    }
    const calls = [...this.pending].filter(([, p]) => !p.internal).map(([id, p]) => `${p.method} (id ${id})`);
    const why = stopped
      ? `it looks stopped (state ${state} in /proc/${this.pid}/stat: SIGSTOP, Ctrl-Z or a debugger), so it gave no thread dump`
      : stacks
        ? "its threads' stacks are in data.stacks"
        : `it gave no thread dump within ${STACK_DUMP_MS} ms of SIGUSR1`;
    this.fail(
      new SidecarError(
        "SIDECAR_UNRESPONSIVE",
        `sidecar (pid ${this.pid}) answered no heartbeat for ${Math.round(silentMs)} ms (heartbeatMs ${this.heartbeatMs} x heartbeatMisses ${this.heartbeatMisses})` +
          (calls.length ? ` while ${calls.join(", ")} ${calls.length > 1 ? "were" : "was"} pending` : "") +
          `; ${why}; killed it`,
        { data: { pid: this.pid, stacks, stopped, state, silentMs: Math.round(silentMs) } },
      ),
    );
    if (this.group) this.killGroup();
    else this.signal("SIGKILL"); // a stopped process dies of SIGKILL too
    this.teardown();
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
        this.lastHeard = performance.now();
        this.onMessage(envelope!, frames);
      }
    } catch (e) {
      if (!this.dead) this.fail(new SidecarError("INTERNAL", `receiving from the sidecar failed: ${e}`, { cause: e }));
    }
  }

  private decodeEnvelope(envelope: Buffer): Record<string, unknown> | null {
    try {
      return decode(envelope) as Record<string, unknown>;
    } catch (e) {
      process.emitWarning(`nanotune: dropped an undecodable message from the sidecar: ${e}`);
      return null;
    }
  }

  private onEvent(msg: Record<string, unknown>, frames: Buffer[]) {
    const name = msg.event as string;
    const schema = (eventSchemas as Record<string, z.ZodType>)[name];
    const parsed = schema ? schema.safeParse(msg.data) : { success: true as const, data: msg.data };
    if (!parsed.success) {
      process.emitWarning(`nanotune: event ${name} does not match the protocol: ${parsed.error.message}`);
      return;
    }
    const ev = { event: name, data: refsToTensors(parsed.data, frames) } as SidecarEvent;
    for (const s of this.streams) s.push(ev);
    if (ev.event === "rank:lost") this.rankLost(ev.data);
  }

  // ---- Note [losing a rank] -------------------------------------------------------
  //
  // A sidecar group cannot go on without one of its ranks: the others would wait in
  // their next collective. Rank 0 watches the ranks of its host and, when one is gone,
  // sends rank:lost and exits; torchrun's agent then stops the rest. Here rank:lost
  // rejects every pending call at once with SIDECAR_CRASHED naming the rank (its pid
  // and host; data {rank, pid, host, reason}), kills what is left of the group on this
  // host (SIGKILL to each rank, then to the agent unless it exits by itself: no rank
  // stays behind) and makes later calls reject with the same error.
  // rank:lost alone is not enough: torchrun's agent watches its ranks too (every 0.1 s)
  // and often stops rank 0 (SIGTERM) before rank 0's own look (every 0.2 s) saw the
  // loss, and then no rank:lost comes; the agent's exit follows 0.5-1.5 s later. So the
  // client also watches the ranks of its host itself (watchRanks, every RANK_WATCH_MS),
  // with the same outcome, whichever comes first. The agent's exit without either (no
  // procfs) names the rank from the agent's own report on stderr (`failed (exitcode:
  // -9) local_rank: 1 (pid: 1234)`) when it wrote one. A rank on another host is
  // seen by none of these: its loss fails the call in flight as a collective error
  // (Note [losing a rank] in python/nanotune/distributed.py).

  private rankLost(d: RankLost) {
    if (this.dead || this.shuttingDown) return;
    this.crash(`rank ${d.rank} (pid ${d.pid} on host ${d.host}) died: ${d.reason}`, { rank: d.rank, pid: d.pid, host: d.host, reason: d.reason });
  }

  /**
   * The client's own look at the ranks of this host, every RANK_WATCH_MS: the same
   * outcome as rank:lost, whichever comes first. It does not wait on rank 0 winning
   * the race against torchrun's agent, and it also sees rank 0 itself die. When several
   * are gone at one look and rank 0 is among them, rank 0 is named: the others follow
   * it and end when it is gone; else the lowest rank.
   */
  private watchRanks(d: DistributedInfo) {
    const byPid = new Map(d.ranks.map((r) => [r.pid, r]));
    this.rankWatch = setInterval(() => {
      if (this.dead || this.shuttingDown) return this.unwatchRanks();
      const gone = this.group!.goneRanks().flatMap((pid) => byPid.get(pid) ?? []);
      if (gone.length === 0) return;
      const r = gone.reduce((a, b) => (a.rank <= b.rank ? a : b));
      const reason = `its process is gone${gone.length > 1 ? ` (so are ${gone.filter((x) => x !== r).map((x) => `rank ${x.rank}`).join(", ")})` : ""}`;
      this.crash(`rank ${r.rank} (pid ${r.pid} on host ${r.host}) died: ${reason}`, { rank: r.rank, pid: r.pid, host: r.host, reason });
    }, RANK_WATCH_MS);
    this.rankWatch.unref();
  }

  private unwatchRanks() {
    if (this.rankWatch) clearInterval(this.rankWatch);
    this.rankWatch = null;
  }

  private onMessage(envelope: Buffer, frames: Buffer[]) {
    const msg = this.decodeEnvelope(envelope);
    if (!msg) return;
    if (typeof msg.event === "string") return this.onEvent(msg, frames);
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
  private fail(err: SidecarError) {
    if (this.dead) return;
    this.dead = err;
    this.disarmHeartbeat();
    this.unwatchRanks();
    for (const id of [...this.pending.keys()]) this.settle(id, err);
    for (const s of this.streams) s.end();
    this.streams.clear();
  }

  private onExit(exitInfo: { code: number | null; signal: NodeJS.Signals | null } | null) {
    if (this.dead) return;
    if (this.shuttingDown) return this.fail(new SidecarError("CLOSED", "the sidecar was closed"));
    const exit = { signal: exitInfo?.signal ?? null, exitCode: exitInfo?.code ?? null };
    if (!this.group) return this.crash(`sidecar (pid ${this.pid}) ${describeExit(exitInfo)}`, { pid: this.pid, ...exit });
    // Note [losing a rank]: the agent stopped the group before rank 0 reported the loss
    const failed = this.info?.distributed ? failedRank(this.stderrTail, this.info.distributed) : null;
    const what = `sidecar group (torchrun pid ${this.launcherPid}, rank 0 pid ${this.pid}) ${describeExit(exitInfo)}`;
    if (!failed) return this.crash(what, { pid: this.pid, ...exit });
    const r = failed.rank;
    this.crash(`rank ${r.rank} (pid ${r.pid} on host ${r.host}) died (${failed.how}); the ${what}`, { rank: r.rank, pid: r.pid, host: r.host, reason: failed.how, ...exit });
  }

  /** SIDECAR_CRASHED: `what` happened; rejects everything pending, kills what is left, closes the sockets. */
  private crash(what: string, data: Record<string, unknown>) {
    const stderr = [...this.stderrTail];
    const busy = [...this.pending.values()].filter((p) => !p.internal).map((p) => p.method);
    this.fail(
      new SidecarError(
        "SIDECAR_CRASHED",
        what +
          (busy.length ? ` while ${busy.join(", ")} ${busy.length > 1 ? "were" : "was"} pending` : "") +
          (this.group ? `; killed the group (torchrun pid ${this.launcherPid} and its ranks on this host)` : "") +
          `; last stderr:\n${stderr.join("\n") || "(empty)"}`,
        { data: { ...data, ...(this.group ? { launcherPid: this.launcherPid } : {}), stderr } },
      ),
    );
    if (this.group) this.killGroup();
    this.teardown();
  }

  /** SIGKILL to a group's ranks now; torchrun's agent reaps them and exits by itself, else it is killed AGENT_GRACE_MS later. */
  private killGroup() {
    this.group!.signalRanks("SIGKILL");
    const alive = () => this.child.exitCode === null && this.child.signalCode === null;
    if (alive()) setTimeout(() => alive() && this.signal("SIGKILL"), AGENT_GRACE_MS).unref();
  }

  /** Closes our sockets and removes the socket's temp dir (synchronously). */
  private teardown(): void {
    this.closeSockets();
    if (this.tempDir) rmSync(this.tempDir, { recursive: true, force: true });
  }
}

/**
 * The beat sockets' ZeroMQ context: its own I/O thread, so that a heartbeat is not
 * queued behind the main socket's bulk data (CURVE encrypts and decrypts a whole
 * message at a time on the I/O thread: 64 MB takes ~0.3 s). Note [heartbeat].
 */
let beats: Context | undefined;
const beatContext = () => (beats ??= new Context({ blocky: false }));

interface CurveKeys {
  server: { publicKey: string; secretKey: string };
  client: { publicKey: string; secretKey: string };
}

/** The state letter of /proc/<pid>/stat ("R", "S", "T" stopped, "t" traced, "Z"...); null without procfs. */
function procState(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0] ?? null;
  } catch {
    return null;
  }
}

/**
 * The rank whose failure torchrun's agent reported on stderr (its elastic API logs
 * `failed (exitcode: -9) local_rank: 1 (pid: 1234) of binary: ...`), as hello listed
 * it; null when the lines kept hold no such report, or name no rank we know.
 */
function failedRank(stderr: string[], d: DistributedInfo): { rank: DistributedInfo["ranks"][number]; how: string } | null {
  for (const line of stderr) {
    const m = /failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)/.exec(line);
    if (!m) continue;
    const rank = d.ranks.find((r) => r.pid === Number(m[3]));
    if (!rank) continue;
    const code = Number(m[1]);
    const signal = code < 0 ? Object.entries(constants.signals).find(([, n]) => n === -code)?.[0] : undefined;
    return { rank, how: code < 0 ? `killed by ${signal ?? `signal ${-code}`}` : `exited with code ${code}` };
  }
  return null;
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
