"""`parallel-yolo compare`: what each strategy costs per rank for one model, measured beside theory.

Each strategy first takes four optimizer steps to measure memory (two to warm up, one at the batch, one at twice the
batch), then `steps` timed steps, all on one synthetic batch (the same images for every strategy). Per rank it
records:
- model-state bytes by category, counted from the tensors the rank holds (unique storages) just before the last
  timed optimizer step (gradients present), beside memory.formula for that strategy and optimizer;
- peak memory of a training step above the baseline taken before the model was built (CUDA: peak allocated; CPU:
  peak resident set with glibc returning freed memory at once, memory.returning_freed_memory, so that it follows
  the live tensors as CUDA's figure does), and of the setup (building and wrapping the model);
- activation memory: peak minus model states, beside recompute.py's forecast of it (from a forward pass on the meta
  device); with the peaks at two batch sizes, a linear fit peak(b) = fixed + b x per_image gives the largest per-GPU
  batch that fits `budget` (which activation_checkpointing=auto also plans for);
- bytes sent per step, counted by wrapping the collectives (comm.py), beside the strategy's theory (which covers the
  gradients and parameters); under optimizer=MuSGD, also the bytes its Newton–Schulz exchange sends (`muon`);
- step time (median of the timed steps after the first, under glibc's default policy) and images/s.

Self-launched (`nproc=N`), every strategy gets fresh processes, so none inherits another's memory; under an
external launcher the strategies run one after another in the same processes: peaks are reset in between, but a
strategy after the first starts with the heap the earlier ones grew, whose holes its peaks may count.
Outputs: a table, and compare.json, compare.csv and compare.png in the run folder.
"""

from __future__ import annotations

import csv
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..config import CompareConfig, TrainConfig
from ..engine.build import build_train_state, make_strategy
from ..engine.step import forward_backward
from ..launch import dist
from ..monitor import memory
from ..monitor.comm import CommCounter
from ..monitor.runlog import RunLog
from ..tasks import yolo
from ..tasks.task import Task

__all__ = ["run_compare", "synthetic_batch", "example_batch"]

MIB = 2**20


def run_compare(cfg: CompareConfig, tokens: list[str]) -> dict[str, Any] | None:
    """Measure every strategy; on rank 0 (or in the parent of a self-launch) write and print the results."""
    env = dist.read_env()
    dist.check_nproc(cfg.nproc, env)
    folder = Path(cfg.project) / cfg.name
    if not env.launched and cfg.nproc:  # one fresh group per strategy
        folder = RunLog.new_folder(cfg.project, cfg.name, cfg.exist_ok)
        for label, name, mode in cfg.runs:
            print(f"compare: {label} x{cfg.nproc} ...", flush=True)
            code = dist.launch_local(cfg.nproc, ["compare", *tokens, f"strategies={name}",
                                                 f"activation_checkpointing={mode}", f"project={folder.parent}",
                                                 f"name={folder.name}", "exist_ok=true", "_part=true"])
            if code:  # the group printed why
                raise SystemExit(code)
        rows = [json.loads((folder / "parts" / f"{label}.json").read_text()) for label, _, _ in cfg.runs]
        return _publish(cfg, folder, rows)
    if not cfg._part:
        folder = RunLog.new_folder(cfg.project, cfg.name, cfg.exist_ok) if env.is_main else folder
    device = dist.pick_device(env, cfg.device)
    rows = []
    with dist.process_group(env, device, timeout_s=cfg.timeout):
        folder = Path(dist.broadcast_object(folder))
        for label, name, mode in cfg.runs:
            rows.append({"strategy": label,
                         "ranks": dist.gather_object(measure(name, mode, cfg, env=env, device=device))})
        if env.is_main and cfg._part:
            (folder / "parts").mkdir(parents=True, exist_ok=True)
            for row in rows:
                (folder / "parts" / f"{row['strategy']}.json").write_text(json.dumps(row))
    if env.is_main and not cfg._part:
        return _publish(cfg, folder, rows)
    return None


# ---- one strategy on this rank --------------------------------------------------------------------------------------
def measure(name: str, checkpointing: str, cfg: CompareConfig, *, env: dist.DistEnv, device: torch.device
            ) -> dict[str, Any]:
    gc.collect()
    memory.load_meta_kernels()  # the activation forecast's meta-device pass would count torch's code as memory
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    task = yolo.model_task(cfg.model)
    data = _task_data(task)
    batch, double = (example_batch(task, data, n, cfg, device=device, env=env, layout=layout)
                     for n in (cfg.batch, 2 * cfg.batch))
    # memory first: once glibc's heap has grown under its default policy, later steps reuse its holes and the
    # resident set no longer follows the live tensors
    with memory.returning_freed_memory():
        memory.reset_peak(device)
        strategy, ema, criterion, numel, muon_numel, per_image = _build(name, checkpointing, cfg, task, data,
                                                                         env=env, device=device)
        peaks = {"setup": _peak(strategy, device)}
        for phase, images in (("warm-up", batch), ("warm-up", batch), ("batch", batch), ("double", double)):
            memory.reset_peak(device)  # two warm-up steps: in a probe DDP's peak still grew 260 MiB from step 2 to 3
            _train_step(strategy, ema, criterion, images, account=False, mean_loss=task.mean_loss)
            peaks[phase] = _peak(strategy, device)
    counter, times, states = CommCounter(env.world_size), [], {}
    with counter:
        for step in range(cfg.steps):
            if step == 1:
                counter.reset()  # the first step includes the heap's growth (and compilation)
            start = time.perf_counter()
            states = _train_step(strategy, ema, criterion, batch, account=step == cfg.steps - 1,
                                 mean_loss=task.mean_loss) or states
            times.append(time.perf_counter() - start)
    sent = counter.total / (cfg.steps - 1)
    result = {
        "rank": env.rank, "numel": numel, "images_per_rank": cfg.batch // env.world_size,
        "states": {k: states[f"{k}_bytes"] for k in memory.CATEGORIES},
        "formula": memory.strategy_formula(strategy, numel=numel, optimizer=cfg.optimizer, muon_numel=muon_numel),
        "forecast_activation_bytes": per_image * (cfg.batch // env.world_size),
        "peak_bytes": peaks["batch"], "peak_double_batch_bytes": peaks["double"], "peak_setup_bytes": peaks["setup"],
        "sent_bytes_per_step": round(sent), "sent_by_collective": dict(counter.bytes),
        "muon_sent_bytes_per_step": round(counter.bytes.get("all_to_all_single", 0) / (cfg.steps - 1)),
        "sent_theory_bytes": None if strategy.comm_volume is None else round(
            strategy.comm_volume * (env.world_size - 1) / env.world_size * 4 * numel),
        "step_s": statistics.median(times[1:]), "images_per_s": cfg.batch / statistics.median(times[1:]),
    }
    del strategy, ema, criterion
    gc.collect()
    return result


def _build(name: str, checkpointing: str, cfg: CompareConfig, task: Task, data: dict[str, Any], *,
           env: dist.DistEnv, device: torch.device):
    """The trainer's train state (engine/build.py) for `name`, the layers `checkpointing` names recomputed in
    backward; returns the strategy, its EMA, the loss, the model's parameter count, its MuSGD matrices' count and the
    forecast activation bytes per image."""
    train_cfg = TrainConfig(model=cfg.model, batch=cfg.batch, imgsz=cfg.imgsz, optimizer=cfg.optimizer,
                            strategy=name, precision=cfg.precision, epochs=1, warmup_epochs=0, compile=cfg.compile,
                            activation_checkpointing=checkpointing, budget=cfg.budget)
    # Ultralytics' hyper-parameters before the strategy: its memory baseline then excludes what Ultralytics' config
    # loads on first use (~28 MiB), as compare's figures always have
    hyp = yolo.hyp_namespace(train_cfg, task)
    strategy = make_strategy(name, cfg.precision, env=env, device=device, gloo_collectives=cfg.gloo_collectives,
                             sharded_init=cfg.sharded_init)
    state = build_train_state(train_cfg, strategy, spec=cfg.model, task=task, data=data,
                              images=cfg.batch // env.world_size, sizing=lambda *_: (cfg.batch, 5e-4), profile=True,
                              hyp=hyp)
    if state.forecast and env.rank == 0:
        print(f"compare: {name}+auto recomputes {len(state.recomputed)} layers: {state.forecast}", flush=True)
    strategy.expose_communication()
    muon = sum(state.sizes[key] for key in getattr(strategy.inner_optimizer(), "muon_names", ()))
    return (strategy, state.ema, state.criterion, sum(state.sizes.values()), muon,
            state.profiled.activation_bytes(state.recomputed))


def _train_step(strategy, ema, criterion, batch: dict[str, Any], *, account: bool, mean_loss: bool
                ) -> dict[str, int] | None:
    """One optimizer step through the trainer's own code; with `account`, the state bytes held just before the
    optimizer step."""
    items, _ = forward_backward(strategy, criterion, [batch], sync=True, mean_loss=mean_loss)
    held = strategy.memory_report(ema) if account else None
    strategy.step(items)
    ema.update()
    if strategy.device.type == "cuda":
        torch.cuda.synchronize(strategy.device)
    return held


def _peak(strategy, device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return memory.peak_rss() - strategy.baseline_rss


def _task_data(task: Task) -> dict[str, Any]:
    """Detection: COCO's 80 classes (the synthetic batch's); another task: its demo data's classes (and keypoints)."""
    if task.name == "detect":
        return {"nc": 80, "names": {i: str(i) for i in range(80)}}
    from ..data.loader import resolve_dataset

    return resolve_dataset("demo", task.name)


def example_batch(task: Task, data: dict[str, Any], batch: int, cfg: CompareConfig, *, device: torch.device,
                  env: dist.DistEnv, layout: torch.memory_format) -> dict[str, Any]:
    """This rank's share of one global batch, the same for every strategy: detection's synthetic batch; another
    task's first `batch` images of its demo's validation split through Ultralytics' own dataset (no augmentation), so
    the batch holds what that task's loss reads (masks, keypoints, rotated boxes, class labels, depth maps)."""
    if task.name == "detect":
        return synthetic_batch(batch, cfg.imgsz, device, env, layout)
    from ..data.loader import build_dataset, preprocess, split_batch

    hyp = yolo.hyp_namespace(TrainConfig(model=cfg.model, imgsz=cfg.imgsz), task)
    dataset = build_dataset(hyp, data, "val", batch=batch, stride=32, mode="val")
    from torch.utils.data import default_collate

    collate = getattr(dataset, "collate_fn", None) or default_collate  # ClassificationDataset has none of its own
    whole = collate([dataset[i % len(dataset)] for i in range(batch)])
    mine = split_batch(whole, batch // env.world_size, per_object=task.batch_keys(hyp))[env.rank]
    out = preprocess(mine, device)
    out["img"] = out["img"].contiguous(memory_format=layout)
    return out


def synthetic_batch(batch: int, imgsz: int, device: torch.device, env: dist.DistEnv,
                    layout: torch.memory_format = torch.contiguous_format) -> dict[str, Any]:
    """This rank's share of a seeded global batch: noise images, three boxes each (the same for every strategy)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, imgsz, imgsz, generator=g)
    boxes = torch.cat([torch.rand(batch * 3, 2, generator=g) * 0.6 + 0.2,
                       torch.rand(batch * 3, 2, generator=g) * 0.25 + 0.05], 1)
    classes = torch.randint(0, 80, (batch * 3, 1), generator=g).float()
    index = torch.arange(batch).repeat_interleave(3)
    local = batch // env.world_size
    lo, hi = env.rank * local, (env.rank + 1) * local
    keep = (index >= lo) & (index < hi)
    return {"img": images[lo:hi].to(device, memory_format=layout), "cls": classes[keep].to(device),
            "bboxes": boxes[keep].to(device), "batch_idx": (index[keep] - lo).float().to(device)}


# ---- results --------------------------------------------------------------------------------------------------------
def summarize(row: dict[str, Any], budget: int) -> dict[str, Any]:
    """One strategy's figures: the worst rank for memory, the slowest for time."""
    ranks = row["ranks"]
    worst = max(ranks, key=lambda r: sum(r["states"].values()))
    held, theory = sum(worst["states"].values()), sum(worst["formula"].values())
    peak = max(r["peak_bytes"] for r in ranks)
    per_image = max((r["peak_double_batch_bytes"] - r["peak_bytes"]) / r["images_per_rank"] for r in ranks)
    fixed = peak - per_image * worst["images_per_rank"]
    fits = int((budget - fixed) // per_image) if per_image > 0 else None
    sent = max(r["sent_bytes_per_step"] for r in ranks)
    theory_sent = worst["sent_theory_bytes"]
    return {
        "strategy": row["strategy"], **{f"{k}_MiB": worst["states"][k] / MIB for k in memory.CATEGORIES},
        "states_MiB": held / MIB, "formula_MiB": theory / MIB,
        "states_vs_formula": held / theory - 1 if theory else None,
        "peak_MiB": peak / MIB, "activations_MiB": (peak - held) / MIB,
        "forecast_activations_MiB": max(r["forecast_activation_bytes"] for r in ranks) / MIB,
        "per_image_MiB": per_image / MIB,
        "max_batch_per_gpu": fits, "sent_MiB_per_step": sent / MIB,
        "muon_sent_MiB_per_step": max(r["muon_sent_bytes_per_step"] for r in ranks) / MIB,
        "sent_theory_MiB": None if theory_sent is None else theory_sent / MIB,
        "step_s": max(r["step_s"] for r in ranks), "images_per_s": min(r["images_per_s"] for r in ranks),
    }


def _publish(cfg: CompareConfig, folder: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary = [summarize(row, cfg.budget_bytes) for row in rows]
    ddp = next((s for s in summary if s["strategy"] == "ddp"), summary[0])
    for s in summary:
        s["peak_vs_ddp"] = s["peak_MiB"] / ddp["peak_MiB"]
        s["step_vs_ddp"] = s["step_s"] / ddp["step_s"]
        s["sent_vs_ddp"] = s["sent_MiB_per_step"] / ddp["sent_MiB_per_step"] if ddp["sent_MiB_per_step"] else None
    folder.mkdir(parents=True, exist_ok=True)
    result = {"config": {k: getattr(cfg, k) for k in ("model", "strategies", "nproc", "imgsz", "batch", "precision",
                                                       "steps", "optimizer", "budget", "channels_last", "compile",
                                                       "gloo_collectives", "activation_checkpointing", "sharded_init")},
              "device": _device_name(), "method": __doc__.split("\n\n", 1)[1].split("\n\nSelf-launched")[0],
              "summary": summary, "ranks": rows}
    (folder / "compare.json").write_text(json.dumps(result, indent=2))
    with open(folder / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    _plot(summary, folder / "compare.png", title=f"{cfg.model}, {len(rows[0]['ranks'])} ranks, imgsz {cfg.imgsz}, "
                                                  f"batch {cfg.batch}, {cfg.precision}, {cfg.optimizer}")
    _print_table(summary, cfg, len(rows[0]["ranks"]))
    print(f"results written to {folder / 'compare.json'}, compare.csv, compare.png", flush=True)
    return result


def _device_name() -> str:
    import platform

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"


def _print_table(summary: list[dict[str, Any]], cfg: CompareConfig, world: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{cfg.model} x{world} ranks, imgsz {cfg.imgsz}, batch {cfg.batch}, {cfg.precision}, "
                        f"{cfg.optimizer}: MiB per rank (worst rank)")
    columns = ["strategy", "params", "master", "grads", "optim", "ema", "states", "formula", "diff", "peak",
               "activ.", "forecast", "vs ddp", f"batch@{cfg.budget}", "sent/step", "theory", "muon", "step s", "img/s",
               "time vs ddp"]
    for column in columns:
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for s in summary:
        table.add_row(s["strategy"], *(f"{s[f'{k}_MiB']:.0f}" for k in memory.CATEGORIES),
                      f"{s['states_MiB']:.0f}", f"{s['formula_MiB']:.0f}", _percent(s["states_vs_formula"]),
                      f"{s['peak_MiB']:.0f}", f"{s['activations_MiB']:.0f}",
                      f"{s['forecast_activations_MiB']:.0f}", f"{s['peak_vs_ddp']:.2f}",
                      str(s["max_batch_per_gpu"]), f"{s['sent_MiB_per_step']:.0f}",
                      "-" if s["sent_theory_MiB"] is None else f"{s['sent_theory_MiB']:.0f}",
                      f"{s['muon_sent_MiB_per_step']:.0f}",
                      f"{s['step_s']:.2f}", f"{s['images_per_s']:.1f}", f"{s['step_vs_ddp']:.2f}")
    Console(width=200).print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _plot(summary: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Stacked bars of per-rank memory by category, the formula's model states marked on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 * len(summary) + 3, 5))
    names = [s["strategy"] for s in summary]
    bottom = [0.0] * len(summary)
    for key in (*memory.CATEGORIES, "activations"):
        values = [max(s[f"{key}_MiB"], 0.0) for s in summary]
        ax.bar(names, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.scatter(names, [s["formula_MiB"] for s in summary], marker="_", s=900, color="black", zorder=3,
               label="model states, formula")
    ax.set_ylabel("MiB per rank (peak)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

