// Sidecar groups under torchrun (docs/distributed.md), with real processes: option
// checks; 2 ranks x microBatch 4 train as 1 process x microBatch 8 (AdamW and NanoAdam);
// kill -9 of a rank during a step; `nanotune train` with a `distributed` config; two
// nodes on this machine (`nanotune node` + Sidecar.start over tcp with CURVE).
// Each group start costs seconds (torch imports on every rank), so one 2-rank group
// serves the equality runs and is then the one whose rank is killed. Nothing races the
// clock but the 2 s bound of the kill, measured from the kill to the rejection; the
// step it interrupts is made long (gradAccum) and is seen running before the kill.
import { type ChildProcess, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NanotuneError, parseConfig, Sidecar, Trainer, type TrainerEvent } from "../../ts/index.ts";
// @ts-expect-error plain ESM helper without types
import { repoRoot } from "../../ts/dev/python.mjs";
import { alive, goneWithin, settled, waitFor } from "./fixtures/procs.ts";
import { freePort } from "./fixtures/servers.ts";
import { cacheEnv, collect, steps } from "./fixtures/tiny-run.ts";

const dataPath = join(repoRoot, "examples", "finetune", "data.jsonl");
const tsx = pathToFileURL(join(repoRoot, "node_modules", "tsx", "dist", "loader.mjs")).href;
const bin = join(repoRoot, "ts", "cli", "bin.ts");
let dir: string;
let single: Sidecar | undefined; // one process
let group: Sidecar | undefined; // 2 ranks on this node
const spawned: ChildProcess[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "nanotune-distributed-"));
  const quiet = { device: "cpu" as const, env: cacheEnv(dir), onStderr: () => undefined };
  // one at a time: on 2 cores, three torch imports at once only slow each other down
  single = await Sidecar.start(quiet);
  group = await Sidecar.start({ ...quiet, distributed: { nprocPerNode: 2 } });
});

afterAll(async () => {
  await single?.close();
  await group?.close();
  for (const c of spawned) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
  rmSync(dir, { recursive: true, force: true });
});

/** `nanotune ARGS` through the real executable, started now; resolves on exit with its output. */
function nanotune(args: string[], env: Record<string, string> = {}) {
  const child = spawn(process.execPath, ["--import", tsx, bin, ...args], { cwd: dir, env: { ...process.env, ...cacheEnv(dir), ...env }, stdio: ["ignore", "pipe", "pipe"] });
  spawned.push(child);
  let stdout = "";
  let stderr = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  const done = new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => child.once("exit", (code) => resolve({ code, stdout, stderr })));
  return { child, done, stderr: () => stderr };
}

/** The run's per-step losses, with the events. */
async function losses(sidecar: Sidecar, microBatch: number, optimizer: { name: "adamw" } | { name: "nanoadam"; density: number }) {
  const evs = await collect(
    new Trainer({ sidecar, model: "tiny-llama", data: { path: dataPath, cutoff: 64, seed: 3 }, optimizer, steps: 4, microBatch, lr: 1e-2, sinks: [] }),
  );
  return { losses: steps(evs).map((s) => s.loss), evs };
}

const maxRelDiff = (a: number[], b: number[]) => Math.max(...a.map((x, i) => Math.abs(x - b[i]!) / Math.abs(b[i]!)));

describe("group options: Sidecar.start, the train config, `nanotune node`", () => {
  it("rejects wrong group options with INVALID_PARAMS naming the field, before anything runs", async () => {
    const cases: [object, string, RegExp][] = [
      [{}, "distributed.nprocPerNode", /is required/],
      [{ nprocPerNode: 0 }, "distributed.nprocPerNode", /must be at least 1/],
      [{ nprocPerNode: 1.5 }, "distributed.nprocPerNode", /must be an integer/],
      [{ nprocPerNode: 1, nnodes: 2 }, "distributed.rdzvEndpoint", /is required with nnodes 2/],
      [{ nprocPerNode: 1, nnodes: 2, rdzvEndpoint: "10.0.0.1" }, "distributed.rdzvEndpoint", /must be 'host:port'/],
      [{ nprocPerNode: 1, nnodes: 2, nodeRank: 1, rdzvEndpoint: "10.0.0.1:29500" }, "distributed.nodeRank", /must be 0 .*nanotune node --node-rank 1/],
      [{ nprocPerNode: 1, backend: "mpi" }, "distributed.backend", /gloo/],
      [{ nprocPerNode: 1, nprocs: 2 }, "distributed", /unknown field 'nprocs'/],
    ];
    for (const [distributed, field, message] of cases) {
      const err = await Sidecar.start({ distributed: distributed as never }).catch((e: unknown) => e);
      expect(err, JSON.stringify(distributed)).toBeInstanceOf(NanotuneError);
      expect((err as NanotuneError).code).toBe("INVALID_PARAMS");
      expect((err as NanotuneError).message).toContain(`Sidecar.start: ${field}: `);
      expect((err as NanotuneError).message).toMatch(message);
      expect((err as NanotuneError).data).toMatchObject({ field });
    }
    // the train config's `distributed` is checked the same way (INVALID_CONFIG names the path)
    expect(() => parseConfig({ model: "tiny-llama", data: "d.jsonl", steps: 1, lr: 1, distributed: { nprocPerNode: 2, nnodes: 0 } })).toThrow(
      /distributed\.nnodes: must be at least 1/,
    );
  });

  it("`nanotune node` prints its usage, and exits 2 with one line naming a wrong option", async () => {
    const help = await nanotune(["node", "--help"]).done;
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/^usage: nanotune node --nnodes N --node-rank R --rdzv-endpoint HOST:PORT/);
    const cases: [string[], RegExp][] = [
      [["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "127.0.0.1:29500"], /^nanotune: node: --node-rank: must be 1 or more: node 0 serves the client/],
      [["--nnodes", "2", "--node-rank", "1"], /^nanotune: node: --rdzv-endpoint is required/],
      [["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:29500", "--nproc-per-node", "two"], /^nanotune: node: --nproc-per-node must be a non-negative integer, got 'two'/],
    ];
    for (const [args, message] of cases) {
      const r = await nanotune(["node", ...args]).done;
      expect(r.code, args.join(" ")).toBe(2);
      expect(r.stderr.trim().split("\n"), args.join(" ")).toHaveLength(1);
      expect(r.stderr).toMatch(message);
    }
  });

  it("hello lists the group; a Trainer whose config asks for another group size refuses the sidecar", () => {
    const d = group!.info.distributed!;
    expect(d).toMatchObject({ worldSize: 2, nnodes: 1, backend: "gloo" });
    expect(d.ranks.map((r) => [r.rank, r.localRank, r.device])).toEqual([
      [0, 0, "cpu"],
      [1, 1, "cpu"],
    ]);
    expect(group!.pid).toBe(d.ranks[0]!.pid); // rank 0 serves
    expect(group!.info.pid).toBe(group!.pid);
    expect(group!.launcherPid).not.toBe(group!.pid); // torchrun's agent
    expect(single!.info.distributed ?? null).toBeNull();
    expect(single!.launcherPid).toBe(single!.pid);
    const base = { model: "tiny-llama", data: dataPath, steps: 1, lr: 1e-3, sinks: [] };
    expect(() => new Trainer({ sidecar: single!, ...base, distributed: { nprocPerNode: 2 } })).toThrow(/distributed: asks for 2 ranks .* but the sidecar is one process/);
    expect(() => new Trainer({ sidecar: group!, ...base, distributed: { nprocPerNode: 4 } })).toThrow(/distributed: asks for 4 ranks .* is a group of 2/);
  });
});

describe("a 2-rank group", () => {
  it("2 ranks x microBatch 4 give the losses of 1 process x microBatch 8 (AdamW and NanoAdam at density 0.1)", async () => {
    for (const optimizer of [{ name: "adamw" as const }, { name: "nanoadam" as const, density: 0.1 }]) {
      const one = await losses(single!, 8, optimizer);
      const two = await losses(group!, 4, optimizer);
      expect(two.losses, optimizer.name).toHaveLength(4);
      expect(maxRelDiff(two.losses, one.losses), `${optimizer.name}: ${two.losses} vs ${one.losses}`).toBeLessThan(1e-5);
      // the run's events carry the group: run:start's model, every step's all-reduce
      const start = two.evs.find((e): e is Extract<TrainerEvent, { type: "run:start" }> => e.type === "run:start")!;
      expect(start.model).toMatchObject({ worldSize: 2, parallel: "ddp" });
      expect(steps(two.evs).every((s) => typeof s.allReducedBytes === "number" && s.allReducedBytes > 0)).toBe(true);
      expect(steps(one.evs).every((s) => s.allReducedBytes === null || s.allReducedBytes === undefined)).toBe(true);
    }
  });

  it("kill -9 of rank 1 during a step: SIDECAR_CRASHED naming the rank within 2 s, and no process of the group is left", async () => {
    const sc = group!;
    const ranks = sc.info.distributed!.ranks;
    const victim = ranks[1]!;
    // a step of many micro-batches (seconds), seen running before the kill
    const step = settled(sc.call("train_step", { lr: 1e-3, microBatch: 4, gradAccum: 1000 }));
    await waitFor("train_step to run", async () => (await sc.call("status", {})).busy?.method === "train_step");
    const t0 = performance.now();
    process.kill(victim.pid, "SIGKILL");
    const r = await step;
    const ms = performance.now() - t0;
    expect(r.ok).toBe(false);
    const err = (r as { error: NanotuneError }).error;
    expect(err).toBeInstanceOf(NanotuneError);
    expect(err.code).toBe("SIDECAR_CRASHED");
    expect(err.message).toMatch(new RegExp(`^rank 1 \\(pid ${victim.pid} on host ${victim.host}\\) died: .* while train_step was pending`));
    expect(err.data).toMatchObject({ rank: 1, pid: victim.pid, host: victim.host, launcherPid: sc.launcherPid });
    expect(ms).toBeLessThan(2000);
    // later calls fail with the same error at once
    expect(await sc.call("ping", {}).catch((e: unknown) => e)).toBe(err);
    // the agent and every rank are gone (a few seconds: the agent reaps its killed ranks, then exits)
    for (const pid of [sc.launcherPid, ...ranks.map((x) => x.pid)]) expect(await goneWithin(pid, 5000), `pid ${pid}`).toBeLessThan(5000);
    await sc.close(); // still fine
  });
});

describe("nanotune train with a distributed config", () => {
  it('runs a 2-rank group from "distributed": {"nprocPerNode": 2}; run:start reports worldSize 2, the log says so', async () => {
    const cfgDir = join(dir, "train");
    mkdirSync(cfgDir, { recursive: true });
    const config = {
      model: { path: "tiny-llama", parallel: "ddp" },
      data: { path: dataPath, cutoff: 64 },
      optimizer: { name: "nanoadam", density: 0.1 },
      steps: 3,
      microBatch: 2,
      lr: 1e-2,
      runDir: "run",
      progress: false,
      distributed: { nprocPerNode: 2 },
    };
    writeFileSync(join(cfgDir, "train.json"), JSON.stringify(config));
    // CPU ranks even where there is a GPU: two ranks cannot share one with nccl
    const r = await nanotune(["train", join(cfgDir, "train.json")], { CUDA_VISIBLE_DEVICES: "" }).done;
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/params on cpu x 2 ranks \(ddp\)/);
    const events = readFileSync(join(cfgDir, "run", "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as TrainerEvent);
    expect(events.find((e) => e.type === "run:start")).toMatchObject({ model: { worldSize: 2, parallel: "ddp" }, config: { distributed: { nprocPerNode: 2 } } });
    expect(events.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 3 });
  });
});

describe("two nodes on this machine", () => {
  it("`nanotune node` (node 1) + Sidecar.start over tcp (node 0): a group of 2 nodes trains 10 NanoAdam steps; both end, nothing is left", async () => {
    const port = await freePort();
    const rdzvEndpoint = `127.0.0.1:${port}`;
    const node1 = nanotune(["node", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", rdzvEndpoint, "--device", "cpu"]);
    const agent1 = Number(await waitFor("node 1's torchrun pid", () => /torchrun pid (\d+)/.exec(node1.stderr())?.[1], 60_000));
    const sc = await Sidecar.start({
      device: "cpu",
      transport: "tcp",
      env: cacheEnv(dir),
      onStderr: () => undefined,
      distributed: { nprocPerNode: 1, nnodes: 2, nodeRank: 0, rdzvEndpoint },
    });
    let pids: number[] = [];
    try {
      expect(sc.endpoint).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
      expect(sc.info).toMatchObject({ transport: "tcp", security: "curve" });
      expect(sc.info.distributed).toMatchObject({ worldSize: 2, nnodes: 2 });
      pids = [sc.launcherPid, agent1, ...sc.info.distributed!.ranks.map((r) => r.pid)];
      const evs = await collect(
        new Trainer({
          sidecar: sc,
          model: "tiny-llama",
          data: { path: dataPath, cutoff: 64 },
          optimizer: { name: "nanoadam", density: 0.1 },
          steps: 10,
          microBatch: 2,
          lr: 1e-2,
          distributed: { nprocPerNode: 1, nnodes: 2, rdzvEndpoint },
          sinks: [],
        }),
      );
      expect(steps(evs)).toHaveLength(10);
      expect(steps(evs).every((s) => Number.isFinite(s.loss))).toBe(true);
      expect(evs.at(-1)).toMatchObject({ type: "run:end", reason: "completed", step: 10 });
    } finally {
      await sc.close();
    }
    // node 0's close() ends node 1's rank too; its torchrun and then `nanotune node` exit 0
    const r = await node1.done;
    expect(r.code, r.stderr).toBe(0);
    for (const pid of [...pids, node1.child.pid!]) expect(await goneWithin(pid, 5000), `pid ${pid}`).toBeLessThan(5000);
    expect(pids.filter(alive)).toEqual([]);
  });
});
