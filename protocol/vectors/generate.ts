// Writes <name>.ts.msgpack for every vector whose msgpackr bytes differ from <name>.msgpack.
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { encode, bigIntegers } from "../../ts/wire.ts";

export const vectorsDir = new URL(".", import.meta.url);

/** `{"$bigint": "N"}` -> BigInt(N), everything else as is. */
export function fromJson(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(fromJson);
  if (v && typeof v === "object") {
    const o = v as Record<string, unknown>;
    if (Object.keys(o).length === 1 && typeof o.$bigint === "string") return BigInt(o.$bigint);
    return Object.fromEntries(Object.entries(o).map(([k, x]) => [k, fromJson(x)]));
  }
  return v;
}

export function vectors() {
  return readdirSync(vectorsDir)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((f) => {
      const name = f.slice(0, -".json".length);
      const json = JSON.parse(readFileSync(new URL(f, vectorsDir), "utf8")) as { kind: string; value: unknown };
      const tsFile = new URL(`${name}.ts.msgpack`, vectorsDir);
      return {
        name,
        kind: json.kind,
        value: fromJson(json.value),
        pyBytes: readFileSync(new URL(`${name}.msgpack`, vectorsDir)),
        tsBytes: existsSync(tsFile) ? readFileSync(tsFile) : null,
      };
    });
}

if (process.argv[1]?.endsWith("generate.ts")) {
  for (const v of vectors()) {
    const mine = encode(bigIntegers(v.value));
    const tsFile = new URL(`${v.name}.ts.msgpack`, vectorsDir);
    if (Buffer.compare(mine, v.pyBytes) === 0) rmSync(tsFile, { force: true });
    else {
      writeFileSync(tsFile, mine);
      console.log(`wrote ${v.name}.ts.msgpack`);
    }
  }
}
