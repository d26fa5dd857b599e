// What a sink is (kept apart from index.ts so buffer.ts and tensorboard.ts need not import it).
import type { TrainerEvent } from "../train/events.ts";

export interface Sink {
  /** A name for messages ("progress", "jsonl", ...). */
  readonly name: string;
  /** Called with every event, in order (from the sink's own queue: the Trainer does not wait for it). */
  write(event: TrainerEvent): void | Promise<void>;
  /** Called once when the run ends (also after an error), after every queued event was written. */
  close?(): void | Promise<void>;
}
