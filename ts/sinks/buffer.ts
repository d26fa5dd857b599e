// SinkSet: how a Trainer hands its events to its sinks without waiting on them.
//
// Each sink gets its own queue, drained asynchronously and in order, so a slow sink
// (a tracker's HTTP call, a slow disk) does not slow the steps, and a failing one does
// not end the run. A sink whose write() or close() throws or rejects is reported once
// as a `sink:error` event (the Trainer yields it and the other sinks receive it) and
// gets no more events. close() waits for every queue to drain, then closes each sink,
// so nothing is lost when a run ends.
import type { TrainerEvent } from "../train/events.ts";
import type { Sink, TrainerControl } from "./sink.ts";

export type SinkErrorEvent = Extract<TrainerEvent, { type: "sink:error" }>;

interface Entry {
  sink: Sink;
  queue: TrainerEvent[];
  draining: Promise<void> | null;
  failed: boolean;
  closed: boolean;
  /** The step of the last event handed to it (a close() failure's step). */
  step: number;
}

export interface SinkSetOptions {
  /**
   * Events one sink may have waiting (default 1000). When a queue is full, write()
   * returns a promise that resolves once it has room: a sink that can never keep up
   * slows the run rather than growing memory without bound.
   */
  capacity?: number;
}

export class SinkSet {
  private readonly entries: Entry[];
  private readonly capacity: number;
  private readonly errors: SinkErrorEvent[] = [];
  private closing: Promise<void> | null = null;

  constructor(sinks: readonly Sink[], options: SinkSetOptions = {}) {
    this.entries = sinks.map((sink) => ({ sink, queue: [], draining: null, failed: false, closed: false, step: 0 }));
    this.capacity = Math.max(1, options.capacity ?? 1000);
  }

  /**
   * Queues `ev` for every sink that has not failed; does not wait for them. The promise
   * resolves at once unless a queue is full (then when it has room). Ignored once closing.
   */
  write(ev: TrainerEvent): Promise<void> {
    if (this.closing) return Promise.resolve();
    for (const e of this.entries) this.enqueue(e, ev);
    const full = this.entries.filter((e) => !e.failed && e.queue.length > this.capacity);
    if (full.length === 0) return Promise.resolve();
    return (async () => {
      for (const e of full) while (!e.failed && e.queue.length > this.capacity && e.draining) await e.draining;
    })();
  }

  /** Hands each sink that steers (Sink.attach) the run's controls; one that throws fails like a failed write. */
  attach(control: TrainerControl): void {
    for (const e of this.entries) {
      try {
        e.sink.attach?.(control);
      } catch (err) {
        this.fail(e, err, 0);
      }
    }
  }

  /** The sink:error events not yet taken (each failure once), oldest first. */
  takeErrors(): SinkErrorEvent[] {
    return this.errors.splice(0);
  }

  /** Waits for every queue to drain, then closes each sink (once; later calls wait for the first). */
  close(): Promise<void> {
    this.closing ??= this.closeAll();
    return this.closing;
  }

  private async closeAll(): Promise<void> {
    await this.drained();
    for (const e of this.entries) {
      try {
        e.closed = true;
        await e.sink.close?.();
      } catch (err) {
        // A failed sink is still closed (its file, its connection); a second failure is not news.
        if (!e.failed) this.fail(e, err, e.step);
        await this.drained(); // the remaining sinks receive the sink:error before they close
      }
    }
  }

  private async drained(): Promise<void> {
    for (;;) {
      const busy = this.entries.filter((e) => e.draining).map((e) => e.draining);
      if (busy.length === 0) return;
      await Promise.all(busy);
    }
  }

  private enqueue(e: Entry, ev: TrainerEvent): void {
    if (e.failed || e.closed) return;
    e.queue.push(ev);
    e.step = ev.step;
    e.draining ??= this.drain(e);
  }

  private async drain(e: Entry): Promise<void> {
    await Promise.resolve(); // never run a sink's write() inside the Trainer's call
    while (e.queue.length > 0 && !e.failed) {
      const ev = e.queue.shift()!;
      try {
        await e.sink.write(ev);
      } catch (err) {
        this.fail(e, err, ev.step);
      }
    }
    e.draining = null;
  }

  private fail(e: Entry, err: unknown, step: number): void {
    e.failed = true;
    e.queue.length = 0;
    const message = (err instanceof Error ? err.message : String(err)).split("\n")[0]!;
    const ev: SinkErrorEvent = { type: "sink:error", sink: e.sink.name, message, step };
    this.errors.push(ev);
    for (const other of this.entries) if (other !== e) this.enqueue(other, ev);
  }
}
