"""The vocabulary of the configuration: strategy, precision, activation-checkpointing and optimizer names, and
the Ultralytics hyper-parameters passed through unchanged (tests/config/test_config.py checks them against
Ultralytics' own)."""

from __future__ import annotations

STRATEGY_NAMES = ("single", "ddp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp", "fsdp_grad_op", "hsdp")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
CHECKPOINTING = ("none", "backbone", "all", "auto")
"""activation_checkpointing's values (parallel_yolo/engine/recompute.py): none; backbone: the layers the model yaml lists
under `backbone`; all: every layer with parameters; auto: the least recompute whose forecast fits `budget`."""
# what Ultralytics' build_optimizer accepts (any case), spelled as it spells them; `auto`: MuSGD past 10,000 iterations,
# else AdamW (tests/config/test_config.py checks the list against Ultralytics')
OPTIMIZERS = ("SGD", "MuSGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "auto")

# Ultralytics keys that reach the dataset pipeline, the loss or the validator unchanged. Any other Ultralytics key
# is refused by name rather than silently ignored.
ULTRALYTICS_KEYS = {
    "cache": False, "single_cls": False, "rect": False, "classes": None, "split": "val",
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
    "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "bgr": 0.0, "mosaic": 1.0, "mixup": 0.0, "cutmix": 0.0,
    "copy_paste": 0.0, "copy_paste_mode": "flip", "auto_augment": "randaugment", "erasing": 0.4,
    "box": 7.5, "cls": 0.5, "dfl": 1.5, "nbs": 64, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1,
    "conf": None, "iou": 0.7, "max_det": 300, "save_json": False, "verbose": True,
    # the other tasks' losses, masks and head (tasks/task.py)
    "overlap_mask": True, "mask_ratio": 4, "pose": 12.0, "kobj": 1.0, "rle": 1.0, "angle": 1.0, "dlog": 1.0,
    "dgrad": 0.5, "dlam": 1.0, "dropout": 0.0,
}
