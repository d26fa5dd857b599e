// Imports run one way: no cycles among the modules of ts/ and protocol/ (type-only
// imports count too: a cycle of types is a cycle of ideas). The graph comes from
// TypeScript's own pre-processor, so every import form is seen the way tsc sees it.
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import ts from "typescript";
import { describe, expect, it } from "vitest";

const root = resolve(import.meta.dirname, "..", "..");

function sourceFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile() && /\.(ts|mts)$/.test(e.name) && !e.name.endsWith(".d.ts"))
    .map((e) => join(e.parentPath, e.name));
}

/** file -> the files of `files` it imports (relative specifiers only; packages are leaves). */
function importGraph(files: string[]): Map<string, string[]> {
  const known = new Set(files);
  const graph = new Map<string, string[]>();
  for (const file of files) {
    const { importedFiles } = ts.preProcessFile(readFileSync(file, "utf8"), true, true);
    const deps = importedFiles
      .map((i) => i.fileName)
      .filter((spec) => spec.startsWith("."))
      .map((spec) => resolve(dirname(file), spec.replace(/\.js$/, ".ts")))
      .filter((dep) => known.has(dep));
    graph.set(file, [...new Set(deps)]);
  }
  return graph;
}

/** Every cycle found by a depth-first walk, each as "a -> b -> a" (paths relative to `base`). */
function cycles(graph: Map<string, string[]>, base: string): string[] {
  const state = new Map<string, "open" | "done">();
  const stack: string[] = [];
  const found: string[] = [];
  const visit = (node: string) => {
    state.set(node, "open");
    stack.push(node);
    for (const dep of graph.get(node) ?? []) {
      if (state.get(dep) === "open") found.push([...stack.slice(stack.indexOf(dep)), dep].map((f) => relative(base, f)).join(" -> "));
      else if (!state.has(dep)) visit(dep);
    }
    stack.pop();
    state.set(node, "done");
  };
  for (const node of [...graph.keys()].sort()) if (!state.has(node)) visit(node);
  return found;
}

describe("imports", () => {
  it("ts/ and protocol/ have no import cycles", () => {
    const files = [...sourceFiles(join(root, "ts")), ...sourceFiles(join(root, "protocol"))];
    const graph = importGraph(files);
    expect(graph.size).toBeGreaterThan(10);
    expect([...graph.values()].flat().length).toBeGreaterThan(10); // the graph has edges at all
    expect(cycles(graph, root)).toEqual([]);
  });

  it("the check finds a cycle when there is one", () => {
    const dir = mkdtempSync(join(tmpdir(), "nanotune-cycle-"));
    try {
      mkdirSync(join(dir, "train"));
      writeFileSync(join(dir, "train", "trainer.ts"), 'import { bar } from "./progress.ts";\nexport const t = 1;\n');
      writeFileSync(join(dir, "train", "progress.ts"), 'import type { t } from "./trainer.ts";\nexport const bar = 2;\n');
      writeFileSync(join(dir, "leaf.ts"), 'import { t } from "./train/trainer.ts";\nimport { z } from "zod";\n');
      expect(cycles(importGraph(sourceFiles(dir)), dir)).toEqual(["train/trainer.ts -> train/progress.ts -> train/trainer.ts"]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
