"""`parallel-yolo consolidate checkpoint=DIR out=FILE`: one file from a sharded checkpoint.

`.safetensors`: the full state dict, with the model yaml, class names and image size as metadata. `.pt`: an
Ultralytics checkpoint (the model object under "model", train_args, date, version) that `ultralytics.YOLO(FILE)`
validates, predicts with and exports. Weights stay fp32 (Ultralytics halves its own files), so the file holds
exactly what was in memory at save time.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import torch

from ..config import ConfigError

__all__ = ["consolidate"]


def consolidate(*, checkpoint: str, out: str, weights: str = "ema") -> Path:
    from ..checkpoint import remote
    from .validate import model_from_checkpoint

    target = Path(out)
    if target.suffix not in (".pt", ".safetensors"):
        raise ConfigError(f"out={out}: name a .pt (Ultralytics checkpoint) or a .safetensors file")
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights={weights}: use weights=ema (what Ultralytics evaluates) or weights=model")
    model, manifest = model_from_checkpoint(Path(remote.localize(checkpoint, key="checkpoint")), weights=weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if target.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {"model_yaml": json.dumps(manifest["model_yaml"]), "nc": str(manifest["nc"]),
                    "names": json.dumps(manifest["names"]), "imgsz": str(manifest.get("imgsz")),
                    "step": str(manifest["step"]), "weights": weights, "source": str(checkpoint)}
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
        else:
            torch.save(_ultralytics_checkpoint(model, manifest), tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {target} ({weights} weights of {checkpoint}, step {manifest['step']})", flush=True)
    return target


def _ultralytics_checkpoint(model, manifest: dict) -> dict:
    from ultralytics import __version__
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from ..data.loader import resolve_dataset
    from ..tasks.yolo import model_task

    task = model_task(manifest["model_yaml"]).name
    args = {k: v for k, v in manifest["train_args"].items() if k in DEFAULT_CFG_DICT}
    try:  # a data path Ultralytics can open on its own (data=demo is ours)
        data = resolve_dataset(args.get("data", "demo"), task)
        args["data"] = str(data.get("yaml_file") or data["path"])
    except ConfigError:
        pass
    args.update(task=task, mode="train", model=manifest["train_args"].get("model"), imgsz=manifest.get("imgsz"))
    model.args = args
    return {"epoch": manifest["epoch"] - 1, "best_fitness": manifest.get("best_fitness"), "model": model,
            "ema": None, "updates": manifest.get("ema_updates"), "optimizer": None, "train_args": args,
            "train_metrics": {"fitness": manifest.get("fitness")}, "date": datetime.now().astimezone().isoformat(),
            "version": __version__, "license": "AGPL-3.0 (https://ultralytics.com/license)",
            "docs": "https://docs.ultralytics.com"}
