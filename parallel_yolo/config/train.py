"""`parallel-yolo train`'s schema."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..urls import split_url
from .checks import at_least, check_checkpointing, exists, is_cuda_spec, optimizer_name, positive, size_bytes, suggest
from .names import OPTIMIZERS, PRECISIONS, STRATEGY_NAMES, ULTRALYTICS_KEYS


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything `parallel-yolo train` accepts. `batch` is the GLOBAL batch over all processes."""

    model: str = "yolov8n.yaml"
    """An Ultralytics model yaml (yolov8n.yaml, yolo11x-seg.yaml, yolov8x-p6.yaml, a local file) or a local .pt. The
    task follows the model, as in Ultralytics: detect, segment, pose, obb, classify, semantic or depth."""
    data: str = "demo"
    """An Ultralytics data yaml (classification: a folder of class folders), or `demo`: the synthetic shapes data of
    the model's task, generated into a cache folder (demo-seg, demo-pose, demo-obb, demo-cls, demo-sem, demo-depth
    name one)."""
    epochs: int = 100
    batch: int = 16
    """Global batch: images per iteration summed over all processes (batch=64 on 8 GPUs = 8 per GPU)."""
    micro_batch: int | None = None
    """Images per forward pass on one process; default batch/world_size. Smaller values accumulate gradients."""
    imgsz: int | None = None
    """Training and validation image size; None: 640, or 224 for classification, as Ultralytics."""
    workers: int = 8
    """Dataloader workers per process, at most the CPU cores divided by the local processes (as Ultralytics)."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead (Ultralytics' training loader uses 4)."""
    channels_last: bool | None = None
    """Images, and so the activations, in channels-last memory format (faster convolutions on tensor cores).
    None: on for CUDA, off on CPU, as Ultralytics does."""
    compile: bool = False
    """torch.compile the model before the strategy wraps it (the first steps compile)."""
    activation_checkpointing: str = "none"
    """Keep only each chosen layer's input through the forward pass and recompute the rest in backward: less
    activation memory for more compute. none, backbone (the model yaml's backbone layers), all (every layer with
    parameters) or auto (the fewest operations recomputed whose forecast peak fits `budget`). BatchNorm's running
    statistics and the random generators end exactly as without it."""
    budget: str | None = None
    """Memory per GPU (per process on CPU) that activation_checkpointing=auto plans for: 80GiB, 24GB, 512MiB ..."""
    device: str | None = None
    """None picks CUDA when present, else CPU; `cpu` forces CPU and gloo."""
    optimizer: str = "auto"
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    cos_lr: bool = False
    close_mosaic: int = 10
    seed: int = 0
    deterministic: bool = True
    project: str = "runs/detect"
    name: str = "train"
    exist_ok: bool = False
    resume: bool | str = False
    """true: continue the newest run under `project`; a run or checkpoint folder: continue that one. The run's
    settings are reused; keys given now override them (another strategy, nproc or precision reshards)."""
    fraction: float = 1.0
    val: bool = True
    """Validate every epoch; the final epoch is always validated."""
    plots: bool = True
    """Ultralytics' plots: train_batch*.jpg and labels.jpg at the start, the validator's curves, confusion matrix
    and sample batches in the final epoch, results.png from results.csv at the end (a local font: nothing is
    downloaded)."""
    upload: str | None = None
    """s3://bucket/prefix: mirror every checkpoint this run commits (weights/last, weights/best, checkpoints/step_N)
    there in the background, the manifest last, keep_last applied there too. Endpoint and credentials the standard
    AWS way: AWS_ENDPOINT_URL (MinIO, Ceph ...), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws."""
    upload_wait: float = 600.0
    """At the end of training, seconds to wait for uploads still pending (the store unreachable); then the run
    ends with a warning naming what was not mirrored (the local checkpoints are complete)."""
    strategy: str | None = None
    """single, ddp, zero1, zero2, zero3, zero3_offload, fsdp, fsdp_grad_op, hsdp; default from the launcher."""
    precision: str | None = None
    """fp32, bf16-mixed or fp16-mixed; default from the launcher (accelerate's mixed_precision), else bf16-mixed on
    GPUs that support it (fp16-mixed on older ones, where the strategy can scale the loss), fp32 on CPU."""
    nproc: int | None = None
    """Start this many local processes when not already under a launcher."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (then validate and save as at the end of training)."""
    ckpt_every: int = 0
    """Also save a checkpoint every N optimizer steps (0: only at epoch ends)."""
    keep_last: int = 3
    sync_bn: bool = False
    sharded_init: bool = True
    """Under strategies that shard parameters (zero3, zero3_offload, fsdp, fsdp_grad_op, hsdp), build a yaml's model
    layer by layer, each rank keeping only its share of each layer as it is made, so that no rank holds the whole
    model (the values are the whole build's, bit for bit); false: every rank builds the whole model first."""
    gloo_collectives: bool | None = None
    """CPU runs (gloo): DeepSpeed's and FSDP's all-gathers, reduce-scatters and reduces as broadcasts and sends,
    which gloo runs faster (strategies/gloo.py); false: the libraries' own. No effect on GPUs (NCCL). None: on,
    unless the environment sets PARALLEL_YOLO_GLOO_COLLECTIVES=0."""
    max_restarts: int = 0
    """With nproc=N: restart all N processes up to this many times after one fails; the restarted group resumes
    from the newest checkpoint this launch wrote. Under torchrun or accelerate launch use their --max-restarts."""
    timeout: float = 1800.0
    """Seconds a collective may wait for a peer before the run stops and names the rank that stopped answering.
    Rank 0 alone builds the dataset caches while the others wait, so keep it above that on a large dataset."""
    hyp: dict[str, Any] = field(default_factory=dict)
    """Ultralytics hyper-parameters from ULTRALYTICS_KEYS that were set explicitly."""

    def __post_init__(self) -> None:
        positive(self, "epochs", "batch", *(("imgsz",) if self.imgsz is not None else ()))
        at_least(self, 0, "workers", "close_mosaic", "ckpt_every", "warmup_epochs", "lr0", "lrf", "weight_decay")
        at_least(self, 1, "keep_last", "prefetch_factor")
        at_least(self, 0, "max_restarts", "upload_wait")
        if self.timeout < 10:
            raise ConfigError(f"timeout={self.timeout:g}: collectives need at least 10 seconds; e.g. timeout=600")
        check_checkpointing(self.activation_checkpointing, compile=self.compile)
        if self.activation_checkpointing == "auto" and self.budget is None:
            raise ConfigError("activation_checkpointing=auto plans for a memory budget: add budget=, the memory of one "
                              "GPU (e.g. budget=80GiB), or choose none, backbone or all")
        self.budget_bytes  # noqa: B018  (validates)
        for key in ("micro_batch", "nproc", "max_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}={value}: must be a positive integer; remove it to use the default")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"fraction={self.fraction}: must be in (0, 1], e.g. fraction=0.1 for a tenth of the data")
        if self.strategy is not None and self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"strategy={self.strategy}: unknown{suggest(self.strategy, STRATEGY_NAMES)}; "
                              f"choose one of {', '.join(STRATEGY_NAMES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision}: unknown{suggest(self.precision, PRECISIONS)}; "
                              f"choose one of {', '.join(PRECISIONS)}")
        self.optimizer = optimizer_name(self.optimizer, OPTIMIZERS)
        if isinstance(self.resume, str) and not exists("resume", self.resume):
            raise ConfigError(f"resume={self.resume}: not found; pass resume=true (the newest run under "
                              f"project={self.project}), a run folder, a checkpoint folder such as "
                              "runs/detect/train/weights/last, or an s3:// copy of either")
        if self.upload is not None:  # its form here; credentials where the store is first used (preflight)
            split_url("upload", self.upload)
        if self.device is not None and self.device != "cpu" and not is_cuda_spec(self.device):
            raise ConfigError(f"device={self.device}: use device=cpu, or leave it out to use CUDA when present")

    @property
    def hyp_value(self) -> dict[str, Any]:
        """All Ultralytics hyper-parameters: their defaults overridden by what the user set."""
        return {**ULTRALYTICS_KEYS, **self.hyp}

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget is None else size_bytes("budget", self.budget)

    def per_rank_batch(self, world_size: int) -> tuple[int, int]:
        """(images per process per iteration, images per forward pass); refuses a batch that does not split."""
        if self.batch % world_size:
            lower, upper = self.batch // world_size * world_size, -(-self.batch // world_size) * world_size
            fix = f"batch={upper}" if lower == 0 else f"batch={lower} or batch={upper}"
            raise ConfigError(f"batch={self.batch} is not divisible by the {world_size} processes; use {fix}")
        local = self.batch // world_size
        micro = self.micro_batch or local
        if local % micro:
            raise ConfigError(f"micro_batch={micro} does not divide the {local} images each process gets per "
                              f"iteration (batch={self.batch} over {world_size} processes); pick a divisor of {local}")
        return local, micro

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "hyp"}
        return {**out, **self.hyp_value}
