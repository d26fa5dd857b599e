// Sidecar groups (docs/distributed.md): the torchrun command line that launches one
// sidecar per rank, shared by Sidecar.start({ distributed }) (node 0, whose global
// rank 0 serves the client) and `nanotune node` (every other node of a multi-node
// group, which serves nothing), and the processes such a launch leaves on this host.
//
// Note [group processes]: torchrun's agent starts each rank with start_new_session
// (torch.distributed.elastic's SubprocessHandler), so a rank is the leader of a
// process group of its own, not a member of the agent's: signalling the agent's
// group (we start the agent detached, so its pid is its group's id) does not reach
// the ranks. Once the agent is gone its ranks are orphans that nothing signals (the
// followers watch --parent-pid, not the agent). So whoever launched the agent keeps
// its ranks too: the agent's children, read from /proc while it runs (each with its
// start time, so that a pid the kernel has since given to another process is never
// signalled), and every signal goes to the agent's group and to each rank's group.
import { readdirSync, readFileSync } from "node:fs";
import { z } from "zod";
import { NanotuneError } from "./errors.ts";

/** How to launch a sidecar group with torchrun (`Sidecar.start({ distributed })`, the train config's `distributed`). */
export interface DistributedOptions {
  /** Ranks (processes) on this node: torchrun --nproc-per-node. On CUDA one per GPU. */
  nprocPerNode: number;
  /** Nodes (machines) in the group; default 1. More than 1 needs rdzvEndpoint, and `nanotune node` on every other node. */
  nnodes?: number;
  /** This node's rank; 0 (the default) for Sidecar.start: node 0 holds global rank 0, which serves the client. */
  nodeRank?: number;
  /**
   * "host:port" of node 0, where torchrun's store listens (static rendezvous: torchrun
   * --master-addr/--master-port); required with nnodes > 1. Every node must reach it.
   * Without it, one node uses torchrun --standalone (a free local port).
   */
  rdzvEndpoint?: string;
  /** The process group's backend; default: nccl on CUDA, gloo on the CPU. */
  backend?: "gloo" | "nccl";
}

const notNumber = (iss: { input?: unknown }) => (iss.input === undefined ? "is required" : "must be a number");
const posInt = () => z.number({ error: notNumber }).int("must be an integer").min(1, "must be at least 1");

/** "host:port" with port in 1..65535; an IPv6 host in brackets ("[::1]:29500"). */
export function parseHostPort(s: string): { host: string; port: number } | null {
  const m = /^(\[[^\]]+\]|[^:\s]+):(\d{1,5})$/.exec(s);
  if (!m) return null;
  const port = Number(m[2]);
  if (port < 1 || port > 65535) return null;
  return { host: m[1]!.replace(/^\[(.*)\]$/, "$1"), port };
}

const shape = {
  nprocPerNode: posInt(),
  nnodes: posInt().optional(),
  nodeRank: z.number({ error: notNumber }).int("must be an integer").min(0, "must be at least 0").optional(),
  rdzvEndpoint: z
    .string()
    .refine((s) => parseHostPort(s) !== null, "must be 'host:port' (node 0's address and a free port, e.g. '10.0.0.1:29500')")
    .optional(),
  backend: z.enum(["gloo", "nccl"]).optional(),
};

/** Which node a launch is: node 0 serves the client (Sidecar.start, `nanotune train`); the others run `nanotune node`. */
type Role = "serving" | "node";

function checks(role: Role) {
  return (d: { nnodes?: number | undefined; nodeRank?: number | undefined; rdzvEndpoint?: string | undefined }, ctx: z.RefinementCtx) => {
    const nnodes = d.nnodes ?? 1;
    if (nnodes > 1 && d.rdzvEndpoint === undefined) {
      ctx.addIssue({ code: "custom", path: ["rdzvEndpoint"], message: `is required with nnodes ${nnodes}: node 0's 'host:port', which every node can reach` });
    }
    if (d.nodeRank !== undefined && d.nodeRank >= nnodes) {
      ctx.addIssue({ code: "custom", path: ["nodeRank"], message: `must be below nnodes (${nnodes}), got ${d.nodeRank}` });
    } else if (role === "serving" && (d.nodeRank ?? 0) !== 0) {
      ctx.addIssue({
        code: "custom",
        path: ["nodeRank"],
        message: `must be 0 (or absent), got ${d.nodeRank}: the node that starts the sidecar holds global rank 0 and serves the client; start node ${d.nodeRank} with \`nanotune node --node-rank ${d.nodeRank}\``,
      });
    } else if (role === "node" && (d.nodeRank ?? 0) === 0) {
      ctx.addIssue({ code: "custom", path: ["nodeRank"], message: "must be 1 or more: node 0 serves the client; start it with Sidecar.start({ distributed }) or `nanotune train`" });
    }
  };
}

/** The `distributed` option of Sidecar.start and of a train config (node 0: nodeRank 0 or absent). */
export const DistributedConfig = z.strictObject(shape).superRefine(checks("serving"));
/** `nanotune node`'s options: a node other than 0 of a multi-node group. */
const NodeConfig = z.strictObject(shape).superRefine(checks("node"));

/**
 * Checks a `distributed` option; INVALID_PARAMS naming the field (`distributed.nnodes`)
 * in its message and data.field otherwise. `where` starts the message ("Sidecar.start").
 */
export function parseDistributed(input: unknown, where: string, role: Role = "serving"): DistributedOptions {
  const r = (role === "serving" ? DistributedConfig : NodeConfig).safeParse(input);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const field = ["distributed", ...issue.path.map(String)].join(".");
  const message = issue.code === "unrecognized_keys" ? `unknown field${issue.keys.length > 1 ? "s" : ""} ${issue.keys.map((k) => `'${k}'`).join(", ")}` : issue.message;
  throw new NanotuneError("INVALID_PARAMS", `${where}: ${field}: ${message}`, { data: { field, issues: r.error.issues } });
}

/**
 * torchrun's arguments (after `python -m torch.distributed.run`) for `d`: --standalone
 * for one node without an rdzvEndpoint, else a static rendezvous at rdzvEndpoint (node
 * rank 0 holds global rank 0). The agent checks its ranks every 0.1 s and never
 * restarts them: a group that lost a rank is gone (docs/distributed.md).
 */
export function torchrunArgs(d: DistributedOptions): string[] {
  const nnodes = d.nnodes ?? 1;
  const at = d.rdzvEndpoint === undefined ? null : parseHostPort(d.rdzvEndpoint)!;
  const where = at
    ? ["--nnodes", String(nnodes), "--node-rank", String(d.nodeRank ?? 0), "--rdzv-backend", "static", "--master-addr", at.host, "--master-port", String(at.port)]
    : ["--standalone"];
  return ["-m", "torch.distributed.run", "--nproc-per-node", String(d.nprocPerNode), ...where, "--monitor-interval", "0.1", "--max-restarts", "0"];
}

// ---- the processes of a launch: Note [group processes] ---------------------------

interface ProcStat {
  state: string;
  ppid: number;
  /** clock ticks after boot: with the pid, names one process for good */
  startTime: string;
}

/** /proc/<pid>/stat's state, parent and start time; null when gone or without procfs. */
export function procStat(pid: number): ProcStat | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" "); // f[0] is field 3 (state)
    return { state: f[0]!, ppid: Number(f[1]), startTime: f[19]! };
  } catch {
    return null;
  }
}

/** The pids whose parent is `pid` (a scan of /proc; empty without procfs). */
function childrenOf(pid: number): number[] {
  let entries: string[];
  try {
    entries = readdirSync("/proc");
  } catch {
    return [];
  }
  const out: number[] = [];
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    if (procStat(Number(e))?.ppid === pid) out.push(Number(e));
  }
  return out;
}

function send(target: number, signal: NodeJS.Signals) {
  try {
    process.kill(target, signal);
  } catch {
    // gone already
  }
}

/** Whether pid runs; a zombie counts as gone. */
function running(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  return procStat(pid)?.state !== "Z";
}

/**
 * A torchrun agent we spawned detached (its own process group) and the ranks it
 * started on this host (Note [group processes]).
 */
export class LaunchedGroup {
  /** pid -> start time ("" without procfs) of every rank seen as the agent's child */
  private readonly ranks = new Map<number, string>();

  private readonly agentStart: string;

  constructor(readonly agentPid: number) {
    this.agentStart = procStat(agentPid)?.startTime ?? "";
  }

  /** Remembers the agent's children now (and `pids`, when they are its children): the ranks of this node. */
  collect(pids: number[] = []): void {
    for (const pid of new Set([...childrenOf(this.agentPid), ...pids])) {
      if (this.ranks.has(pid)) continue;
      const st = procStat(pid);
      if (st?.ppid === this.agentPid) this.ranks.set(pid, st.startTime);
    }
  }

  /** The pids of this node's ranks seen so far. */
  get rankPids(): number[] {
    return [...this.ranks.keys()];
  }

  /** Whether the rank with this pid is still the process we saw (not gone, not a reused pid). */
  private isOurs(pid: number, startTime: string): boolean {
    if (!running(pid)) return false;
    const st = procStat(pid);
    return st === null ? startTime === "" : st.startTime === startTime;
  }

  /** Sends `signal` to the agent's process group and to each rank's (each rank leads its own). Synchronous. */
  signal(signal: NodeJS.Signals): void {
    if (this.isOurs(this.agentPid, this.agentStart)) {
      send(-this.agentPid, signal);
      send(this.agentPid, signal);
    }
    this.signalRanks(signal);
  }

  /**
   * Sends `signal` to each rank's process group only. After SIGKILL the agent, still
   * alive, reaps them (a rank whose agent died first is left to init, which in a
   * container without one stays a zombie) and exits on its own.
   */
  signalRanks(signal: NodeJS.Signals): void {
    this.collect(); // a rank started since (or not yet seen)
    for (const [pid, start] of this.ranks) {
      if (!this.isOurs(pid, start)) continue;
      send(-pid, signal);
      send(pid, signal);
    }
  }

  /** The pids of this node's ranks that no longer run (exited, or a zombie). */
  goneRanks(): number[] {
    return [...this.ranks].filter(([pid, start]) => !this.isOurs(pid, start)).map(([pid]) => pid);
  }
}
