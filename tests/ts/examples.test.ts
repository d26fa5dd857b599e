// The examples stay valid: their config parses (the node script is type-checked by tsc).
import { readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";
import { parseConfig } from "../../ts/index.ts";

describe("examples", () => {
  it("examples/finetune/config.json is a valid Trainer config", () => {
    const cfg = parseConfig(JSON.parse(readFileSync("examples/finetune/config.json", "utf8")), "config.json");
    expect(cfg.steps).toBe(60);
    expect(cfg.optimizer.name).toBe("nanoadam");
  });
});
