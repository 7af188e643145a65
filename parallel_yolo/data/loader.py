"""Data: Ultralytics' dataset pipeline (YOLODataset, its augmentations and collate) fed by a global-batch sampler,
plus the synthetic `demo` dataset generated locally.

The sampler gives rank r the r-th contiguous slice of every global batch, so a run on N processes sees exactly
the images a single process sees, split the same way a single process splits them into micro-batches.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._ultralytics_internals import mosaic_from_whole_dataset
from ..config import ConfigError, Unanimous
from .demo import DEMOS, demo_dataset, demo_task

__all__ = ["resolve_dataset", "GlobalBatchSampler", "SeededSamples", "train_loader", "val_loader",
           "preprocess", "split_batch", "Timed", "wait_report"]

def resolve_dataset(spec: str, task: str = "detect") -> dict[str, Any]:
    """Ultralytics' parsed data dict for a `task` model (paths resolved, names, nc) from a data yaml, a classification
    folder or a demo (`demo`: the task's own); never downloads. What the task's Ultralytics trainer adds to it is added
    (semantic: a background class for polygon labels), and data of another task is refused by name."""
    from ultralytics.data.utils import add_polygon_background, check_det_dataset

    named = task if spec == "demo" else demo_task(spec)
    if named is not None and named != task:
        raise ConfigError(f"data={spec} is the {named} demo, and the model is a {task} model; use data={DEMOS[task]} "
                          f"(or data=demo, the demo of the model's task)")
    path = demo_dataset(task) if named else Path(spec)
    if task == "classify":
        return _classification_data(spec, path)
    if path.is_dir():
        raise ConfigError(f"data={spec} is a folder: a {task} model trains on an Ultralytics data yaml (train:, val:, "
                          "names:); a folder of class folders is classification data, for a -cls model")
    if not path.is_file():
        raise ConfigError(f"data={spec}: file not found; pass an Ultralytics data yaml or data=demo")
    try:
        data = check_det_dataset(str(path), autodownload=False)
    except Exception as e:  # Ultralytics raises several types, with emoji-laden multi-line messages
        raise ConfigError(f"data={spec}: {_plain(e)}; fix the data yaml (train:, val:, names:)") from None
    for split in ("train", "val"):
        if not data.get(split):
            raise ConfigError(f"data={spec}: no '{split}:' entry; add the {split} image folder to the yaml")
        for folder in (data[split] if isinstance(data[split], list) else [data[split]]):
            if Path(folder).is_dir() and not _has_images(Path(folder)):
                raise ConfigError(f"data={spec}: no images in {folder} ('{split}:'); put the images there "
                                  "(jpg, png, ...) or point '{split}:' at the folder that holds them")
    if task == "pose" and "kpt_shape" not in data:
        raise ConfigError(f"data={spec}: no 'kpt_shape:'; a pose model trains on keypoint data whose yaml gives "
                          "their shape (e.g. kpt_shape: [17, 3]) and, for flipped images, flip_idx")
    if task != "pose" and "kpt_shape" in data:
        raise ConfigError(f"data={spec} is keypoint data (it has kpt_shape); train it with a -pose model")
    if task == "semantic":
        add_polygon_background(data)  # as SemanticSegmentationTrainer.get_dataset
    return data


def _classification_data(spec: str, path: Path) -> dict[str, Any]:
    """Ultralytics' classification layout: a folder with train/ and val/ (or test/), a folder per class in each."""
    from ultralytics.data.utils import check_cls_dataset

    if not path.is_dir():
        raise ConfigError(f"data={spec}: a classification model trains on a folder holding train/ and val/, each with "
                          "a folder of images per class (Ultralytics' layout), not a data yaml or a missing path")
    if not (path / "train").is_dir() or not any((path / s).is_dir() for s in ("val", "test")):
        raise ConfigError(f"data={spec}: no train/ and val/ folders in it; put a folder per class under "
                          f"{path / 'train'} and {path / 'val'}")
    try:
        data = check_cls_dataset(str(path))
    except Exception as e:
        raise ConfigError(f"data={spec}: {_plain(e)}; fix the folder layout (train/CLASS/image, val/CLASS/image)") \
            from None
    data["val"] = data.get("val") or data.get("test")
    data["path"] = str(path)  # what Ultralytics' own trainer is given as data= for this layout
    return data


def _has_images(folder: Path) -> bool:
    from ultralytics.data.utils import IMG_FORMATS

    return any(p.suffix[1:].lower() in IMG_FORMATS for p in folder.rglob("*.*"))


def check_imgsz(imgsz: int, *, stride: int) -> int:
    """Refuse an image size the model cannot tile (Ultralytics would round it up with a warning)."""
    if imgsz % stride:
        down, up = imgsz // stride * stride, -(-imgsz // stride) * stride
        fix = f"imgsz={up}" if down == 0 else f"imgsz={down} or imgsz={up}"
        raise Unanimous(f"imgsz={imgsz} is not a multiple of the model's largest stride {stride}; use {fix}")
    return imgsz


def build_dataset(hyp: Any, data: dict[str, Any], split: str, *, batch: int, stride: int, mode: str,
                  rect: bool = False) -> Dataset:
    """Ultralytics' dataset of `hyp.task` for one split (YOLODataset and its semantic and depth kinds, or
    ClassificationDataset), as the task's trainer builds it. Labels it would silently skip as corrupt (a class index
    >= nc, coordinates outside [0, 1], another keypoint count) are refused, and so are labels of another task (boxes
    without polygons for a segment or OBB model): training on a quietly smaller or empty dataset is a mistake found
    too late."""
    from ultralytics.data.build import build_yolo_dataset

    if hyp.task == "classify":
        return _classification_dataset(hyp, data, split, mode=mode)
    try:
        dataset = build_yolo_dataset(hyp, data[split], batch, data, mode=mode, rect=rect, stride=stride)
    except FileNotFoundError as e:  # no images
        raise ConfigError(f"{split} images {data[split]}: {_plain(e.__cause__ or e)}; fix the dataset or the data "
                          "yaml") from None
    except ValueError as e:  # Ultralytics' own check: labels of another task (boxes for a segment or OBB model)
        raise ConfigError(f"{split} labels {data[split]}: {_plain(e)} A {hyp.task} model trains on "
                          f"{_ROW.get(hyp.task, 'its own labels')}") from None
    except RuntimeError as e:  # not one valid label: Ultralytics lists the reasons on the lines after the first
        lines = str(e).splitlines()
        raise ConfigError(_corrupt(split, "every label file is", _plain(lines[1] if len(lines) > 1 else e), data,
                                   hyp.task)) from None
    found = dataset.get_img_files(data[split])
    skipped = sorted(set(found) - set(dataset.im_files))
    if skipped:
        count = f"{len(skipped)} of {len(found)} label files are"
        raise ConfigError(_corrupt(split, count, _why_corrupt(skipped[0], data, hyp.task), data, hyp.task))
    return dataset


_ROW = {"detect": "one 'class x y w h' row per box", "segment": "one 'class x1 y1 x2 y2 ...' row per object",
        "obb": "one 'class x1 y1 x2 y2 x3 y3 x4 y4' row per object",
        "pose": "one 'class x y w h' row per object, then x y (visible) per keypoint as kpt_shape says"}


def _classification_dataset(hyp: Any, data: dict[str, Any], split: str, *, mode: str) -> Dataset:
    """ClassificationDataset as ClassificationTrainer.build_dataset makes it; an image it cannot read is refused."""
    from ultralytics.data import ClassificationDataset

    dataset = ClassificationDataset(str(data[split]), hyp, augment=mode == "train",
                                    prefix="train" if mode == "train" else split, names=data["names"])
    if not dataset.samples:
        raise ConfigError(f"{split} images {data[split]}: none found; put the images in a folder per class there")
    found = sum(1 for folder in Path(data[split]).iterdir() if folder.is_dir() for _ in _images_in(folder))
    if hyp.fraction >= 1.0 and found != len(dataset.samples):  # with a fraction it takes a subset of its own
        raise ConfigError(f"{split} images: {found - len(dataset.samples)} of {found} cannot be read (corrupt or "
                          f"not an image); remove or replace them in {data[split]}")
    return dataset


def _images_in(folder: Path):
    from ultralytics.data.utils import IMG_FORMATS

    return (p for p in folder.rglob("*.*") if p.suffix[1:].lower() in IMG_FORMATS)


def _corrupt(split: str, count: str, example: str, data: dict[str, Any], task: str) -> str:
    what = _ROW.get(task, "one label per image, of the image's size")
    return f"{split} labels: {count} corrupt, e.g. {example}; fix them ({what}, class < nc={data['nc']}, " \
           "coordinates normalised to [0, 1])"


def _plain(message: Any) -> str:
    """One line without Ultralytics' colour codes."""
    import re

    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(message)).split())[:240]


def _label_files(images: list[str]) -> list[str]:
    from ultralytics.data.utils import img2label_paths

    return img2label_paths(images)


def _why_corrupt(image: str, data: dict[str, Any], task: str) -> str:
    """Ultralytics' own verdict on the label file of one skipped image (YOLO-format labels), else the image."""
    from ultralytics.data.utils import verify_image_label

    label = _label_files([image])[0]
    if task in ("semantic", "depth") or not Path(label).is_file():
        return f"{image} (no label of its own, or one Ultralytics could not read)"
    nkpt, ndim = data.get("kpt_shape") or (0, 0)
    message = verify_image_label((image, label, "", task == "pose", data["nc"], nkpt, ndim, False))[-1]
    return _plain(message) or label


class GlobalBatchSampler(Sampler[tuple[int, int]]):
    """Indices for one rank: a seeded permutation per epoch, padded to whole global batches, sliced per rank.

    Every rank computes the same permutation; within global batch k, rank r takes positions
    [k*B + r*b, k*B + (r+1)*b) where B is the global batch and b = B / world_size. Each index comes with its
    position in the epoch's global order, which seeds that sample's augmentation (see SeededSamples), and an epoch
    can start at any batch: that is how a resumed run picks up mid-epoch.
    """

    def __init__(self, size: int, *, batch: int, rank: int, world_size: int, shuffle: bool, seed: int):
        self.size, self.batch, self.rank, self.world_size = size, batch, rank, world_size
        self.shuffle, self.seed, self.epoch, self.start = shuffle, seed, 0, 0
        self.local = batch // world_size

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def batches(self) -> int:
        return math.ceil(self.size / self.batch)

    def __len__(self) -> int:
        return (self.batches() - self.start) * self.local

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        total = self.batches() * self.batch
        order = (order * math.ceil(total / self.size))[:total]  # wrap around to fill the last global batch
        for k in range(self.start, self.batches()):
            start = k * self.batch + self.rank * self.local
            for position in range(start, start + self.local):
                yield (self.epoch * total + position) * 1009 + self.seed, order[position]


class SeededSamples(Dataset):
    """A YOLODataset whose every sample is augmented from its own seed (epoch, position, run seed).

    Ultralytics' augmentations draw from the process-global random, numpy and torch generators, so what a sample
    gets depends on what that worker loaded before. Seeding per sample makes the data a function of the sample
    alone: the same for any number of workers, and the same when a run resumes mid-epoch. For the same reason
    mosaic partners are drawn from the whole dataset (as Ultralytics does with cache=ram) instead of from the
    images this worker happened to load last.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        mosaic_from_whole_dataset(getattr(dataset, "transforms", None))  # a ClassificationDataset has no mosaic

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        import random

        seed, index = key
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]

    def close_mosaic(self, hyp) -> None:
        if not hasattr(self.dataset, "close_mosaic"):  # classification: no mosaic to close
            return
        self.dataset.close_mosaic(hyp=hyp)
        mosaic_from_whole_dataset(self.dataset.transforms)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)  # labels, collate_fn, ...: the YOLODataset's own


def wait_report(ranks: list[tuple[float, float]], *, workers: int) -> str:
    """How much of the training time the slowest rank waited for its loader ((waited, total) seconds per rank), with
    advice when it matters."""
    from ..launch.dist import available_cores

    waited, total = max(ranks, key=lambda pair: pair[0] / max(pair[1], 1e-9))
    share = waited / total if total else 0.0
    line = f"data loading: waited {waited:.1f}s of {total:.1f}s training ({share:.1%}, slowest rank)"
    if share > 0.1:
        line += (f"; the loader does not keep up: raise workers= (now {workers} per process, {available_cores()} "
                 "cores here), cache=ram, or a smaller imgsz")
    return line


def train_loader(dataset, *, batch: int, rank: int, world_size: int, workers: int, seed: int,
                 device: torch.device, prefetch_factor: int = 4) -> DataLoader:
    """This rank's loader, as Ultralytics' build_dataloader makes it (pinned memory for a GPU, `prefetch_factor`
    batches ahead per worker), with workers that live as long as the loader: started once, not every epoch."""
    samples = SeededSamples(dataset)
    sampler = GlobalBatchSampler(len(dataset), batch=batch, rank=rank, world_size=world_size, shuffle=True, seed=seed)
    return DataLoader(samples, batch_size=batch // world_size, sampler=sampler, num_workers=workers,
                      collate_fn=getattr(dataset, "collate_fn", None), pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch_factor if workers > 0 else None)


def val_loader(dataset, *, batch: int, workers: int, distributed: bool, device: torch.device) -> DataLoader:
    """Ultralytics' own val loader: each rank takes a contiguous shard; the validator gathers the stats."""
    from ultralytics.data.build import build_dataloader

    return build_dataloader(dataset, batch=batch, workers=workers, shuffle=False, rank=0 if distributed else -1,
                            device=device)


def preprocess(batch: dict[str, Any], device: torch.device, *, channels_last: bool = False) -> dict[str, Any]:
    """The task trainers' preprocess_batch: tensors to the device, 8-bit images to float in [0, 1] (classification
    images come normalised already), depth maps in float (in channels-last memory format if asked: the convolutions'
    activations follow their input's format)."""
    out = {k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, torch.Tensor) else v
           for k, v in batch.items()}
    out["img"] = out["img"].float() / 255 if out["img"].dtype == torch.uint8 else out["img"].float()
    if "depth" in out:
        out["depth"] = out["depth"].float()
    if channels_last:
        out["img"] = out["img"].contiguous(memory_format=torch.channels_last)
    return out


class Timed:
    """An iterable's items, counting in `waited` the seconds spent waiting for them."""

    def __init__(self, iterable):
        self.iterable, self.waited = iterable, 0.0

    def __len__(self) -> int:
        return len(self.iterable)

    def __iter__(self):
        iterator = iter(self.iterable)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self.waited += time.perf_counter() - start
            yield item


def split_batch(batch: dict[str, Any], micro: int, *, per_object: tuple[str, ...]) -> list[dict[str, Any]]:
    """Cut a collated batch into micro-batches of `micro` images: the `per_object` keys by their batch_idx (re-indexed),
    every other tensor or list with a row per image by image. A batch without batch_idx (classification) has none."""
    n = batch["img"].shape[0]
    if micro >= n:
        return [batch]
    per_object = per_object if "batch_idx" in batch else ()
    parts = []
    for start in range(0, n, micro):
        stop = min(start + micro, n)
        objects = (batch["batch_idx"] >= start) & (batch["batch_idx"] < stop) if per_object else None
        part = {}
        for k, v in batch.items():
            if k in per_object:
                part[k] = v[objects] - start if k == "batch_idx" else v[objects]
            elif isinstance(v, torch.Tensor) and v.shape[:1] == (n,):
                part[k] = v[start:stop]
            elif isinstance(v, (list, tuple)) and len(v) == n:
                part[k] = v[start:stop]
            else:
                part[k] = v
        parts.append(part)
    return parts
