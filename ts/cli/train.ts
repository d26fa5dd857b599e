// `nanotune train <config.json>`: the Trainer driven by a JSON config. What gets
// printed is the sinks' business: a progress bar on a TTY, plain log lines
// otherwise, and <runDir>/metrics.jsonl when the config has a runDir.
//
// Signals: the first SIGINT or SIGTERM lets the step in flight finish, saves a
// checkpoint (with a runDir), writes run:end reason "interrupted" and exits 130
// (SIGINT) or 143 (SIGTERM). A second one exits at once with the same codes: the
// sidecar is killed with Sidecar.kill() (a checkpoint it was writing is never
// torn: the sidecar swaps a complete one into place) and its socket directory removed.
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

/** Resolves with the exit code: 0 completed, 1 non-finite, 130/143 interrupted by SIGINT/SIGTERM. */
export async function trainCommand(configPath: string, options: { verbose: boolean }): Promise<number> {
  void options; // errors (and --verbose traces) are printed by main()
  const config = parseConfig(loadTrainConfig(configPath), configPath);
  prepareRunDir(config, configPath, false); // a used runDir fails before the sidecar starts
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
    sidecar = await Sidecar.start({ device: "auto" });
    const trainer = new Trainer({
      sidecar,
      ...config,
      // the config's `progress` wins; else a bar on a TTY and log lines elsewhere
      sinks: [
        (config.progress ?? process.stderr.isTTY) ? sinks.progress({ enabled: true }) : sinks.console(),
        ...(config.runDir ? [sinks.jsonl(join(config.runDir, "metrics.jsonl"))] : []),
      ],
    });
    for await (const ev of trainer.run({ signal: abort.signal, checkpointOnAbort: true })) {
      if (ev.type === "run:end") end = ev; // the sinks report every event
    }
  } finally {
    await sidecar?.close();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
  if (end?.reason === "interrupted" || end?.reason === "aborted") return SIGNAL_EXIT[received ?? "SIGINT"];
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
