"""Typed run configuration: a recipe yaml (`cfg=FILE`) plus `key=value` overrides, validated up front.

Key names follow Ultralytics where one exists. Every mistake raises `ConfigError` with one line that names the
problem and the fix; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, Unanimous
from .urls import is_url, split_url

__all__ = ["ConfigError", "TrainConfig", "ValConfig", "ConsolidateConfig", "parse_overrides", "read_overrides", "build",
           "ULTRALYTICS_KEYS"]

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
}


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything `parallel-yolo train` accepts. `batch` is the GLOBAL batch over all processes."""

    model: str = "yolov8n.yaml"
    """An Ultralytics model yaml (yolov8n.yaml, yolo11x.yaml, yolov8x-p6.yaml, a local file) or a local .pt."""
    data: str = "demo"
    """An Ultralytics data yaml, or `demo` for the synthetic shapes dataset generated into a cache folder."""
    epochs: int = 100
    batch: int = 16
    """Global batch: images per iteration summed over all processes (batch=64 on 8 GPUs = 8 per GPU)."""
    micro_batch: int | None = None
    """Images per forward pass on one process; default batch/world_size. Smaller values accumulate gradients."""
    imgsz: int = 640
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
        _positive(self, "epochs", "batch", "imgsz")
        _at_least(self, 0, "workers", "close_mosaic", "ckpt_every", "warmup_epochs", "lr0", "lrf", "weight_decay")
        _at_least(self, 1, "keep_last", "prefetch_factor")
        _at_least(self, 0, "max_restarts", "upload_wait")
        if self.timeout < 10:
            raise ConfigError(f"timeout={self.timeout:g}: collectives need at least 10 seconds; e.g. timeout=600")
        _check_checkpointing(self.activation_checkpointing, compile=self.compile)
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
            raise ConfigError(f"strategy={self.strategy}: unknown{_suggest(self.strategy, STRATEGY_NAMES)}; "
                              f"choose one of {', '.join(STRATEGY_NAMES)}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision}: unknown{_suggest(self.precision, PRECISIONS)}; "
                              f"choose one of {', '.join(PRECISIONS)}")
        self.optimizer = _optimizer_name(self.optimizer, OPTIMIZERS)
        if isinstance(self.resume, str) and not _exists("resume", self.resume):
            raise ConfigError(f"resume={self.resume}: not found; pass resume=true (the newest run under "
                              f"project={self.project}), a run folder, a checkpoint folder such as "
                              "runs/detect/train/weights/last, or an s3:// copy of either")
        if self.upload is not None:  # its form here; credentials where the store is first used (preflight)
            split_url("upload", self.upload)
        if self.device is not None and self.device != "cpu" and not _is_cuda_spec(self.device):
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


@dataclass(kw_only=True, slots=True)
class ValConfig:
    """What `parallel-yolo val` accepts."""

    checkpoint: str
    """A checkpoint folder written by training, or a consolidated .pt."""
    data: str | None = None
    """Data yaml; default: the one the checkpoint was trained on."""
    imgsz: int | None = None
    batch: int = 16
    workers: int = 2
    device: str | None = None
    split: str = "val"
    conf: float | None = None
    iou: float = 0.7
    plots: bool = True
    """The validator's curves, confusion matrix and sample batches in the run folder."""
    nproc: int | None = None
    project: str = "runs/detect"
    name: str = "val"
    exist_ok: bool = False

    def __post_init__(self) -> None:
        _positive(self, "batch")
        if self.imgsz is not None:
            _positive(self, "imgsz")
        if not _exists("checkpoint", self.checkpoint):
            raise ConfigError(f"checkpoint={self.checkpoint}: not found; pass a run's weights/last or weights/best "
                              "folder (or its s3:// copy), or a consolidated .pt")


@dataclass(kw_only=True, slots=True)
class ConsolidateConfig:
    """What `parallel-yolo consolidate` accepts."""

    checkpoint: str
    """A checkpoint folder (weights/last, weights/best, checkpoints/step_N)."""
    out: str
    """X.pt (an Ultralytics checkpoint for YOLO(X).val/predict/export) or X.safetensors."""
    weights: str = "ema"
    """ema (what Ultralytics evaluates and exports) or model (the raw trained weights)."""

    def __post_init__(self) -> None:
        if not (_exists("checkpoint", self.checkpoint) if is_url(self.checkpoint) else Path(self.checkpoint).is_dir()):
            raise ConfigError(f"checkpoint={self.checkpoint}: not a checkpoint folder; pass a run's weights/last, "
                              "weights/best or checkpoints/step_N")


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
        _positive(self, "imgsz", "batch")
        _at_least(self, 2, "steps")
        if self.nproc is not None and self.nproc < 1:
            raise ConfigError(f"nproc={self.nproc}: must be a positive integer; remove it for one process")
        for name in self.strategy_list:
            if name not in STRATEGY_NAMES:
                raise ConfigError(f"strategies: {name} is unknown{_suggest(name, STRATEGY_NAMES)}; choose from "
                                  f"{', '.join(STRATEGY_NAMES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision}: unknown{_suggest(self.precision, PRECISIONS)}; choose "
                              f"one of {', '.join(PRECISIONS)}")
        for mode in self.checkpointing_list:
            _check_checkpointing(mode, compile=self.compile)
        self.optimizer = _optimizer_name(self.optimizer, tuple(n for n in OPTIMIZERS if n != "auto"))
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



def size_bytes(key: str, value: Any) -> int:
    """A memory size written as 80GiB, 24GB, 512MiB or a number of bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    try:
        return int(float(match[1]) * units[match[2].upper()])
    except (TypeError, KeyError, ValueError):
        raise ConfigError(f"{key}={value}: expected a size such as 80GiB, 24GB or 512MiB") from None


def parse_overrides(tokens: list[str], schema: type) -> Any:
    """Build `schema` from `key=value` tokens; `cfg=FILE` first loads a recipe yaml that the other tokens override."""
    return build(schema, read_overrides(tokens))


def read_overrides(tokens: list[str]) -> dict[str, Any]:
    """The keys set by `key=value` tokens and the `cfg=FILE` recipe they override, unvalidated."""
    pairs: dict[str, Any] = {}
    for token in tokens:
        if token.startswith("--local_rank") or token.startswith("--local-rank"):
            continue  # the deepspeed launcher appends this; LOCAL_RANK in the environment says the same
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"'{token}': arguments are key=value pairs, e.g. epochs=10")
        pairs[key.strip()] = _parse_value(raw)
    recipe = pairs.pop("cfg", None)
    return {**(_load_recipe(recipe) if recipe else {}), **pairs}


def build(schema: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)} - {"hyp"}
    kwargs: dict[str, Any] = {}
    hyp: dict[str, Any] = {}
    for key, value in values.items():
        if key in names:
            kwargs[key] = _check_type(key, value, hints[key])
        elif "hyp" in hints and key in ULTRALYTICS_KEYS:
            default = ULTRALYTICS_KEYS[key]
            hyp[key] = value if default is None else _check_type(key, value, type(default))
        else:
            raise ConfigError(_unknown_key(key, names | (set(ULTRALYTICS_KEYS) if "hyp" in hints else set())))
    if "hyp" in hints:
        kwargs["hyp"] = hyp
    missing = [f.name for f in dataclasses.fields(schema)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"missing {missing[0]}=...; e.g. {missing[0]}=runs/detect/train/weights/best")
    return schema(**kwargs)


def _parse_value(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, (dict, list)) else value


def _load_recipe(path: Any) -> dict[str, Any]:
    file = Path(str(path))
    if not file.is_file():
        raise ConfigError(f"cfg={path}: recipe file not found; pass a yaml such as configs/train/demo.yaml")
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cfg={path}: not valid yaml ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(content, dict):
        raise ConfigError(f"cfg={path}: must be a mapping of key: value lines")
    return {str(k): v for k, v in content.items()}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    wanted = " or ".join(_type_word(o) for o in options if o is not type(None))
    raise ConfigError(f"{key}={value!r}: expected {wanted}, e.g. {key}={_example(options)}")


_UnionType = type(int | None)


def _type_word(option: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(option, str(option))


def _example(options: tuple) -> str:
    for option, example in ((bool, "true"), (int, "10"), (float, "0.01"), (str, "value")):
        if option in options:
            return example
    return "value"


def _unknown_key(key: str, known: set[str]) -> str:
    from ultralytics.cfg import DEFAULT_CFG_DICT

    if key in DEFAULT_CFG_DICT:
        return (f"{key}: an Ultralytics key that parallel-yolo does not use (it would be silently ignored); "
                f"remove it")
    return f"{key}: unknown key{_suggest(key, known)}; see `parallel-yolo help` for the keys"


def _exists(key: str, path: str) -> bool:
    """A local path that exists, or a well-formed s3:// URL (read when it is used; checkpoint/remote.py)."""
    if is_url(path):
        split_url(key, path)
        return True
    return Path(path).exists()


def _check_checkpointing(mode: str, *, compile: bool) -> None:
    if mode not in CHECKPOINTING:
        raise ConfigError(f"activation_checkpointing={mode}: unknown{_suggest(mode, CHECKPOINTING)}; choose one of "
                          f"{', '.join(CHECKPOINTING)}")
    if compile and mode != "none":
        # measured: the compiled model's recompute in backward yields tensors whose metadata differ from the forward's,
        # and torch's checkpoint stops the run at the first backward
        raise ConfigError(f"activation_checkpointing={mode} cannot be combined with compile=true (torch's checkpoint "
                          "refuses the compiled recompute); drop one of them")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _positive(cfg: Any, *keys: str) -> None:
    _at_least(cfg, 1, *keys)


def _at_least(cfg: Any, low: float, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value < low:
            raise ConfigError(f"{key}={value}: must be >= {low}")


def _is_cuda_spec(device: str) -> bool:
    return device.startswith("cuda") or all(part.strip().isdigit() for part in device.split(","))


def _optimizer_name(name: str, choices: tuple[str, ...]) -> str:
    """`name` spelled as Ultralytics spells it (it accepts any case), or a one-line refusal naming the choices."""
    found = {choice.lower(): choice for choice in choices}.get(str(name).lower())
    if found is None:
        raise ConfigError(f"optimizer={name}: unknown{_suggest(str(name), choices)}; choose one of {', '.join(choices)}")
    return found
