// The events a dashboard replays to a page opened mid-run, in bounded memory.
//
// Every event gets a sequence number (the SSE `id:`, so a reconnecting EventSource's
// Last-Event-ID resumes after what it has). What is kept:
// - train:step: at most `maxSteps` (default 4000). When that many are kept, every
//   second one is dropped and from then on only every 2nd (then 4th, 8th, ...) step
//   event is admitted: a uniform stride over the whole run that doubles as it grows,
//   so a page opened at step 1,000,000 still sees the curve's whole shape from 4000
//   points. The latest step event is always replayed (the status line's step).
// - mask:refreshed and step:skipped: the same stride scheme, with `maxMarks` (default 1000) each.
// - every other event (run:start, policy:swapped, eval, checkpoint:saved, run:paused,
//   run:resumed, sink:error, run:end): all of them up to `maxOther` (default 4000); beyond
//   that the oldest go, except run:start.
import type { TrainerEvent } from "../train/events.ts";

export interface HistoryOptions {
  maxSteps?: number;
  maxMarks?: number;
  maxOther?: number;
}

export interface Entry {
  seq: number;
  /** The event as the page receives it (JSON; NaN and ±Infinity as strings). */
  json: string;
}

/** Keeps every `stride`-th entry offered to it, at most `max`; doubles the stride when full. */
class Strided {
  private entries: Entry[] = [];
  private stride = 1;
  private offered = 0;
  private readonly max: number;
  constructor(max: number) {
    this.max = Math.max(2, max + (max % 2)); // even, so the kept steps stay on the stride's grid
  }

  add(e: Entry): void {
    if (this.offered++ % this.stride !== 0) return;
    this.entries.push(e);
    if (this.entries.length >= this.max) {
      this.entries = this.entries.filter((_, i) => i % 2 === 0);
      this.stride *= 2;
    }
  }

  get all(): readonly Entry[] {
    return this.entries;
  }

  get every(): number {
    return this.stride;
  }
}

export class EventHistory {
  private readonly steps: Strided;
  private readonly refreshes: Strided;
  private readonly skipped: Strided;
  private other: Entry[] = [];
  private start: Entry | null = null;
  private lastStep: Entry | null = null;
  private readonly maxOther: number;
  private seq = 0;

  constructor(options: HistoryOptions = {}) {
    this.steps = new Strided(Math.max(2, options.maxSteps ?? 4000));
    this.refreshes = new Strided(Math.max(2, options.maxMarks ?? 1000));
    this.skipped = new Strided(Math.max(2, options.maxMarks ?? 1000));
    this.maxOther = Math.max(1, options.maxOther ?? 4000);
  }

  /** Records an event (already serialized); returns its entry. */
  add(type: TrainerEvent["type"] | string, json: string): Entry {
    const e: Entry = { seq: ++this.seq, json };
    switch (type) {
      case "train:step":
        this.steps.add(e);
        this.lastStep = e;
        break;
      case "mask:refreshed":
        this.refreshes.add(e);
        break;
      case "step:skipped":
        this.skipped.add(e);
        break;
      case "run:start":
        this.start = e;
        break;
      default:
        this.other.push(e);
        if (this.other.length > this.maxOther) this.other.shift();
    }
    return e;
  }

  /** The kept events after sequence number `after` (0: all), in order. */
  replay(after = 0): Entry[] {
    const all = [...this.steps.all, ...this.refreshes.all, ...this.skipped.all, ...this.other];
    if (this.start) all.push(this.start);
    if (this.lastStep && !this.steps.all.includes(this.lastStep)) all.push(this.lastStep);
    return all.filter((e) => e.seq > after).sort((a, b) => a.seq - b.seq);
  }

  /** How many train:step events are kept, and the stride they are kept at. */
  get stepStats(): { kept: number; every: number } {
    return { kept: this.steps.all.length, every: this.steps.every };
  }

  get lastSeq(): number {
    return this.seq;
  }
}
