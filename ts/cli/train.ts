// `nanotune train <config.json>`: the Trainer driven by a JSON config. What gets
// printed is the sinks' business: a progress bar on a TTY, plain log lines
// otherwise, and <runDir>/metrics.jsonl when the config has a runDir.
//
// Signals: the first SIGINT or SIGTERM lets the step in flight finish, saves a
// checkpoint (with a runDir), writes run:end reason "interrupted" and exits 130
// (SIGINT) or 143 (SIGTERM). A second one exits at once with the same codes: the
// sidecar is killed with Sidecar.kill() (a checkpoint it was writing is never
// torn: the sidecar swaps a complete one into place) and its socket directory removed.
//
// --dashboard adds sinks.dashboard (ts/dashboard/): its URL, with the access token, goes
// to stderr before the sidecar starts; its stop-and-save ends the run as the first signal
// does (checkpoint, run:end "interrupted") but exits 0: the user asked for it.
import { join } from "node:path";
import { Sidecar } from "../sidecar.ts";
import { sinks } from "../sinks/index.ts";
import { parseConfig } from "../train/config.ts";
import type { TrainerEvent } from "../train/events.ts";
import { prepareRunDir } from "../train/rundir.ts";
import { Trainer } from "../train/trainer.ts";
import { loadTrainConfig } from "./config.ts";

const SIGNAL_EXIT = { SIGINT: 130, SIGTERM: 143 } as const;
type StopSignal = keyof typeof SIGNAL_EXIT;

export interface TrainCommandOptions {
  verbose: boolean;
  /** --dashboard [--port N]: sinks.dashboard on 127.0.0.1 (port 0 or undefined: any free one). */
  dashboard?: { port?: number };
}

/** Resolves with the exit code: 0 completed (or stopped from the dashboard), 1 non-finite, 130/143 interrupted by SIGINT/SIGTERM. */
export async function trainCommand(configPath: string, options: TrainCommandOptions): Promise<number> {
  // errors (and --verbose traces) are printed by main()
  const config = parseConfig(loadTrainConfig(configPath), configPath);
  prepareRunDir(config, configPath, false); // a used runDir fails before the sidecar starts
  // the dashboard listens (and prints its URL) before the sidecar starts: a port in use fails first
  const dashboard = options.dashboard ? sinks.dashboard({ port: options.dashboard.port ?? 0, print: false }) : null;
  if (dashboard) process.stderr.write(`nanotune: dashboard at ${await dashboard.listening}\n`);
  const abort = new AbortController();
  let received: StopSignal | null = null;
  let sidecar: Sidecar | null = null;
  const onSignal = (sig: StopSignal) => {
    if (received === null) {
      received = sig;
      process.stderr.write(`\nnanotune: ${sig}: finishing the current step${config.runDir ? " and saving a checkpoint" : ""}; ${sig === "SIGINT" ? "Ctrl-C" : sig} again exits at once\n`);
      abort.abort(new Error(sig));
      return;
    }
    exitNow(sidecar, SIGNAL_EXIT[sig]);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  let end: Extract<TrainerEvent, { type: "run:end" }> | undefined;
  try {
    // a group (config.distributed): torchrun starts one sidecar per rank here, rank 0 serves us
    sidecar = await Sidecar.start({ device: "auto", distributed: config.distributed });
    const trainer = new Trainer({
      sidecar,
      ...config,
      // the config's `progress` wins; else a bar on a TTY and log lines elsewhere
      sinks: [
        (config.progress ?? process.stderr.isTTY) ? sinks.progress({ enabled: true }) : sinks.console(),
        ...(config.runDir ? [sinks.jsonl(join(config.runDir, "metrics.jsonl"))] : []),
        ...(dashboard ? [dashboard] : []),
      ],
    });
    for await (const ev of trainer.run({ signal: abort.signal, checkpointOnAbort: true })) {
      if (ev.type === "run:end") end = ev; // the sinks report every event
    }
  } finally {
    await dashboard?.close(); // closed with the run already; not if the sidecar never started
    await sidecar?.close();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
  // without a signal, "interrupted" is the dashboard's stop-and-save: asked for, so 0
  if (end?.reason === "interrupted" || end?.reason === "aborted") return received === null ? 0 : SIGNAL_EXIT[received];
  if (end?.reason === "non-finite") {
    const d = end.nonFinite;
    process.stderr.write(
      `nanotune: stopped at step ${end.step}: a non-finite loss or gradient norm${d ? ` (loss ${d.loss}, gradNorm ${d.gradNorm}, lr ${d.lr})` : ""}; ` +
        `resume from an earlier checkpoint with a lower lr or gradClip, or set onNonFinite: "skip"\n`,
    );
    return 1;
  }
  return 0;
}

/** The second signal: kill the sidecar now (its socket directory goes with it) and exit. */
function exitNow(sidecar: Sidecar | null, code: number): never {
  sidecar?.kill();
  process.exit(code);
}
