// `nanotune node`: a node other than 0 of a multi-node sidecar group
// (docs/distributed.md). It runs torchrun with the group's options and
// `-m nanotune.sidecar` on this machine's ranks, which follow global rank 0 (node 0,
// where Sidecar.start or `nanotune train` runs) and serve nothing themselves: no
// endpoint, no keys. It lasts as long as the group: node 0's close() (shutdown) ends
// its ranks, and its exit code is torchrun's.
//
// Signals: SIGINT and SIGTERM go on to torchrun's agent and to every rank of this node
// (each is a process group of its own: Note [group processes] in ts/distributed.ts),
// which stops the whole group; a second one kills them all with SIGKILL. The ranks
// also watch this process (--parent-pid): when it dies, so do they.
import { constants } from "node:os";
import { execa } from "execa";
import { type DistributedOptions, LaunchedGroup, parseDistributed, torchrunArgs } from "../distributed.ts";
import { NanotuneError } from "../errors.ts";
import { findPython, noPythonMessage, pythonPathWith } from "../paths.ts";

export interface NodeOptions extends DistributedOptions {
  /** "auto" (default): CUDA when torch sees a GPU, else the CPU; as Sidecar.start's device. */
  device?: "auto" | "cpu" | "cuda";
  /** The interpreter, as Sidecar.start's `python` (default: NANOTUNE_PYTHON, the checkout's .venv, `nanotune setup`'s). */
  python?: string;
}

export interface LaunchedNode {
  /** torchrun's agent (the leader of its own process group). */
  readonly pid: number;
  /** Settles once the agent exited, and every rank of this node was killed if one was left. */
  readonly exited: Promise<{ exitCode: number | null; signal: NodeJS.Signals | null }>;
  /** Sends `signal` to the agent and to every rank of this node. */
  signal(signal: NodeJS.Signals): void;
}

/** Starts this node's ranks (stdio inherited); INVALID_PARAMS naming a wrong option, START_FAILED without a Python. */
export async function startNode(options: NodeOptions): Promise<LaunchedNode> {
  const { device = "auto", python: explicit, ...rest } = options;
  const d = parseDistributed(rest, "nanotune node", "node");
  const found = findPython(explicit);
  if (!found) throw new NanotuneError("START_FAILED", noPythonMessage(), { data: { reason: "no-python" } });
  const args = [
    ...torchrunArgs(d),
    ...["-m", "nanotune.sidecar", "--device", device, "--parent-pid", String(process.pid)],
    ...(d.backend ? ["--backend", d.backend] : []),
  ];
  const child = execa(found.python, args, {
    stdio: ["ignore", "inherit", "inherit"],
    env: { PYTHONUNBUFFERED: "1", PYTHONPATH: pythonPathWith(process.env.PYTHONPATH) },
    reject: false,
    detached: true, // its own process group: we signal it (and a terminal's Ctrl-C reaches us alone)
    forceKillAfterDelay: false,
  });
  if (child.pid === undefined) {
    // spawning failed (ENOENT, EACCES): execa's result says why
    const r = await child;
    throw new NanotuneError("START_FAILED", `cannot run ${found.python} (from ${found.source}): ${r.originalMessage || r.shortMessage}`);
  }
  const group = new LaunchedGroup(child.pid);
  const killAll = () => group.signal("SIGKILL");
  process.on("exit", killAll);
  // the ranks are the agent's children once it started them: look now and then, so
  // that a signal or the agent's end finds every one (Note [group processes])
  const look = setInterval(() => group.collect(), 500);
  look.unref();
  const exited = child.then((r) => {
    clearInterval(look);
    group.signalRanks("SIGKILL"); // none should be left; nothing may stay behind
    process.off("exit", killAll);
    return { exitCode: r.exitCode ?? null, signal: (r.signal as NodeJS.Signals | undefined) ?? null };
  });
  return { pid: child.pid, exited, signal: (sig) => group.signal(sig) };
}

/** `nanotune node ...`: resolves with torchrun's exit code (128 + n when killed by signal n). */
export async function nodeCommand(options: NodeOptions): Promise<number> {
  const node = await startNode(options);
  const nnodes = options.nnodes ?? 1;
  process.stderr.write(
    `nanotune: node ${options.nodeRank} of ${nnodes}: ${options.nprocPerNode} rank${options.nprocPerNode > 1 ? "s" : ""} joining ${options.rdzvEndpoint} (torchrun pid ${node.pid})\n`,
  );
  let received = 0;
  const onSignal = (sig: NodeJS.Signals) => {
    received++;
    if (received === 1) process.stderr.write(`\nnanotune: ${sig}: stopping this node's ranks (the group ends with them); ${sig === "SIGINT" ? "Ctrl-C" : sig} again kills them\n`);
    node.signal(received === 1 ? sig : "SIGKILL");
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    const { exitCode, signal } = await node.exited;
    if (exitCode !== null) return exitCode;
    return 128 + (signal ? ((constants.signals as Record<string, number | undefined>)[signal] ?? 0) : 0);
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}
