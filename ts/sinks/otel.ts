// sinks.otel({ meter }): a run's metrics recorded on an OpenTelemetry Meter that the user
// provides, so Prometheus, Grafana, Datadog, ... come through the user's own OpenTelemetry
// setup (a MeterProvider with a PrometheusExporter, an OTLP exporter, ...). Only types come
// from @opentelemetry/api (an optional peer dependency, >= 1.9): the meter brings the
// implementation, and a user without OpenTelemetry never loads it.
//
// Instruments (<p> is `prefix`, default "nanotune"; Prometheus writes the dots as "_" and
// adds "_total" to counters: nanotune_train_loss, nanotune_train_steps_total):
//   gauges, each train:step   <p>.train.loss, <p>.train.lr, <p>.train.density (not with AdamW),
//                             <p>.train.grad_norm (when reported), <p>.train.tokens_per_second
//                             ({token}/s, non-padding input tokens), <p>.train.step ({step}: the
//                             event's step index, as in the events and TensorBoard)
//   gauges, each eval         <p>.eval.loss, <p>.eval.perplexity
//   counters                  <p>.train.steps {step}, <p>.train.tokens {token} (input, non-padding),
//                             <p>.train.target_tokens {token} (those the loss is on),
//                             <p>.train.skipped_steps {step} (step:skipped), <p>.mask.refreshes
//                             {refresh} (mask:refreshed), <p>.policy.swaps {swap}, <p>.checkpoints
//                             {checkpoint}
//   histogram                 <p>.train.step_duration (s: the sidecar's time of each step;
//                             bucket advice 5 ms .. 100 s, as OTel's default buckets suit ms)
// Loss, lr, density, grad norm and perplexity have no unit: a unit "1" would make some
// OTLP-to-Prometheus translators append "_ratio". Values are recorded as doubles.
//
// Attributes on every record: the user's `attributes` (a run name, a host, ...), then
// "nanotune.optimizer" (run:start's optimizer: "nanoadam", "adamw") and "nanotune.policy" (the
// active mask policy's name: from run:start, policy:swapped and each train:step; absent with
// AdamW). Counters and the histogram are thereby split per policy (sum without the label for
// the run's total); a policy:swap counts under the new policy.
//
// Synchronous gauges (Meter.createGauge, API 1.9+), not observable ones: every value arrives
// with an event, so it is recorded as that event is written, with the attributes of that
// moment; an observable gauge would need a copy of the latest values per attribute set for a
// callback to report, and a callback to unregister. A reader sees the same either way, the last
// value of each attribute set. With cumulative temporality (Prometheus; the SDK's default) every
// attribute set seen stays exported: after a swap, the old policy's gauges keep its last
// values (its final loss, ...). With delta temporality (an OTLP exporter set to delta, as
// Datadog prefers) a collection holds only what was recorded since the previous one.
//
// The sink never flushes or shuts down the meter's provider: that is the user's (a push
// exporter: `await provider.forceFlush()` before the process exits). Instruments are created
// once per sink; several sinks on one meter share them (the SDK returns the same instrument for
// the same name), so give concurrent runs distinct `attributes`.
import type { Attributes, Counter, Gauge, Histogram, Meter } from "@opentelemetry/api";
import { ConfigError } from "../errors.ts";
import type { TrainerEvent } from "../train/events.ts";
import type { Sink } from "./sink.ts";

export interface OtelOptions {
  /** Where the instruments are created: `provider.getMeter("nanotune")` from the user's MeterProvider (API >= 1.9). */
  meter: Meter;
  /** The instruments' name prefix (default "nanotune"): `<prefix>.train.loss`, ... */
  prefix?: string;
  /** Added to every record (a run name, ...); nanotune's own "nanotune.optimizer" and "nanotune.policy" win on a clash. */
  attributes?: Attributes;
}

/** Step durations in seconds: from a tiny model on a GPU to a large one on a CPU. */
const STEP_DURATION_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100];

/** OpenTelemetry's instrument name syntax (the SDK only warns about a bad name and records it anyway). */
const NAME = /^[A-Za-z][A-Za-z0-9_.\-/]*$/;

export function otel(options: OtelOptions): Sink {
  const prefix = options.prefix ?? "nanotune";
  const issues: { path: string; message: string }[] = [];
  if (!NAME.test(prefix) || prefix.length > 200) {
    issues.push({ path: "prefix", message: `'${prefix}' is not an OpenTelemetry instrument name (a letter, then letters, digits, _ . - /; at most 200 characters)` });
  }
  if (typeof options.meter?.createGauge !== "function") {
    issues.push({ path: "meter", message: "expected an @opentelemetry/api Meter with createGauge (API >= 1.9), e.g. new MeterProvider().getMeter(\"nanotune\")" });
  }
  if (issues.length > 0) throw new ConfigError("sinks.otel options", issues);

  const { meter } = options;
  const name = (suffix: string) => `${prefix}.${suffix}`;
  const gauge = (suffix: string, description: string, unit?: string): Gauge => meter.createGauge(name(suffix), { description, ...(unit ? { unit } : {}) });
  const counter = (suffix: string, description: string, unit: string): Counter => meter.createCounter(name(suffix), { description, unit });

  const train = {
    loss: gauge("train.loss", "Training loss of the last step (token mean)"),
    lr: gauge("train.lr", "Learning rate of the last step"),
    density: gauge("train.density", "NanoAdam density k of the last step (fraction of each tensor updated)"),
    gradNorm: gauge("train.grad_norm", "Gradient norm of the last step"),
    tokensPerS: gauge("train.tokens_per_second", "Input (non-padding) tokens per second of the last step", "{token}/s"),
    step: gauge("train.step", "Step index of the last step", "{step}"),
  };
  const evalLoss = gauge("eval.loss", "Held-out loss of the last evaluation (token mean)");
  const evalPerplexity = gauge("eval.perplexity", "Held-out perplexity of the last evaluation");
  const steps = counter("train.steps", "Optimizer steps taken", "{step}");
  const tokens = counter("train.tokens", "Input (non-padding) tokens trained on", "{token}");
  const targetTokens = counter("train.target_tokens", "Target tokens trained on (those the loss is on)", "{token}");
  const skipped = counter("train.skipped_steps", "Steps refused as non-finite and tried again (onNonFinite: skip)", "{step}");
  const refreshes = counter("mask.refreshes", "Mask refreshes", "{refresh}");
  const swaps = counter("policy.swaps", "Mask policy swaps (counted under the new policy)", "{swap}");
  const checkpoints = counter("checkpoints", "Checkpoints saved", "{checkpoint}");
  const stepDuration: Histogram = meter.createHistogram(name("train.step_duration"), {
    description: "Time of each optimizer step in the sidecar",
    unit: "s",
    advice: { explicitBucketBoundaries: STEP_DURATION_BUCKETS },
  });

  const user: Attributes = { ...options.attributes };
  let optimizer: string | null = null;
  let policy: string | null = null;
  const attrs = (): Attributes => ({
    ...user,
    ...(optimizer === null ? {} : { "nanotune.optimizer": optimizer }),
    ...(policy === null ? {} : { "nanotune.policy": policy }),
  });

  return {
    name: "otel",
    write(ev: TrainerEvent) {
      switch (ev.type) {
        case "run:start":
          optimizer = ev.optimizer.name;
          policy = ev.policy?.name ?? null;
          return;
        case "train:step": {
          policy = ev.policy;
          const a = attrs();
          train.loss.record(ev.loss, a);
          train.lr.record(ev.lr, a);
          if (ev.density !== null) train.density.record(ev.density, a);
          if (ev.gradNorm !== null) train.gradNorm.record(ev.gradNorm, a);
          train.tokensPerS.record(ev.tokensPerS, a);
          train.step.record(ev.step, a);
          steps.add(1, a);
          tokens.add(ev.inputTokens, a);
          targetTokens.add(ev.tokens, a);
          stepDuration.record(ev.timeS, a);
          return;
        }
        case "step:skipped":
          return skipped.add(1, attrs());
        case "policy:swapped":
          policy = ev.to;
          return swaps.add(1, attrs());
        case "mask:refreshed":
          policy = ev.policy;
          return refreshes.add(1, attrs());
        case "eval": {
          const a = attrs();
          evalLoss.record(ev.loss, a);
          evalPerplexity.record(ev.perplexity, a);
          return;
        }
        case "checkpoint:saved":
          return checkpoints.add(1, attrs());
        default:
          return;
      }
    },
  };
}
