// Process lifecycle: version mismatch at start, crash of the sidecar, death of the
// Node parent, close(). Each test owns its sidecar; processes are checked by pid.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { PROTOCOL_VERSION, Sidecar, SidecarError } from "../../ts/index.ts";
import { alive, goneWithin } from "./fixtures/procs.ts";

describe("Sidecar lifecycle", () => {
  it("start() fails with START_FAILED naming the interpreter and `npx nanotune setup` when the Python cannot be run", async () => {
    const t0 = Date.now();
    const err = await Sidecar.start({ python: "/nonexistent/python3", startTimeoutMs: 60_000 }).catch((e) => e);
    expect(err).toBeInstanceOf(SidecarError);
    expect(err.code).toBe("START_FAILED");
    expect(err.message).toContain("cannot run /nonexistent/python3 (from options.python)");
    expect(err.message).toContain("npx nanotune setup");
    expect((err.data as { code: string }).code).toBe("ENOENT");
    expect(Date.now() - t0).toBeLessThan(30_000); // at once (ENOENT), not after startTimeoutMs
  });

  it("start() fails with PROTOCOL_MISMATCH naming both versions, and leaves no process", async () => {
    const seen: string[] = [];
    const err = await Sidecar.start({ device: "cpu", protocolVersion: PROTOCOL_VERSION + 1, onStderr: (l) => seen.push(l) }).catch((e) => e);
    expect(err).toBeInstanceOf(SidecarError);
    expect(err.code).toBe("PROTOCOL_MISMATCH");
    expect(err.message).toContain(`client speaks protocol v${PROTOCOL_VERSION + 1}`);
    expect(err.message).toContain(`speaks v${PROTOCOL_VERSION}`);
  });

  it("rejects pending calls with SIDECAR_CRASHED within 1 s of kill -9, with the signal and last stderr lines (tcp transport)", async () => {
    const sc = await Sidecar.start({ device: "cpu", transport: "tcp", env: { NANOTUNE_LOG: "DEBUG" }, onStderr: () => undefined });
    expect(sc.endpoint).toMatch(/^tcp:\/\/127\.0\.0\.1:\d+$/);
    await sc.request("no.such.method", {}).catch(() => undefined); // leaves a DEBUG line on stderr
    const pending = sc.call("debug.busy", { seconds: 30 }).catch((e: unknown) => e);
    while (!(await sc.call("status", {})).busy) await new Promise((r) => setTimeout(r, 10)); // it runs
    const t0 = performance.now(); // the bound is from the kill to the rejection
    process.kill(sc.pid, "SIGKILL");
    const err = (await pending) as SidecarError;
    const ms = performance.now() - t0;
    expect(err).toBeInstanceOf(SidecarError);
    expect(err.code).toBe("SIDECAR_CRASHED");
    expect(ms).toBeLessThan(1000);
    expect(err.message).toMatch(/was killed by SIGKILL while debug\.busy was pending/);
    const data = err.data as { signal: string; stderr: string[]; pid: number };
    expect(data.signal).toBe("SIGKILL");
    expect(data.pid).toBe(sc.pid);
    expect(data.stderr.join("\n")).toContain("no.such.method");
    expect(err.message).toContain("no.such.method");
    // later calls fail the same way at once; close() is still fine
    expect((await sc.call("ping", {}).catch((e) => e)).code).toBe("SIDECAR_CRASHED");
    await sc.close();
  });

  it("close() sends shutdown, ends event streams and pending calls, removes the temp dir, leaves no process", async () => {
    const sc = await Sidecar.start({ device: "cpu" });
    const pid = sc.pid;
    const socketDir = dirname(sc.endpoint.slice("ipc://".length));
    expect(existsSync(socketDir)).toBe(true);
    const events = sc.events();
    const ended = (async () => {
      for await (const _ of events) {
        /* drain */
      }
      return "ended";
    })();
    const pending = sc.call("debug.busy", { seconds: 30 }).catch((e: unknown) => e);
    await sc.close();
    expect(alive(pid)).toBe(false);
    expect(await ended).toBe("ended");
    expect(((await pending) as SidecarError).code).toBe("CLOSED");
    expect(existsSync(socketDir)).toBe(false);
    expect(((await sc.call("ping", {}).catch((e) => e)) as SidecarError).code).toBe("CLOSED");
    await sc.close(); // idempotent
  });

  it("kill() ends the process with SIGKILL and removes the temp dir before it returns; pending calls reject with CLOSED", async () => {
    const sc = await Sidecar.start({ device: "cpu" });
    const socketDir = dirname(sc.endpoint.slice("ipc://".length));
    const pending = sc.call("debug.busy", { seconds: 60 }).catch((e: unknown) => e);
    sc.kill();
    expect(existsSync(socketDir)).toBe(false); // synchronously
    expect(((await pending) as SidecarError).code).toBe("CLOSED");
    expect(await goneWithin(sc.pid, 5000)).toBeLessThan(5000);
    expect(((await sc.call("ping", {}).catch((e) => e)) as SidecarError).code).toBe("CLOSED");
    await sc.close(); // still fine afterwards
  });

  it("the sidecar exits within 2 s when its Node parent is killed with SIGKILL", async () => {
    const parentScript = join(dirname(fileURLToPath(import.meta.url)), "fixtures", "parent.ts");
    const parent = spawn(process.execPath, ["--import", "tsx", parentScript], { stdio: ["ignore", "pipe", "inherit"] });
    const sidecarPid = await new Promise<number>((resolve, reject) => {
      parent.stdout!.setEncoding("utf8").on("data", (d: string) => {
        const m = /"sidecarPid":(\d+)/.exec(d);
        if (m) resolve(Number(m[1]));
      });
      parent.once("exit", (code) => reject(new Error(`parent exited early (${code})`)));
    });
    expect(alive(sidecarPid)).toBe(true);
    parent.kill("SIGKILL");
    const ms = await goneWithin(sidecarPid, 5000);
    expect(ms).toBeLessThan(2000);
  });

  it("lets a script that started and closed a sidecar exit by itself", async () => {
    const script = join(dirname(fileURLToPath(import.meta.url)), "fixtures", "start-close.ts");
    const child = spawn(process.execPath, ["--import", "tsx", script], { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    const killer = setTimeout(() => child.kill("SIGKILL"), 60_000); // a leaked timer would hold it ~120 s
    const [code, signal] = await new Promise<[number | null, string | null]>((r) => child.once("exit", (c, s) => r([c, s])));
    clearTimeout(killer);
    expect(signal).toBeNull();
    expect(code).toBe(0);
    expect(out).toBe("closed\n");
  });
});
