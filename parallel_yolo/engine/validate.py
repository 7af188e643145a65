"""Validation through the task's Ultralytics validator (DetectionValidator, SegmentationValidator, ...), in its
training mode, on every rank.

Training mode gives the validation losses and, under a process group, Ultralytics gathers the per-rank stats
itself (each rank validates a contiguous shard). `val checkpoint=DIR` goes through the same path, so a
checkpoint evaluates to exactly what the trainer reported when it saved it.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._ultralytics_internals import prepare_metrics, use_local_font, validate_in_training_mode
from ..config import ConfigError
from ..tasks.task import Task

__all__ = ["Evaluator", "run_val", "load_for_eval", "model_from_checkpoint"]


class Evaluator:
    def __init__(self, task: Task, model: nn.Module, *, loader, data: dict, hyp: Any, save_dir: Path,
                 device: torch.device, world_size: int):
        args = copy(hyp)
        self.plots = args.plots = bool(hyp.plots)
        if self.plots:
            use_local_font()
        self.validator = task.validator_class()(loader, save_dir=Path(save_dir), args=args)
        prepare_metrics(self.validator, model, data)  # `model`: its attributes only (names, head), not its weights
        self.data, self.device, self.world_size = data, device, world_size

    def metric_keys(self, loss_names: tuple[str, ...]) -> list[str]:
        return [*self.validator.metrics.keys, *(f"val/{k}" for k in loss_names)]

    def __call__(self, model: nn.Module, loss_names: tuple[str, ...], *, final: bool = True) -> dict[str, float] | None:
        """Metrics (with 'fitness') on rank 0; None on the other ranks. With plots on, the validator plots in the
        `final` validation only, as in Ultralytics' trainer."""
        if getattr(model, "criterion", None) is None:
            model.criterion = model.init_criterion()
        was_training = model.training
        try:
            return validate_in_training_mode(self.validator, model, device=self.device, data=self.data,
                                             loss_names=loss_names, world_size=self.world_size,
                                             plots=self.plots and final)
        finally:
            model.train(was_training)


def run_val(cfg) -> dict[str, float] | None:
    """`parallel-yolo val`: evaluate a checkpoint folder (or a consolidated .pt) under any launcher and world size.

    Prints the metrics and writes val.json on rank 0; returns them there (None on other ranks).
    """
    import json

    from ..data.loader import build_dataset, check_imgsz, resolve_dataset, val_loader
    from ..launch import dist
    from ..monitor.runlog import RunLog
    from ..tasks.yolo import loss_names, model_task

    env = dist.read_env()
    device = dist.pick_device(env, cfg.device)
    model, trained = load_for_eval(cfg.checkpoint)
    task = model_task(model.yaml)
    data = resolve_dataset(cfg.data or trained.get("data") or "demo", task.name)
    if data["nc"] != model.nc:
        raise ConfigError(f"data={cfg.data}: {data['nc']} classes but the checkpoint was trained on {model.nc}; "
                            "pass the data yaml it was trained on")
    with dist.process_group(env, device):
        hyp = _eval_hyp(cfg, trained, task)
        stride = max(int(model.stride.max()), 32)
        hyp.imgsz = check_imgsz(cfg.imgsz or trained.get("imgsz") or task.default_imgsz, stride=stride)
        # `batch` is global, as in train; Ultralytics' per-pass loss normalisation makes the val losses depend on
        # the images per pass, so use batch=2*train batch to reproduce what training reported.
        per_rank = max(cfg.batch // env.world_size, 1)
        dataset = build_dataset(hyp, data, cfg.split, batch=per_rank, stride=stride, mode="val", rect=True)
        loader = val_loader(dataset, batch=per_rank, workers=cfg.workers, distributed=env.launched, device=device)
        folder = dist.broadcast_object(RunLog.new_folder(cfg.project, cfg.name, cfg.exist_ok) if env.is_main else None)
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.args = hyp
        evaluator = Evaluator(task, model, loader=loader, data=data, hyp=hyp, save_dir=folder, device=device,
                              world_size=env.world_size)
        model = model.to(device).eval()
        model.criterion = model.init_criterion()  # Ultralytics' loss of the task: the validation losses' names
        metrics = evaluator(model, loss_names(model.criterion, task))
        if env.is_main:
            (Path(folder) / "val.json").write_text(json.dumps(metrics, indent=2))
            print(json.dumps(metrics, indent=2), flush=True)
            print(f"results written to {Path(folder) / 'val.json'}", flush=True)
    return metrics


def load_for_eval(source: str) -> tuple[nn.Module, dict[str, Any]]:
    """(the task's model with the checkpoint's EMA weights, its training args) from a checkpoint folder (read
    straight from the shards, whatever strategy and world size wrote them; an s3:// one is fetched first) or a
    consolidated .pt."""
    from ..checkpoint import remote
    from ..tasks.yolo import load_local_pt

    path = Path(remote.localize(source, key="checkpoint"))
    if path.is_dir():
        model, manifest = model_from_checkpoint(path, weights="ema")
        return model, {**manifest["train_args"], "imgsz": manifest.get("imgsz")}
    if path.suffix != ".pt":
        raise ConfigError(f"checkpoint={source}: expected a checkpoint folder or a consolidated .pt")
    model = load_local_pt(str(path))
    ckpt_args = getattr(model, "args", None)
    trained = dict(ckpt_args) if isinstance(ckpt_args, dict) else dict(vars(ckpt_args)) if ckpt_args else {}
    return model, trained


def model_from_checkpoint(folder: Path, *, weights: str) -> tuple[nn.Module, dict[str, Any]]:
    """The full model (`weights`: 'ema' or 'model') assembled from a checkpoint's shards, and its manifest."""
    from .. import checkpoint
    from ..tasks.yolo import check_layers, model_task, set_task_attributes

    try:
        manifest = checkpoint.load_manifest(folder)
        state = checkpoint.Reader(folder, manifest).state_dict(f"{weights}/")
    except checkpoint.CheckpointError as e:
        raise ConfigError(f"checkpoint={folder}: {e}") from None
    layers = check_layers(manifest["model_yaml"], f"checkpoint={folder}")
    task = model_task(layers)
    model = task.model_class()(layers, nc=manifest["nc"], verbose=False)
    data = {"nc": manifest["nc"], "names": {int(k): v for k, v in manifest["names"].items()}}
    if manifest.get("kpt_shape"):
        data["kpt_shape"] = manifest["kpt_shape"]
    set_task_attributes(model, task, data=data, hyp=None)
    mismatch = set(model.state_dict()) ^ set(state)
    if mismatch:
        raise ConfigError(f"checkpoint={folder}: its tensors do not match the model in its own manifest "
                          f"({sorted(mismatch)[0]}); the checkpoint is damaged")
    model.load_state_dict(state)
    return model.float(), manifest


def _eval_hyp(cfg, trained: dict[str, Any], task: Task) -> Any:
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

    keep = {k: v for k, v in trained.items() if k in DEFAULT_CFG_DICT}
    keep.update(task=task.name, mode="val", plots=cfg.plots, split=cfg.split, conf=cfg.conf, iou=cfg.iou,
                batch=cfg.batch, device=None, save_json=False)
    return get_cfg(overrides=keep)
