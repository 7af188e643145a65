"""The demo datasets, one per Ultralytics task, generated locally (nothing is downloaded): `data=demo` is the demo of
the model's task, `data=demo-seg` (and -pose, -obb, -cls, -sem, -depth) names one.

Every image holds 1-3 filled shapes (squares, circles, triangles) on a noisy background, drawn from a seeded
generator, and each task's labels are those shapes in the task's own format: boxes (detect), polygons (segment),
triangles' three corners as keypoints with a left/right flip (pose), rotated rectangles (obb), one shape per image
in a folder per class (classify), per-pixel class masks (semantic) and metric depth maps (depth). Generation is
deterministic and atomic (written to a temporary folder, then renamed), so concurrent ranks never see half a dataset.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["DEMO_CLASSES", "DEMOS", "demo_dataset", "demo_task", "cache_dir"]

DEMO_CLASSES = {0: "square", 1: "circle", 2: "triangle"}
DEMO_VERSION = 1
DEMOS = {"detect": "demo", "segment": "demo-seg", "pose": "demo-pose", "obb": "demo-obb", "classify": "demo-cls",
         "semantic": "demo-sem", "depth": "demo-depth"}
"""Each task's demo, by Ultralytics' task name."""


def cache_dir() -> Path:
    return Path(os.environ.get("PARALLEL_YOLO_CACHE", Path.home() / ".cache" / "parallel_yolo"))


def demo_task(spec: str) -> str | None:
    """The task whose demo `spec` names (None: not a demo name)."""
    return next((task for task, name in DEMOS.items() if name == spec), None)


def demo_dataset(task: str = "detect", *, n_train: int = 256, n_val: int = 64, size: int = 160, seed: int = 0) -> Path:
    """Generate (once) `task`'s demo and return its data yaml (classify: its folder, as Ultralytics takes it)."""
    tag = "" if task == "detect" else f"-{task}"  # the detection demo keeps its folder name from before the tasks
    key = hashlib.sha1(f"{DEMO_VERSION}-{n_train}-{n_val}-{size}-{seed}".encode()).hexdigest()[:10]
    root = cache_dir() / f"demo{tag}-{key}"
    done = root / "data.yaml"
    if not done.is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
        rng = np.random.default_rng(seed)
        for split, count in (("train", n_train), ("val", n_val)):
            for i in range(count):
                _WRITERS[task](tmp, split, f"{i:05d}", rng, size)
        (tmp / "data.yaml").write_text(f"path: {root}\n" + _YAML[task])
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return root if task == "classify" else done


_NAMES = "names:\n" + "".join(f"  {k}: {v}\n" for k, v in DEMO_CLASSES.items())
_YAML = {
    "detect": f"train: images/train\nval: images/val\n{_NAMES}",
    "segment": f"train: images/train\nval: images/val\n{_NAMES}",
    "obb": "train: images/train\nval: images/val\nnames:\n  0: square\n  1: bar\n  2: triangle\n",
    "pose": "train: images/train\nval: images/val\nkpt_shape: [3, 3]\nflip_idx: [0, 2, 1]\n"
            "kpt_names:\n  0: [apex, left, right]\nnames:\n  0: triangle\n",
    "classify": f"# a folder per class under train/ and val/ (Ultralytics' classification layout)\n{_NAMES}",
    "semantic": "train: images/train\nval: images/val\nmasks_dir: masks\nnames:\n  0: background\n  1: square\n"
                "  2: circle\n  3: triangle\n",
    "depth": "train: images/train\nval: images/val\nnc: 1\nnames:\n  0: depth\ndepth_scale: 1000\nmax_depth: 10\n",
}


def _write(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def _write_labels(root: Path, split: str, stem: str, rows: list[str]) -> None:
    path = root / "labels" / split / f"{stem}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(row + "\n" for row in rows))


def _numbers(values) -> str:
    return " ".join(f"{float(v):.6f}" for v in values)


def _shapes(rng: np.random.Generator, size: int, count: int | None = None
            ) -> tuple[np.ndarray, list[tuple[int, np.ndarray, tuple[int, ...]]]]:
    """A noisy image and its shapes: (class, outline polygon in pixels, colour) each."""
    import cv2

    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    shapes = []
    for _ in range(rng.integers(1, 4) if count is None else count):
        cls = int(rng.integers(0, 3))
        side = int(rng.integers(size // 6, size // 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        if cls == 0:
            cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), color, -1)
            outline = np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)
        elif cls == 1:
            cv2.circle(image, (x0 + side // 2, y0 + side // 2), side // 2, color, -1)
            angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
            outline = np.stack([x0 + side / 2 + side / 2 * np.cos(angles), y0 + side / 2 + side / 2 * np.sin(angles)], 1)
        else:
            points = np.array([[x0 + side // 2, y0], [x0, y0 + side - 1], [x0 + side - 1, y0 + side - 1]])
            cv2.fillPoly(image, [points.astype(np.int32)], color)
            outline = np.array([[x0 + side / 2, y0], [x0, y0 + side], [x0 + side, y0 + side]], float)
        shapes.append((cls, outline, color))
    return image, shapes


def _detect(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    image, shapes = _shapes(rng, size)
    _write(root / "images" / split / f"{stem}.png", image)
    rows = []
    for cls, outline, _ in shapes:
        (x0, y0), (x1, y1) = outline.min(0), outline.max(0)
        rows.append(f"{cls} {_numbers([(x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size])}")
    _write_labels(root, split, stem, rows)


def _segment(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    image, shapes = _shapes(rng, size)
    _write(root / "images" / split / f"{stem}.png", image)
    _write_labels(root, split, stem, [f"{cls} {_numbers((outline / size).clip(0, 1).ravel())}"
                                      for cls, outline, _ in shapes])


def _obb(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    """Rotated squares, bars (3:1) and triangles; labels: the four corners of each one's rotated rectangle."""
    import cv2

    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    rows = []
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(0, 3))
        long = float(rng.integers(size // 5, size // 3))
        short = long / 3 if cls == 1 else long
        centre = rng.uniform(long / 2 + 1, size - long / 2 - 1, 2)
        angle = float(rng.uniform(0, 180))
        corners = cv2.boxPoints(((float(centre[0]), float(centre[1])), (long, short), angle))
        color = tuple(int(c) for c in rng.integers(120, 256, 3))
        if cls == 2:  # a triangle filling its rectangle: two corners and the middle of the opposite side
            triangle = np.array([corners[0], corners[1], (corners[2] + corners[3]) / 2])
            cv2.fillPoly(image, [triangle.round().astype(np.int32)], color)
        else:
            cv2.fillPoly(image, [corners.round().astype(np.int32)], color)
        rows.append(f"{cls} {_numbers((corners / size).clip(0, 1).ravel())}")
    _write(root / "images" / split / f"{stem}.png", image)
    _write_labels(root, split, stem, rows)


def _pose(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    """Triangles; keypoints apex, left and right base corners (left and right swap when the image flips)."""
    import cv2

    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    rows = []
    for _ in range(rng.integers(1, 4)):
        width, height = (float(v) for v in rng.integers(size // 5, size // 3, 2))
        x0, y0 = rng.uniform(1, size - width - 1), rng.uniform(1, size - height - 1)
        apex = (x0 + rng.uniform(0.2, 0.8) * width, y0)
        corners = np.array([apex, (x0, y0 + height), (x0 + width, y0 + height)])
        cv2.fillPoly(image, [corners.round().astype(np.int32)], tuple(int(c) for c in rng.integers(120, 256, 3)))
        box = [(x0 + width / 2) / size, (y0 + height / 2) / size, width / size, height / size]
        points = [value for x, y in corners / size for value in (x, y, 2.0)]
        rows.append(f"0 {_numbers(box)} {_numbers(points)}")
    _write(root / "images" / split / f"{stem}.png", image)
    _write_labels(root, split, stem, rows)


def _classify(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    image, shapes = _shapes(rng, size // 2, count=1)
    _write(root / split / DEMO_CLASSES[shapes[0][0]] / f"{stem}.png", image)


def _semantic(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    """Masks of class ids (0 background, 1 + the shape's class), drawn as the image is."""
    import cv2

    image, shapes = _shapes(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for cls, outline, _ in shapes:
        cv2.fillPoly(mask, [outline.round().astype(np.int32)], cls + 1)
    _write(root / "images" / split / f"{stem}.png", image)
    _write(root / "masks" / split / f"{stem}.png", mask)


def _depth(root: Path, split: str, stem: str, rng: np.random.Generator, size: int) -> None:
    """A floor receding from 2 m (bottom) to 8 m (top), shapes standing at 1-4 m, brighter the nearer: uint16 PNG
    depth in millimetres (depth_scale 1000)."""
    import cv2

    image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    rows = np.linspace(8.0, 2.0, size, dtype=np.float32)[:, None]
    depth = np.repeat(rows, size, 1)
    image[..., 1] = np.clip(image[..., 1] + (60 * (8.0 - depth) / 6.0), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(1, 4)):
        side = int(rng.integers(size // 6, size // 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        metres = float(rng.uniform(1.0, 4.0))
        shade = int(255 - 30 * (metres - 1.0))
        cv2.rectangle(image, (x0, y0), (x0 + side - 1, y0 + side - 1), (shade, shade, shade), -1)
        depth[y0:y0 + side, x0:x0 + side] = metres
    _write(root / "images" / split / f"{stem}.png", image)
    _write(root / "depth" / split / f"{stem}.png", (depth * 1000).round().astype(np.uint16))


_WRITERS: dict[str, Callable] = {"detect": _detect, "segment": _segment, "obb": _obb, "pose": _pose,
                                 "classify": _classify, "semantic": _semantic, "depth": _depth}
