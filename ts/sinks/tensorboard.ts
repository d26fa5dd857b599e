// sinks.tensorboard(logdir): TensorBoard event files written from TypeScript, without
// TensorFlow or a protobuf library. An event file is a sequence of TFRecords
//   uint64 length (LE) | uint32 masked CRC32C(length) | data | uint32 masked CRC32C(data)
// each holding one serialized `tensorflow.Event` protobuf; the first record is
// Event{file_version: "brain.Event:2"}. Only the few fields written here are encoded:
//   Event:   wall_time 1 (double), step 2 (int64), file_version 3 (string), summary 5
//   Summary: value 1 (repeated Value)
//   Value:   tag 1 (string), simple_value 2 (float), tensor 8 (TensorProto), metadata 9
//   SummaryMetadata: plugin_data 1 (PluginData{plugin_name 1, content 2})
//   TensorProto: dtype 1 (DT_STRING = 7), tensor_shape 2 (empty: a scalar), string_val 8
import { closeSync, mkdirSync, openSync, writeSync } from "node:fs";
import { hostname } from "node:os";
import { join } from "node:path";
import type { TrainerEvent } from "../train/events.ts";
import { scalarsOf } from "./scalars.ts";
import type { Sink } from "./sink.ts";

// --- CRC32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven -----------

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

export function crc32c(data: Uint8Array): number {
  let crc = 0xffffffff;
  for (let i = 0; i < data.length; i++) crc = CRC_TABLE[(crc ^ data[i]!) & 0xff]! ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

function maskedCrc(data: Uint8Array): number {
  const crc = crc32c(data);
  return (((crc >>> 15) | (crc << 17)) + 0xa282ead8) >>> 0;
}

/** One TFRecord: length, its masked CRC, the data, the data's masked CRC. */
export function tfRecord(data: Uint8Array): Buffer {
  const out = Buffer.alloc(8 + 4 + data.length + 4);
  out.writeBigUInt64LE(BigInt(data.length), 0);
  out.writeUInt32LE(maskedCrc(out.subarray(0, 8)), 8);
  out.set(data, 12);
  out.writeUInt32LE(maskedCrc(data), 12 + data.length);
  return out;
}

// --- protobuf wire format: just what Event needs -------------------------------

function varint(n: number | bigint): number[] {
  let v = BigInt.asUintN(64, BigInt(n));
  const out: number[] = [];
  while (v >= 0x80n) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}
const key = (field: number, wire: number) => varint((field << 3) | wire);
const bytesField = (field: number, data: Uint8Array | string): Buffer => {
  const b = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
  return Buffer.concat([Buffer.from([...key(field, 2), ...varint(b.length)]), b]);
};
const varintField = (field: number, n: number | bigint) => Buffer.from([...key(field, 0), ...varint(n)]);
function doubleField(field: number, x: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeDoubleLE(x);
  return Buffer.concat([Buffer.from(key(field, 1)), b]);
}
function floatField(field: number, x: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeFloatLE(x);
  return Buffer.concat([Buffer.from(key(field, 5)), b]);
}

/** Summary.Value{tag, simple_value}. */
const scalarValue = (tag: string, value: number) => Buffer.concat([bytesField(1, tag), floatField(2, value)]);

/** Summary.Value{tag, metadata: {plugin_data: {plugin_name: "text"}}, tensor: DT_STRING scalar}: TensorBoard's text plugin. */
const textValue = (tag: string, text: string) =>
  Buffer.concat([
    bytesField(1, tag),
    bytesField(9, bytesField(1, bytesField(1, "text"))),
    bytesField(8, Buffer.concat([varintField(1, 7), bytesField(2, Buffer.alloc(0)), bytesField(8, text)])),
  ]);

/** Event{wall_time, step, summary{value...}} or Event{wall_time, file_version}. */
function event(wallTime: number, body: { step: number; values: Buffer[] } | { fileVersion: string }): Buffer {
  const parts = [doubleField(1, wallTime)];
  if ("fileVersion" in body) parts.push(bytesField(3, body.fileVersion));
  else parts.push(varintField(2, body.step), bytesField(5, Buffer.concat(body.values.map((v) => bytesField(1, v)))));
  return Buffer.concat(parts);
}

/** The summary values one Trainer event becomes (none for most): the config as text, the rest scalars.ts's table. */
function values(ev: TrainerEvent): Buffer[] {
  if (ev.type === "run:start") return [textValue("config", JSON.stringify(ev.config, null, 2))];
  return scalarsOf(ev).map(([tag, v]) => scalarValue(tag, v));
}

/**
 * TensorBoard event files in `logdir` (created), one per run:
 * `events.out.tfevents.<unix seconds>.<hostname>.<pid>.nanotune`. The scalars of
 * scalars.ts (train/loss, train/lr, train/density, train/grad_norm, train/tokens_per_s,
 * eval/loss, eval/perplexity, mask/refreshed, policy/swapped, train/skipped,
 * checkpoint/time_s) at their events' steps, and the resolved config as text ("config")
 * at run:start. Each record is written at once.
 */
export function tensorboard(logdir: string): Sink {
  let fd: number | null = null;
  const write = (record: Buffer) => writeSync(fd!, tfRecord(record));
  return {
    name: "tensorboard",
    write(ev) {
      const vs = values(ev);
      if (vs.length === 0) return;
      const now = Date.now() / 1000;
      if (fd === null) {
        mkdirSync(logdir, { recursive: true });
        fd = openSync(join(logdir, `events.out.tfevents.${Math.floor(now)}.${hostname()}.${process.pid}.nanotune`), "a");
        write(event(now, { fileVersion: "brain.Event:2" }));
      }
      write(event(now, { step: ev.step, values: vs }));
    },
    close() {
      if (fd !== null) closeSync(fd);
      fd = null;
    },
  };
}
