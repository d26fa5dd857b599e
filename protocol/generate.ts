// Writes protocol/schema.json from protocol/schema.ts: `npm run protocol:schema`.
import { writeFileSync } from "node:fs";
import { toJSON } from "./schema.ts";

export const schemaJsonPath = new URL("./schema.json", import.meta.url);
export const schemaJsonText = () => JSON.stringify(toJSON(), null, 2) + "\n";

if (process.argv[1] && import.meta.url.endsWith(process.argv[1].split("/").pop()!)) {
  writeFileSync(schemaJsonPath, schemaJsonText());
  console.log(`wrote ${schemaJsonPath.pathname}`);
}
