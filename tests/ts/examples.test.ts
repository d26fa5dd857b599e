// The examples stay valid: their config parses and every path in it names a file that
// exists, resolved the way `nanotune train` resolves it (the node script is type-checked by tsc).
import { existsSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { loadTrainConfig } from "../../ts/cli/config.ts";
import { parseConfig } from "../../ts/index.ts";

describe("examples", () => {
  it("examples/finetune/config.json is a valid Trainer config whose data file exists", () => {
    const cfg = parseConfig(loadTrainConfig("examples/finetune/config.json"), "config.json");
    expect(cfg.steps).toBe(60);
    expect(cfg.optimizer.name).toBe("nanoadam");
    const data = typeof cfg.data === "string" ? cfg.data : cfg.data.path;
    expect(existsSync(data), data).toBe(true);
    expect(cfg.model).toMatchObject({ path: "tiny-llama" }); // a preset name stays a name
  });
});
