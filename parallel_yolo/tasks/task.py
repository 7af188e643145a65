"""Ultralytics' tasks, each with what its trainer sets up: the model class, the validator, the trainer whose plots
and label names the run reuses, the heads that serve it, how its batches split and how its loss is reduced.

The tasks are read from `ultralytics.cfg.TASKS`: one this table lacks (a task a later Ultralytics adds) is refused by
name before anything starts, never trained as detection. The task follows the model, as in Ultralytics: its last
layer's head (guess_model_task) for a yaml or a checkpoint's model description.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError

__all__ = ["Task", "TASKS", "task_named", "task_of_layers", "served_tasks", "refuse_sharded_params"]

PER_OBJECT = ("batch_idx", "cls", "bboxes", "keypoints")
"""The keys of a collated YOLODataset batch that hold a row per object (with batch_idx naming its image)."""


@dataclass(frozen=True)
class Task:
    name: str
    """Ultralytics' name of the task (ultralytics.cfg.TASKS)."""
    model: str
    """Its model class in ultralytics.nn.tasks."""
    package: str
    """Its folder under ultralytics.models.yolo (the trainer and validator live there)."""
    trainer: str
    validator: str
    heads: tuple[str, ...]
    """The last layers (module names in a model yaml) this version trains for the task."""
    example: str
    """A model yaml of the task, for messages and the docs."""
    per_object: tuple[str, ...] = PER_OBJECT
    """The batch keys with a row per object (cut by batch_idx when a batch is split into micro-batches)."""
    losses: tuple[str, ...] = ()
    """The names of the loss items, where the loss object does not carry them (its `loss_names`)."""
    mean_loss: bool = False
    """The loss is a mean over the images of a forward pass (classification), not Ultralytics' per-image sum."""
    default_imgsz: int = 640

    def model_class(self) -> type:
        from ultralytics.nn import tasks

        return getattr(tasks, self.model)

    def _in_package(self, name: str) -> Any:
        return getattr(importlib.import_module(f"ultralytics.models.yolo.{self.package}"), name)

    def validator_class(self) -> type:
        return self._in_package(self.validator)

    def trainer_class(self) -> type:
        return self._in_package(self.trainer)

    def batch_keys(self, hyp: Any) -> tuple[str, ...]:
        """The per-object keys of this run's batches: instance masks are per object when overlap_mask is off."""
        if self.name == "segment" and not getattr(hyp, "overlap_mask", True):
            return (*self.per_object, "masks")
        return self.per_object


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("detect", "DetectionModel", "detect", "DetectionTrainer", "DetectionValidator", ("Detect", "v10Detect"),
         "yolov8n.yaml"),
    Task("segment", "SegmentationModel", "segment", "SegmentationTrainer", "SegmentationValidator",
         ("Segment", "Segment26"), "yolov8n-seg.yaml"),
    Task("pose", "PoseModel", "pose", "PoseTrainer", "PoseValidator", ("Pose", "Pose26"), "yolov8n-pose.yaml"),
    Task("obb", "OBBModel", "obb", "OBBTrainer", "OBBValidator", ("OBB", "OBB26"), "yolov8n-obb.yaml"),
    Task("classify", "ClassificationModel", "classify", "ClassificationTrainer", "ClassificationValidator",
         ("Classify",), "yolov8n-cls.yaml", per_object=(), losses=("loss",), mean_loss=True, default_imgsz=224),
    Task("semantic", "SemanticSegmentationModel", "semantic", "SemanticSegmentationTrainer",
         "SemanticSegmentationValidator", ("SemanticSegment",), "yolo26n-sem.yaml",
         losses=("ce_loss", "dice_loss", "aux_loss")),
    Task("depth", "DepthModel", "depth", "DepthTrainer", "DepthValidator", ("Depth",), "yolo26n-depth.yaml"),
)}

# last layers of Ultralytics models this version does not train, and why
_OTHER_HEADS = {
    "RTDETRDecoder": "RT-DETR's decoder, which trains with a loss of its own (Hungarian matching and denoising "
                     "queries) that this version does not cover",
    "WorldDetect": "YOLO-World's open-vocabulary head, which trains on text embeddings (grounding data)",
    "YOLOEDetect": "YOLOE's prompt-conditioned head, which trains on text or visual prompts",
    "YOLOESegment": "YOLOE's prompt-conditioned head, which trains on text or visual prompts",
    "YOLOESegment26": "YOLOE's prompt-conditioned head, which trains on text or visual prompts",
}


def served_tasks() -> tuple[str, ...]:
    """Ultralytics' tasks, in its order; each must be in TASKS (tests/tasks/test_task.py checks it)."""
    from ultralytics.cfg import TASKS as ULTRALYTICS_TASKS

    return tuple(ULTRALYTICS_TASKS)


def task_named(name: str) -> Task:
    if name not in TASKS:
        known = ", ".join(served_tasks())
        raise ConfigError(f"task '{name}': Ultralytics' tasks are {known}, and this version of parallel_yolo serves "
                          f"{', '.join(t for t in served_tasks() if t in TASKS)}")
    return TASKS[name]


def task_of_layers(layers: dict, source: str) -> Task:
    """The task of a model description (a parsed model yaml), from its last layer as Ultralytics guesses it; a head
    this version does not train is refused with the reason."""
    from ultralytics.nn.tasks import guess_model_task

    head = str((layers.get("head") or [[None, None, "?"]])[-1][2])
    if head in _OTHER_HEADS:
        raise ConfigError(f"{source}: its last layer is {head}, {_OTHER_HEADS[head]}; pass a YOLO model yaml of a "
                          f"task ({', '.join(t.example for t in TASKS.values())})")
    name = guess_model_task(layers)
    if name is None or name not in served_tasks():
        raise ConfigError(f"{source}: its last layer is {head}, the head of no Ultralytics task; pass a YOLO model "
                          "yaml such as yolov8n.yaml or yolov8n-seg.yaml")
    task = task_named(name)
    if head not in task.heads:
        raise ConfigError(f"{source}: its last layer is {head}, a {name} head this version does not train (it trains "
                          f"{', '.join(task.heads)})")
    return task


# heads whose loss runs modules of the model outside its forward pass: under a strategy that shards parameters the
# loss would meet shards (FSDP: DTensors; ZeRO-3: empty partitions), and only ranks whose batch has objects run them,
# so the gathers would not match across ranks
_LOSS_RUNS_MODEL = {
    "Pose26": "its RLE keypoint loss (PoseLoss26) runs the head's flow model (RealNVP) outside the forward pass, "
              "where a parameter-sharding strategy holds only shards of it, and only on ranks whose batch has objects",
}


def refuse_sharded_params(layers: dict, source: str, strategy: str) -> None:
    """Refuse a model whose loss runs parts of the model outside its forward under a strategy that shards parameters
    (`strategy`), naming the strategies that serve it."""
    head = str((layers.get("head") or [[None, None, "?"]])[-1][2])
    if head in _LOSS_RUNS_MODEL:
        raise ConfigError(f"{source} under strategy={strategy}: {_LOSS_RUNS_MODEL[head]}; train it with ddp, zero1 or "
                          "zero2 (parameters whole on every rank), or a YOLOv8 / YOLO11 pose model under any strategy")
