// `nanotune train <config.json>`: the Trainer driven by a JSON config. What gets
// printed is the sinks' business: a progress bar on a TTY, plain log lines
// otherwise, and <runDir>/metrics.jsonl when the config has a runDir.
import { join } from "node:path";
import { Sidecar } from "../sidecar.ts";
import { sinks } from "../sinks/index.ts";
import { parseConfig } from "../train/config.ts";
import { Trainer } from "../train/trainer.ts";
import { loadTrainConfig } from "./config.ts";

export async function trainCommand(configPath: string, options: { verbose: boolean }): Promise<void> {
  void options; // errors (and --verbose traces) are printed by main()
  const config = parseConfig(loadTrainConfig(configPath), configPath);
  const sidecar = await Sidecar.start({ device: "auto" });
  const abort = new AbortController();
  const onSigint = () => abort.abort(new Error("SIGINT"));
  process.once("SIGINT", onSigint);
  try {
    const trainer = new Trainer({
      sidecar,
      ...config,
      // the config's `progress` wins; else a bar on a TTY and log lines elsewhere
      sinks: [
        (config.progress ?? process.stderr.isTTY) ? sinks.progress({ enabled: true }) : sinks.console(),
        ...(config.runDir ? [sinks.jsonl(join(config.runDir, "metrics.jsonl"))] : []),
      ],
    });
    for await (const _ of trainer.run({ signal: abort.signal })) {
      // the sinks report every event
    }
  } finally {
    process.off("SIGINT", onSigint);
    await sidecar.close();
  }
}
