"""Data: Ultralytics' dataset pipeline (YOLODataset, its augmentations and collate) fed by a global-batch sampler,
plus the synthetic `demo` dataset generated locally.

The sampler gives rank r the r-th contiguous slice of every global batch, so a run on N processes sees exactly
the images a single process sees, split the same way a single process splits them into micro-batches.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .._ultralytics_internals import mosaic_from_whole_dataset
from ..config import ConfigError, Unanimous

__all__ = ["resolve_dataset", "demo_dataset", "GlobalBatchSampler", "SeededSamples", "train_loader", "val_loader",
           "preprocess", "split_batch", "Timed", "wait_report"]

DEMO_CLASSES = {0: "square", 1: "circle", 2: "triangle"}
DEMO_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("PARALLEL_YOLO_CACHE", Path.home() / ".cache" / "parallel_yolo"))


def demo_dataset(*, n_train: int = 256, n_val: int = 64, size: int = 160, seed: int = 0) -> Path:
    """Generate (once) the shapes dataset in YOLO layout and return its data yaml.

    Each image holds 1-3 filled shapes of the three classes on a noisy background. Generation is deterministic
    and atomic (written to a temporary folder, then renamed), so concurrent ranks never see half a dataset.
    """
    key = hashlib.sha1(f"{DEMO_VERSION}-{n_train}-{n_val}-{size}-{seed}".encode()).hexdigest()[:10]
    root = cache_dir() / f"demo-{key}"
    yaml_file = root / "data.yaml"
    if yaml_file.is_file():
        return yaml_file
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        for i in range(count):
            image, labels = _shapes_image(rng, size)
            _write_png(tmp / "images" / split / f"{i:05d}.png", image)
            (tmp / "labels" / split / f"{i:05d}.txt").write_text(
                "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels))
    names = "".join(f"  {k}: {v}\n" for k, v in DEMO_CLASSES.items())
    (tmp / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return yaml_file


def _shapes_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple]]:
    import cv2

    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    labels = []
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(0, 3))
        side = int(rng.integers(size // 6, size // 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        if cls == 0:
            cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), color, -1)
        elif cls == 1:
            cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, color, -1)
        else:
            points = np.array([[x0 + side // 2, y0], [x0, y0 + side - 1], [x0 + side - 1, y0 + side - 1]])
            cv2.fillPoly(image, [points.astype(np.int32)], color)
        labels.append((cls, (x0 + side / 2) / size, (y0 + side / 2) / size, side / size, side / size))
    return image, labels


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    cv2.imwrite(str(path), image)


def resolve_dataset(spec: str) -> dict[str, Any]:
    """Ultralytics' parsed data dict (paths resolved, names, nc) for a data yaml or `demo`; never downloads."""
    from ultralytics.data.utils import check_det_dataset

    path = demo_dataset() if spec == "demo" else Path(spec)
    if not path.is_file():
        raise ConfigError(f"data={spec}: file not found; pass an Ultralytics data yaml (COCO layout) or data=demo")
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
    """Ultralytics' YOLODataset for one split. Labels it would silently skip as corrupt (a class index >= nc,
    coordinates outside [0, 1]) are refused: training on a quietly smaller dataset is a mistake found too late."""
    from ultralytics.data.build import build_yolo_dataset

    try:
        dataset = build_yolo_dataset(hyp, data[split], batch, data, mode=mode, rect=rect, stride=stride)
    except FileNotFoundError as e:  # no images
        raise ConfigError(f"{split} images {data[split]}: {_plain(e.__cause__ or e)}; fix the dataset or the data "
                          "yaml") from None
    except RuntimeError as e:  # not one valid label: Ultralytics lists the reasons on the lines after the first
        lines = str(e).splitlines()
        raise ConfigError(_corrupt(split, "every label file is", _plain(lines[1] if len(lines) > 1 else e), data)) from None
    skipped = sorted(set(dataset.label_files) - set(_label_files(dataset.im_files)))
    if skipped:
        count = f"{len(skipped)} of {len(dataset.label_files)} label files are"
        raise ConfigError(_corrupt(split, count, _why_corrupt(skipped[0], data), data))
    return dataset


def _corrupt(split: str, count: str, example: str, data: dict[str, Any]) -> str:
    return (f"{split} labels: {count} corrupt, e.g. {example}; fix them (one 'class x y w h' row per "
            f"box, class < nc={data['nc']}, coordinates normalised to [0, 1])")


def _plain(message: Any) -> str:
    """One line without Ultralytics' colour codes."""
    import re

    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(message)).split())[:240]


def _label_files(images: list[str]) -> list[str]:
    from ultralytics.data.utils import img2label_paths

    return img2label_paths(images)


def _why_corrupt(label_file: str, data: dict[str, Any]) -> str:
    """Ultralytics' own verdict on one label file (it finds the image by the labels/ -> images/ convention)."""
    from ultralytics.data.utils import verify_image_label

    stem = Path(label_file.replace(f"{os.sep}labels{os.sep}", f"{os.sep}images{os.sep}"))
    images = sorted(stem.parent.glob(stem.stem + ".*"))
    if not images:
        return label_file
    message = verify_image_label((str(images[0]), label_file, "", False, data["nc"], 0, 0, False))[-1]
    return _plain(message) or label_file


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
        mosaic_from_whole_dataset(dataset.transforms)

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
                      collate_fn=dataset.collate_fn, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch_factor if workers > 0 else None)


def val_loader(dataset, *, batch: int, workers: int, distributed: bool, device: torch.device) -> DataLoader:
    """Ultralytics' own val loader: each rank takes a contiguous shard; the validator gathers the stats."""
    from ultralytics.data.build import build_dataloader

    return build_dataloader(dataset, batch=batch, workers=workers, shuffle=False, rank=0 if distributed else -1,
                            device=device)


def preprocess(batch: dict[str, Any], device: torch.device, *, channels_last: bool = False) -> dict[str, Any]:
    """Ultralytics' DetectionTrainer.preprocess_batch: tensors to the device, images to float in [0, 1] (in
    channels-last memory format if asked: the convolutions' activations follow their input's format)."""
    out = {k: v.to(device, non_blocking=device.type == "cuda") if isinstance(v, torch.Tensor) else v
           for k, v in batch.items()}
    out["img"] = out["img"].float() / 255
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


def split_batch(batch: dict[str, Any], micro: int) -> list[dict[str, Any]]:
    """Cut a collated batch into micro-batches of `micro` images, re-indexing the per-box batch_idx."""
    n = batch["img"].shape[0]
    if micro >= n:
        return [batch]
    parts = []
    for start in range(0, n, micro):
        stop = min(start + micro, n)
        boxes = (batch["batch_idx"] >= start) & (batch["batch_idx"] < stop)
        part = {}
        for k, v in batch.items():
            if k in ("batch_idx", "cls", "bboxes"):
                part[k] = v[boxes] - start if k == "batch_idx" else v[boxes]
            elif isinstance(v, torch.Tensor) and v.shape[:1] == (n,):
                part[k] = v[start:stop]
            elif isinstance(v, (list, tuple)) and len(v) == n:
                part[k] = v[start:stop]
            else:
                part[k] = v
        parts.append(part)
    return parts
