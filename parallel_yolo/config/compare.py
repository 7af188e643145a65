"""`parallel-yolo compare`'s schema."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .checks import at_least, check_checkpointing, optimizer_name, positive, size_bytes, suggest
from .names import OPTIMIZERS, PRECISIONS, STRATEGY_NAMES


@dataclass(kw_only=True, slots=True)
class CompareConfig:
    """What `parallel-yolo compare` accepts."""

    model: str = "yolov8x.yaml"
    strategies: str = "ddp,zero1,zero2,zero3,fsdp"
    """Comma-separated strategies, measured one after the other on the same synthetic batch."""
    nproc: int | None = None
    imgsz: int = 320
    batch: int = 4
    """Global batch of the measured steps; two more steps at twice the batch extrapolate the activation memory."""
    precision: str = "fp32"
    steps: int = 5
    """Measured optimizer steps per strategy (the first is a warm-up: not in the time or the bytes sent)."""
    optimizer: str = "SGD"
    """Any optimizer Ultralytics builds but `auto` (SGD, MuSGD, Adam, AdamW, ...): the formula's state follows it."""
    budget: str = "80GiB"
    """Memory per GPU (per process on CPU) for the largest-batch estimate and activation_checkpointing=auto: 80GiB,
    24GB, 512MiB ..."""
    channels_last: bool = False
    """Images, and so the activations, in channels-last memory format, as `train` does (see TrainConfig)."""
    sharded_init: bool = True
    """Under strategies that shard parameters (zero3, zero3_offload, fsdp, fsdp_grad_op, hsdp), build a yaml's model
    layer by layer, each rank keeping only its share of each layer as it is made, so that no rank holds the whole
    model (the values are the whole build's, bit for bit); false: every rank builds the whole model first."""
    gloo_collectives: bool | None = None
    """CPU runs (gloo): DeepSpeed's and FSDP's all-gathers, reduce-scatters and reduces as broadcasts and sends,
    which gloo runs faster (strategies/gloo.py); false: the libraries' own. No effect on GPUs (NCCL). None: on,
    unless the environment sets PARALLEL_YOLO_GLOO_COLLECTIVES=0."""
    compile: bool = False
    """torch.compile the model before the strategy wraps it (the first step, which compiles, is not timed)."""
    activation_checkpointing: str = "none"
    """Comma-separated activation_checkpointing values (see TrainConfig) each strategy is measured with, e.g.
    `none,all`: rows `zero3` and `zero3+all`."""
    device: str | None = None
    project: str = "runs/compare"
    name: str = "compare"
    exist_ok: bool = False
    timeout: float = 1800.0
    _part: bool = False
    """Internal: a group started by compare itself writes its strategy's rows for the parent to assemble."""

    def __post_init__(self) -> None:
        positive(self, "imgsz", "batch")
        at_least(self, 2, "steps")
        if self.nproc is not None and self.nproc < 1:
            raise ConfigError(f"nproc={self.nproc}: must be a positive integer; remove it for one process")
        for name in self.strategy_list:
            if name not in STRATEGY_NAMES:
                raise ConfigError(f"strategies: {name} is unknown{suggest(name, STRATEGY_NAMES)}; choose from "
                                  f"{', '.join(STRATEGY_NAMES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision}: unknown{suggest(self.precision, PRECISIONS)}; choose "
                              f"one of {', '.join(PRECISIONS)}")
        for mode in self.checkpointing_list:
            check_checkpointing(mode, compile=self.compile)
        self.optimizer = optimizer_name(self.optimizer, tuple(n for n in OPTIMIZERS if n != "auto"))
        self.budget_bytes  # noqa: B018  (validates)

    @property
    def budget_bytes(self) -> int:
        return size_bytes("budget", self.budget)

    @property
    def strategy_list(self) -> list[str]:
        return [s.strip() for s in str(self.strategies).split(",") if s.strip()]

    @property
    def checkpointing_list(self) -> list[str]:
        return [s.strip() for s in str(self.activation_checkpointing).split(",") if s.strip()] or ["none"]

    @property
    def runs(self) -> list[tuple[str, str, str]]:
        """(row label, strategy, activation_checkpointing) for every measurement, in order."""
        return [(name if mode == "none" else f"{name}+{mode}", name, mode)
                for name in self.strategy_list for mode in self.checkpointing_list]
