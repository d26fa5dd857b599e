"""Peers side by side: NanoAdam beside other memory-saving optimizers and LoRA, on the
reproductions' real-data finetune (`npm run bench:peers`;
`python -m nanotune.reproduce.peers [--out reports] [--only KEY ...] [--quick] [--reuse-pretrained]`).

Set-up: the Lab of lab.py (reports/README.md): the 1.26M Llama pretrained on corpus A
(Moby-Dick), finetuned on corpus B (SpamAssassin) for the Lab's 300 steps of 8 x 128
tokens, the same batches in the same order for every run, constant lr, no clipping,
weight decay 0, curves every 25 steps, final held-out losses on 192 rows per corpus:
exactly continual.py's runs, with the optimizer swapped (training.create_optimizer).

Rows (ROWS): AdamW, NanoAdam (small_weights, the Lab's density 5% and mask interval 50),
AdamW8bit (bitsandbytes), GaLore, Adam-mini, Adafactor, LoRA+AdamW, LoRA+NanoAdam
(models.add_lora with LORA_DEFAULTS: r 8, alpha 16, dropout 0.05, all linear layers;
NanoAdam then keeps moments for 5% of the adapter's entries), and MicroAdam. A row whose
optimizer cannot run here (MicroAdam off CUDA, a missing package) is skipped with
create_optimizer's own error as the reason.

Each row runs a small lr grid (each Row's `lrs`, with where it comes from in `grid`) and
shows the lr with the lowest held-out B loss (rule fixed before running); every run is
in the sweep table.

Measures, per run:
- B learned / A retained: held-out loss (nats/token) on B / A after finetuning.
- l2: ||theta - theta_pretrained||_2 over all weights (the tied embedding/head once);
  for LoRA, of the merged weights (W + scale * B A), i.e. how far the model moved.
- optimizer state: training.optimizer_state_bytes after the last step (NanoAdam's own
  count; for the others every tensor the optimizer keeps, each storage once).
- peak memory: the most bytes torch's CPU allocator held for the run during steps 0
  and 1 (the optimizer state is created in step 0, both moments and gradients are
  live in step 1): the model's tensors (parameters and buffers) plus the peak of the
  running sum of the allocations and frees that torch.profiler(profile_memory=True)
  records over those two steps, which start with no gradients and no optimizer state.
  Activations, gradients, optimizer state and every temporary count; nothing else
  does. Why this and not RSS: tracemalloc does not see torch's allocator, and RSS
  mixes the Python heap, the corpora and glibc's caching into MBs of noise around a
  5 MB model; this is exact and the same from run to run.
- step time: the median over steps 2..N-1 (the two profiled steps left out) of
  train_step's CPU time (time.thread_time: with one torch thread every op runs on the
  calling thread), which other processes on the shared CPU hardly change, and of its
  wall time, which they do. Both are noisy here.

Runtime: the 24 runs take about 50 s each on this 2-core CPU (1 torch thread), so
--jobs 2 (the default) runs two at a time in forked processes (the prepared Lab is
inherited), each with one torch thread; --jobs 1 runs them one by one. Peak memory is
per process and does not change; step times then include the other run's contention.
--reuse-pretrained (npm run bench:peers passes it) loads the pretrained model that
`npm run reproduce` or an earlier bench saved under <out>/cache when its settings match.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from nanotune.reproduce.corpora import CorpusError
from nanotune.reproduce.lab import Lab, LabConfig, fmt, l2_distance, pyplot, write_report
from nanotune.training import NonFiniteError, OptimizerError, create_optimizer, optimizer_state_bytes, train_step

PROFILED_STEPS = 2  # steps 0 and 1: the peak-memory window (left out of the step times)


@dataclass(frozen=True)
class Row:
    key: str  # --only name
    label: str
    optimizer: str  # training.create_optimizer's name
    lrs: tuple[float, ...]
    grid: str  # where the lr grid comes from
    lora: bool = False
    options: Callable[[LabConfig], dict[str, Any]] = field(default=lambda c: {})  # besides lr
    settings: str = ""  # the options, for the report


def _nanoadam(c: LabConfig) -> dict[str, Any]:
    # as continual.py's "bias corr. off" rows: Algorithm 1 in the sparse groups, named so that a
    # change of NanoAdam's default does not move this row
    return {"density": c.density, "mask_interval": c.mask_interval, "criterion": "small_weights", "seed": c.seed,
            "bias_correction": False}


def _galore(c: LabConfig) -> dict[str, Any]:
    # GaLore's README (LLaMA 60M: hidden 512, rank 128): rank = hidden / 4, gap 200, scale 0.25.
    return {"rank": max(1, c.hidden_size // 4), "update_proj_gap": 200, "scale": 0.25}


ADAMW_LRS = (3e-4, 1e-3, 3e-3)
ROWS = (
    Row("adamw", "AdamW", "adamw", ADAMW_LRS,
        "continual.py's grid {1e-4, 3e-4, 1e-3} one step up: its best lr by held-out B was its top one",
        settings="torch.optim.AdamW"),
    Row("nanoadam", "NanoAdam", "nanoadam", (1e-3, 3e-3, 1e-2),
        "the paper: NanoAdam takes 5-10x AdamW's lr; the ablation ran 1e-3 and 3e-3", options=_nanoadam,
        settings="small_weights, density 5%, mask every 50 steps, sparse bias correction off"),
    Row("adamw8bit", "AdamW8bit", "adamw8bit", ADAMW_LRS,
        "AdamW's: bitsandbytes' 8-bit AdamW is a drop-in replacement for AdamW (its README)",
        settings="bitsandbytes, block-wise 8-bit moments; tensors under 4096 entries keep 32-bit state"),
    Row("galore", "GaLore", "galore", (3e-3, 1e-2, 3e-2),
        "GaLore's README: lr 0.01 with scale 0.25 (LLaMA 60M-1B); /3 and x3 around it", options=_galore,
        settings="rank hidden/4, update_proj_gap 200, scale 0.25 on the attention and MLP weights"),
    Row("adam-mini", "Adam-mini", "adam-mini", ADAMW_LRS,
        "AdamW's: Adam-mini's README says to use AdamW's lr",
        settings="dim, heads and kv heads from the model config"),
    Row("adafactor", "Adafactor", "adafactor", (1e-3, 3e-3, 1e-2),
        "transformers' docs: lr 1e-3 with relative_step=False (T5 finetuning), and x3, x10",
        settings="transformers, relative_step and scale_parameter off, no momentum (beta1 None)"),
    Row("lora-adamw", "LoRA+AdamW", "adamw", (1e-3, 3e-3, 1e-2),
        "AdamW's x3: LoRA is trained at higher lrs than full finetuning (the LoRA paper)", lora=True,
        settings="LoRA r 8, alpha 16, dropout 0.05, all linear layers"),
    Row("lora-nanoadam", "LoRA+NanoAdam", "nanoadam", (3e-3, 1e-2, 3e-2),
        "LoRA+AdamW's x3 (NanoAdam's larger lrs, as above)", lora=True, options=_nanoadam,
        settings="the same adapter; NanoAdam as above on the adapter's entries"),
    Row("microadam", "MicroAdam", "microadam", ADAMW_LRS,
        "AdamW's (MicroAdam's README uses AdamW-like lrs)",
        settings="ista-daslab-optimizers: m 10, k 1%, quant block 100000"),
)
KEYS = tuple(r.key for r in ROWS)


def _model_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints a line to fd 2 at each profiler start and stop (no setting turns it off)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _PeakMemory:
    """The peak of (allocated - freed) bytes that torch's allocator reports between start()
    and stop() (CPU: the profiler's [memory] events in time order; CUDA: max_memory_allocated)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.running = device, None, False

    def start(self) -> None:
        self.running = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():
            self.prof.start()

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        with _quiet_stderr():
            self.prof.stop()
        events = [e for e in self.prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        running = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            running += e.nbytes()
            peak = max(peak, running)
        self.peak = peak


def finetune(lab: Lab, row: Row, lr: float) -> dict[str, Any]:
    """One finetuning run of `row` at `lr` on B (the same loop as Lab.train_on_b, plus the measures)."""
    c = lab.cfg
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)  # LoRA's dropout
    model = lab.new_model()
    if row.lora:
        from nanotune.models import add_lora

        model, _ = add_lora(model)
    opt = create_optimizer(model, row.optimizer, lr=lr, **row.options(c))
    device = next(model.parameters()).device
    model_bytes = _model_bytes(model)
    run: dict[str, Any] = {"key": row.key, "label": row.label, "optimizer": row.optimizer, "lora": row.lora,
                           "lr": float(lr), "steps": [], "b_loss": [], "a_loss": [], "train_loss": [],
                           "diverged_at": None,
                           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    order = lab.order(len(lab.data["b_train"]), c.finetune_steps, c.batch_size, seed=c.seed + 2)
    times: list[float] = []  # wall
    cpu_times: list[float] = []  # CPU time of this thread (torch runs on it alone with one thread)
    peak = _PeakMemory(device)
    steps = c.finetune_steps
    for step in range(steps + 1):
        if step % c.eval_every == 0 or step == steps:
            run["steps"].append(step)
            run["b_loss"].append(lab.loss(model, "b_heldout", c.curve_eval_blocks))
            run["a_loss"].append(lab.loss(model, "a_heldout", c.curve_eval_blocks))
        if step == steps:
            break
        if step == 0:
            peak.start()  # before the batch is made: every tensor freed in the window was allocated in it
        batch = lab.batch(lab.data["b_train"][order[step]])
        cpu0 = time.thread_time()
        try:
            out = train_step(model, opt, [batch], lr)
        except NonFiniteError:  # not applied: the run diverged here
            run["diverged_at"] = step
            break
        finally:
            if step == PROFILED_STEPS - 1:
                peak.stop()
        if step >= PROFILED_STEPS:
            times.append(out["time_s"])
            cpu_times.append(time.thread_time() - cpu0)
        run["train_loss"].append(out["loss"])
        if not (math.isfinite(out["loss"]) and out["loss"] < c.diverge_loss):
            run["diverged_at"] = step
            break
    peak.stop()  # a run shorter than the window
    ok = run["diverged_at"] is None
    a = lab.loss(model, "a_heldout") if ok else math.nan
    b = lab.loss(model, "b_heldout") if ok else math.nan
    merged = model
    if row.lora:
        from nanotune.models import peft_quiet

        with peft_quiet():
            merged = copy.deepcopy(model).merge_and_unload()
    run["final"] = {"a_loss": a, "b_loss": b, **l2_distance(merged, lab.pretrained)}
    run["state_bytes"] = optimizer_state_bytes(opt)
    run["peak_bytes"] = None if peak.peak is None else model_bytes + peak.peak
    run["model_bytes"] = model_bytes
    run["step_time_s"] = statistics.median(times) if times else None
    run["step_cpu_s"] = statistics.median(cpu_times) if cpu_times else None
    run["seconds"] = time.perf_counter() - t0
    f = run["final"]
    state = f"diverged at step {run['diverged_at']}" if not ok else (
        f"held-out B {f['b_loss']:.3f}, A {f['a_loss']:.3f}, l2 {f['l2_all']:.2f}")
    lab.log(f"  {row.label}, lr {lr:g}: {state}; state {_size(run['state_bytes'])}, peak {_size(run['peak_bytes'])}, "
            f"step {_ms(run['step_cpu_s'])} CPU, {_ms(run['step_time_s'])} wall ({run['seconds']:.0f}s)")
    return run


def _best(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["diverged_at"] is None and math.isfinite(r["final"]["b_loss"])]
    return min(ok, key=lambda r: r["final"]["b_loss"]) if ok else runs[0]


def _skip_reason(lab: Lab, row: Row) -> str | None:
    """create_optimizer's error when this row's optimizer cannot run here (device, package), else None."""
    try:
        create_optimizer(lab.new_model(), row.optimizer, lr=row.lrs[0], **row.options(lab.cfg))
    except OptimizerError as e:
        if e.option == "name":
            return str(e)
        raise
    return None


_LAB: Lab | None = None  # the prepared Lab, inherited by the forked workers


def _work(task: tuple[str, float]) -> dict[str, Any]:
    torch.set_num_threads(1)
    key, lr = task
    return finetune(_LAB, next(r for r in ROWS if r.key == key), lr)


def _finetune_all(lab: Lab, tasks: list[tuple[Row, float]], jobs: int) -> list[dict[str, Any]]:
    """Every (row, lr) run, in order; `jobs` > 1 runs them in that many forked processes
    (each with the prepared Lab and one torch thread)."""
    import multiprocessing

    if jobs <= 1 or len(tasks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [finetune(lab, row, lr) for row, lr in tasks]
    from concurrent.futures import ProcessPoolExecutor

    global _LAB
    _LAB = lab
    try:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_work, [(row.key, lr) for row, lr in tasks]))
    finally:
        _LAB = None


def run(lab: Lab, only: tuple[str, ...] | None = None, jobs: int = 1) -> dict:
    lab.prepare()
    start = time.perf_counter()
    chosen, skipped = [], []
    for row in ROWS:
        if only is not None and row.key not in only:
            continue
        reason = _skip_reason(lab, row)
        if reason is not None:
            lab.log(f"{row.label}: skipped: {reason}")
            skipped.append({"key": row.key, "label": row.label, "reason": reason})
            continue
        lab.log(f"{row.label}: lrs {', '.join(f'{x:g}' for x in row.lrs)}")
        chosen.append(row)
    done = iter(_finetune_all(lab, [(row, lr) for row in chosen for lr in row.lrs], jobs))
    rows = []
    for row in chosen:
        runs = [next(done) for _ in row.lrs]
        rows.append({"key": row.key, "label": row.label, "optimizer": row.optimizer, "lora": row.lora,
                     "lrs": list(row.lrs), "grid": row.grid, "settings": row.settings, "runs": runs,
                     "best": _best(runs)})
    return {"experiment": "peers", "rule": "the lowest held-out B loss", "rows": rows, "skipped": skipped,
            "steps": lab.cfg.finetune_steps, "pretrained": lab.info["pretrain"], "lab": lab.info,
            "config": lab.config(), "profiled_steps": PROFILED_STEPS, "torch_threads": torch.get_num_threads(),
            "jobs": jobs, "seconds": round(time.perf_counter() - start, 1)}


def _size(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.0f} ms"


def table(result: dict) -> str:
    pre = result["pretrained"]
    lines = ["| method | lr | B learned | A retained | l2 | optimizer state | peak memory | step time (CPU) "
             "| step time (wall) | trainable |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| pretrained (before B) | - | {pre['b_heldout_loss']:.3f} | {pre['a_heldout_loss']:.3f} | 0 | - | - | - "
             f"| - | - |"]
    for r in result["rows"]:
        b = r["best"]
        f = b["final"]
        lines.append(f"| {r['label']} | {b['lr']:g} | {fmt(f['b_loss'])} | {fmt(f['a_loss'])} | {f['l2_all']:.2f} | "
                     f"{_size(b['state_bytes'])} | {_size(b['peak_bytes'])} | {_ms(b['step_cpu_s'])} | "
                     f"{_ms(b['step_time_s'])} | {b['trainable_parameters']:,} |")
    for s in result["skipped"]:
        lines.append(f"| {s['label']} | skipped | - | - | - | - | - | - | - | - |")
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        "# Peers side by side: the same finetune (pretrained on A, finetuned on B)",
        "",
        f"`npm run bench:peers` (`python -m nanotune.reproduce.peers`). The Lab's model pretrained on A (Moby-Dick) "
        f"finetuned on B (SpamAssassin bodies) for {result['steps']} steps of {c['batch_size']} x {c['block_len']} "
        f"tokens, the same batches for every run, constant lr, no clipping, weight decay 0 (continual.py's runs with "
        f"the optimizer swapped). Each method at the lr of its grid with {result['rule']}. Losses are held-out "
        f"nats/token; lower is better.",
        "",
        table(result),
        "Measures (python/nanotune/reproduce/peers.py's docstring has the details):",
        "",
        "- **B learned / A retained**: held-out loss on B / A after finetuning "
        f"({c['final_eval_blocks']} rows of {c['block_len']} tokens each).",
        "- **l2**: distance of all weights from the pretrained ones (LoRA: the merged weights).",
        "- **optimizer state**: bytes of every tensor the optimizer keeps, after the last step.",
        f"- **peak memory**: the most bytes torch's CPU allocator held during steps 0-{result['profiled_steps'] - 1} "
        "(model tensors + the peak of allocations minus frees recorded by torch.profiler with profile_memory): "
        "weights, gradients, activations, optimizer state and temporaries, exactly; not the process's RSS.",
        f"- **step time**: median over steps {result['profiled_steps']}-{result['steps'] - 1} of a train_step's "
        f"CPU time (of the one thread torch computes on: {result['torch_threads']} torch thread per run) and of its "
        f"wall time; {result['jobs']} run(s) at a time on a 2-core CPU shared with other people's jobs. CPU time "
        "is what a step costs, mostly unaffected by the others (caches and memory bandwidth are shared still); "
        "wall time also counts the waiting: both noisy, compare only large differences.",
        "- **trainable**: parameters that receive updates (LoRA: the adapter's).",
        "",
        "Rows and lr grids:",
        "",
        "| method | create_optimizer | settings | lr grid | where the grid comes from |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | `{r['optimizer']}`{' + model.lora' if r['lora'] else ''} | {r['settings']} | "
                     f"{', '.join(f'{x:g}' for x in r['lrs'])} | {r['grid']} |")
    if result["skipped"]:
        lines += ["", "Skipped here (create_optimizer's error):", ""]
        lines += [f"- **{s['label']}**: {s['reason']}" for s in result["skipped"]]
    lines += ["", "Every run:", "",
              "| method | lr | B learned | A retained | l2 | optimizer state | peak memory | step time (CPU) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for s in r["runs"]:
            f = s["final"]
            b = "diverged at step %d" % s["diverged_at"] if s["diverged_at"] is not None else fmt(f["b_loss"])
            lines.append(f"| {r['label']} | {s['lr']:g} | {b} | {fmt(f['a_loss'])} | {f['l2_all']:.2f} | "
                         f"{_size(s['state_bytes'])} | {_size(s['peak_bytes'])} | {_ms(s['step_cpu_s'])} |")
    n = sum(len(r["runs"]) for r in result["rows"])
    total = f"; {result['total_seconds']:.0f} s for the whole command" if "total_seconds" in result else ""
    lines += ["", f"Wall time: {result['seconds']:.0f} s for the {n} finetuning runs, {result['jobs']} at a time "
                  f"(pretraining not included{total})."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None or not result["rows"]:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(result["rows"]):
        b = r["best"]
        style = "--" if r["lora"] else "-"
        axes[0].plot(b["steps"], b["b_loss"], style, color=cmap(i), label=f"{r['label']} (lr {b['lr']:g})")
        axes[1].plot(b["steps"], b["a_loss"], style, color=cmap(i), label=f"{r['label']} (lr {b['lr']:g})")
    pre = result["pretrained"]
    axes[1].axhline(pre["a_heldout_loss"], color="k", ls=":", lw=0.8, label="pretrained")
    axes[0].set(xlabel="finetuning step", ylabel="held-out B loss", title="B learned (each at its best lr)")
    axes[1].set(xlabel="finetuning step", ylabel="held-out A loss", title="A retained")
    axes[0].legend(fontsize=7)
    labels = [r["label"] for r in result["rows"]]
    y = list(range(len(labels)))
    state = [r["best"]["state_bytes"] / 2**20 for r in result["rows"]]
    peak = [(r["best"]["peak_bytes"] or 0) / 2**20 for r in result["rows"]]
    axes[2].barh([v + 0.2 for v in y], peak, height=0.4, color="tab:gray", label="peak memory (steps 0-1)")
    axes[2].barh([v - 0.2 for v in y], state, height=0.4, color="tab:blue", label="optimizer state")
    axes[2].set_yticks(y, labels, fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set(xlabel="MiB", title="memory (torch allocator bytes)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> None:
    write_report(out, "peers", result, markdown(result), lambda path: plot(result, path),
                 "held-out B and A loss over finetuning, and optimizer state / peak memory per method")


def main(argv=None, lab: Lab | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder peers.md/json/png go to")
    p.add_argument("--only", nargs="+", choices=KEYS, metavar="KEY", help=f"these rows only ({', '.join(KEYS)})")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (tests); numbers mean nothing")
    p.add_argument("--jobs", type=int, default=2,
                   help="finetuning runs at a time, each in its own process with one torch thread (default 2: "
                        "this 2-core CPU); 1 runs them one after another in this process")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="load <out>/cache/pretrained when it was built with the same settings (npm run reproduce "
                        "writes it), instead of pretraining again")
    args = p.parse_args(argv)
    # bitsandbytes (imported by PEFT and galore_torch) warns at import about an optional
    # 4-bit kernel package no row uses.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reproductions: the 2-core CPU is shared
    t0 = time.perf_counter()
    try:
        lab = lab or Lab(LabConfig.quick() if args.quick else LabConfig(), cache=args.out / "cache",
                         log=lambda s: print(s, flush=True), reuse=args.reuse_pretrained)
        try:
            lab.prepare()
        except CorpusError as e:
            print(f"peers failed: {e}", file=sys.stderr)
            return 1
        result = run(lab, tuple(args.only) if args.only else None, jobs=max(1, args.jobs))
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
        write(result, args.out)
    finally:
        torch.set_num_threads(threads)
    print()
    print(table(result))
    for s in result["skipped"]:
        print(f"{s['label']} skipped: {s['reason']}")
    print(f"wrote {args.out / 'peers.md'} ({result['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
