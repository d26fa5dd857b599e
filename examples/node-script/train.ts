// Finetuning from a Node script: the Trainer's events drive your own logic, and the
// mask policy is swapped live when the loss plateaus.
//   npx tsx examples/node-script/train.ts
import { policies, schedules, Sidecar, Trainer } from "nanotune";

const sidecar = await Sidecar.start({ device: "auto" });
try {
  const trainer = new Trainer({
    sidecar,
    model: "tiny-llama",
    data: { path: "examples/finetune/data.jsonl", evalFraction: 0.1 },
    optimizer: { name: "nanoadam", density: 0.1 },
    steps: 80,
    microBatch: 4,
    lr: schedules.warmup(5, schedules.constant(1e-2)),
    maskPolicy: policies.smallWeights({ density: 0.1, maskInterval: 20 }),
    evalEvery: 40,
  });
  let best = Infinity;
  let sinceBest = 0;
  let widened = false;
  for await (const ev of trainer.run()) {
    if (ev.type === "train:step") {
      if (ev.loss < best - 1e-3) [best, sinceBest] = [ev.loss, 0];
      else if (++sinceBest === 10 && !widened) {
        widened = true;
        console.log(`step ${ev.step}: loss plateaued at ${best.toFixed(3)}; widening the mask to 20%`);
        trainer.setMaskPolicy(policies.smallWeights({ density: 0.2, maskInterval: 20 }));
      }
    }
    if (ev.type === "eval") console.log(`eval @${ev.step}: loss ${ev.loss.toFixed(3)}`);
    if (ev.type === "run:end") console.log(`${ev.reason}: ${ev.step} steps, last loss ${ev.lastLoss?.toFixed(3)}`);
  }
} finally {
  await sidecar.close();
}
