"""The training loop. It reads top to bottom: set up, then epochs of iterations, validation and saving.

Every backend question (wrapping, precision, gradient sync, the optimizer step, collectives) goes to the
strategy, so this file is the same for every strategy and launcher.
"""

from __future__ import annotations

import time
from copy import copy
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint
from ..checkpoint import remote, rng
from ..checkpoint import state as ckpt_state
from ..config import ConfigError, TrainConfig, Unanimous
from ..data import loader as datamod
from ..launch import dist
from ..launch.heartbeat import progress
from ..monitor import memory
from ..monitor.runlog import RunLog
from ..strategies import REGISTRY, select
from ..tasks import yolo
from . import callbacks
from .build import build_train_state, make_strategy, run_task
from .recipe import Schedule
from .step import forward_backward, micro_batches
from .validate import Evaluator

__all__ = ["train", "preflight"]


def preflight(cfg: TrainConfig, *, world_size: int) -> tuple[str, str]:
    """Every check that needs no process group, run on every rank (and before a self-launch), so that a mistake
    stops all ranks with the same one-line error instead of leaving some waiting in a collective."""
    env = dist.read_env()
    device = dist.pick_device(env, cfg.device)
    choice = select(strategy=cfg.strategy, precision=cfg.precision, sync_bn=cfg.sync_bn, env=env,
                    world_size=world_size, cuda=device.type == "cuda")
    cfg.per_rank_batch(world_size)
    task = run_task(cfg, strategy=(choice[0], "params" in REGISTRY[choice[0]].sharded))
    datamod.resolve_dataset(cfg.data, task.name)
    if cfg.upload:  # boto3 and credentials, before any process starts (the config checked the URL's form)
        remote.check_url("upload", cfg.upload)
    return choice


def train(cfg: TrainConfig, *, launch_record: Path | None = None) -> dict[str, Any] | None:
    """Run training; returns the final validation metrics on rank 0 (None elsewhere). `launch_record`: the file in
    which to note the run folder for a restarted group (resume.launch_record)."""
    env = dist.read_env()
    try:
        name, precision = preflight(cfg, world_size=env.world_size)
    except ConfigError as e:  # the same inputs on every rank: the same mistake
        raise Unanimous(str(e)) from None
    device = dist.pick_device(env, cfg.device)
    if cfg.activation_checkpointing == "auto":
        memory.load_meta_kernels()  # its forecast runs on the meta device: code, not the run's memory
    with dist.process_group(env, device, timeout_s=cfg.timeout):
        strategy = make_strategy(name, precision, env=env, device=device, sync_bn=cfg.sync_bn,
                                 gloo_collectives=cfg.gloo_collectives, sharded_init=cfg.sharded_init)
        metrics = Trainer(cfg, strategy, launch_record=launch_record).fit()
        del strategy  # the wrapped model holds the group: free it while every rank is still connected
    return metrics


class Trainer:
    def __init__(self, cfg: TrainConfig, strategy, *, launch_record: Path | None = None):
        self.cfg, self.strategy, self.device = cfg, strategy, strategy.device
        self._seed()
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else self.device.type == "cuda"
        self.task = run_task(cfg)
        self.data = datamod.resolve_dataset(cfg.data, self.task.name)
        self.local_batch, self.micro = cfg.per_rank_batch(strategy.world_size)
        # verified when `resume=` was resolved; read once here, loaded in _resume
        self.manifest = checkpoint.load_manifest(Path(cfg.resume), verify=False) if cfg.resume else None
        # a resumed run rebuilds the architecture its checkpoint holds, as data: a .pt its manifest names is not loaded
        state = build_train_state(cfg, strategy, spec=self.manifest["model_yaml"] if self.manifest else cfg.model,
                                  task=self.task, data=self.data, images=self.micro, sizing=self._build_loaders)
        self.model, self.criterion, self.ema = state.model, state.criterion, state.ema
        self.hyp, self.imgsz = state.hyp, state.imgsz
        if state.recomputed or state.forecast:
            self._say(f"activation checkpointing: {len(state.recomputed)} of {len(strategy.raw_model.model)} layers "
                      f"recompute their activations in backward ({cfg.activation_checkpointing}"
                      f"{': ' + state.forecast if state.forecast else ''})")
        self._schedule()
        self.step, self.best_fitness, self.loss_names = 0, None, yolo.loss_names(self.criterion, self.task)
        self.per_object = self.task.batch_keys(self.hyp)
        self.time_in_steps, self.time_waiting = 0.0, 0.0  # seconds between optimizer steps; of them, waiting for data
        self.position, self.last_opt = (0, 0), -1  # (epoch, batch) the next iteration runs; last stepping iteration
        folder = self._resume() if cfg.resume else None
        self._snapshot_buffers()
        self._outputs(self._run_folder(folder, launch_record))

    def _seed(self) -> None:
        from ultralytics.utils.torch_utils import init_seeds

        init_seeds(self.cfg.seed, self.cfg.deterministic)
        # cuDNN tries the convolution algorithms once per shape and keeps the fastest, unless results must repeat
        torch.backends.cudnn.benchmark = not self.cfg.deterministic

    def _schedule(self) -> None:
        cfg = self.cfg
        self.groups = self.strategy.param_groups()
        Schedule.remember_initial(self.groups)
        self.schedule = Schedule(epochs=cfg.epochs, lrf=cfg.lrf, cos_lr=cfg.cos_lr, warmup_epochs=cfg.warmup_epochs,
                                 warmup_bias_lr=self.hyp.warmup_bias_lr, warmup_momentum=self.hyp.warmup_momentum,
                                 momentum=cfg.momentum, batches_per_epoch=self.batches_per_epoch,
                                 accumulate=self.accumulate)

    def _run_folder(self, resumed: Path | None, launch_record: Path | None) -> Path:
        """The resumed run's folder, or a new one named on rank 0; noted for a restarted group."""
        strategy = self.strategy
        folder = strategy.broadcast_object(
            resumed or RunLog.new_folder(self.cfg.project, self.cfg.name, self.cfg.exist_ok) if strategy.is_main
            else None)
        if launch_record is not None and strategy.is_main:
            launch_record.parent.mkdir(parents=True, exist_ok=True)
            launch_record.write_text(str(Path(folder).resolve()))
        return folder

    def _outputs(self, folder: Path) -> None:
        """The run log, the store mirror, args.yaml, the evaluator and Ultralytics' callbacks, in `folder`."""
        cfg, strategy = self.cfg, self.strategy
        self.log = RunLog(folder, writer=strategy.is_main)
        self.log.rewind(step=self.step, epochs=self.position[0])  # rows a resumed-from run logged past its checkpoint
        self.mirror = remote.mirror(cfg.upload, run=folder, keep_last=cfg.keep_last, active=strategy.is_main)
        self.log.write_args({**cfg.to_dict(), "strategy": strategy.name, "precision": strategy.precision.name,
                             "world_size": strategy.world_size, "imgsz": self.imgsz})
        self.evaluator = Evaluator(self.task, strategy.raw_model, loader=self.val_loader, data=self.data, hyp=self.hyp,
                                   save_dir=folder, device=self.device, world_size=strategy.world_size)
        self.hooks = callbacks.Hooks(self, save_dir=folder, active=strategy.is_main, plots=cfg.plots,
                                     sharded_params="params" in strategy.sharded)

    def _resume(self) -> Path | None:
        """Load the checkpoint `resume=` resolved to (each rank reads only its ranges); returns the run folder (None:
        a new one)."""
        from .resume import run_folder_of

        folder, manifest = Path(self.cfg.resume), self.manifest
        optimizer = type(self.strategy.inner_optimizer()).__name__
        if manifest["optimizer"] != optimizer:
            raise checkpoint.CheckpointError(f"{folder} was trained with {manifest['optimizer']}, this run builds "
                                             f"{optimizer}; resume with optimizer={manifest['train_args']['optimizer']}")
        start = time.time()
        ckpt_state.load(folder, manifest, strategy=self.strategy, ema=self.ema)
        loaded = max(self.strategy.gather_object(time.time() - start))
        self.step, self.best_fitness, self.last_opt = manifest["step"], manifest["best_fitness"], manifest["last_opt"]
        self.position, self.ema.updates = (manifest["epoch"], manifest["batch"]), manifest["ema_updates"]
        self.strategy.skipped_steps = manifest["skipped_steps"]
        if manifest["scaler"]:
            self.strategy.scaler.load_state_dict(manifest["scaler"])
        if manifest["world_size"] == self.strategy.world_size:
            rng.restore(manifest["ranks"][self.strategy.rank]["rng"])
        for _ in range(manifest["epoch"]):
            if hasattr(self.criterion, "update"):
                self.criterion.update()  # end-to-end heads decay their one-to-many weight once per epoch
        self._say(f"resumed from {folder}: {manifest['strategy']} x{manifest['world_size']} at step {self.step}, "
                  f"epoch {manifest['epoch'] + 1} batch {manifest['batch']} (loaded in {loaded:.2f}s, slowest rank)")
        if remote.is_fetched(folder):  # a copy fetched from the store: the run goes on in a new run folder
            return None
        return run_folder_of(folder) or folder.parent

    def _build_loaders(self, hyp, imgsz: int, stride: int) -> tuple[int, float]:
        """The loaders (the image size checked against the model's stride); returns the training set's size and the
        weight decay the optimizer is made with (build_train_state's `sizing`)."""
        cfg, strategy = self.cfg, self.strategy
        self.workers = dist.loader_workers(cfg.workers, strategy.env)
        train_set = _on_main_first(strategy, lambda: datamod.build_dataset(
            hyp, self.data, "train", batch=self.local_batch, stride=stride, mode="train"))
        # as Ultralytics: twice the training batch per validation pass, the same for the tasks with large labels
        val_batch = self.local_batch * (1 if self.task.name in ("obb", "semantic", "depth") else 2)
        val_set = _on_main_first(strategy, lambda: datamod.build_dataset(
            hyp, self.data, "val", batch=val_batch, stride=stride, mode="val", rect=True))
        self.train_loader = self._train_loader(train_set)
        self.val_loader = datamod.val_loader(val_set, batch=val_batch, workers=self.workers,
                                             distributed=strategy.distributed, device=self.device)
        self.batches_per_epoch = self.train_loader.sampler.batches()
        self.accumulate, weight_decay = yolo.nominal_accumulate(cfg, self.batches_per_epoch)
        return len(train_set), weight_decay

    def _train_loader(self, dataset):
        return datamod.train_loader(dataset, batch=self.cfg.batch, rank=self.strategy.rank,
                                    world_size=self.strategy.world_size, workers=self.workers, seed=self.cfg.seed,
                                    device=self.device, prefetch_factor=self.cfg.prefetch_factor)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any] | None:
        """Train; the callbacks' `teardown` runs however it ends."""
        finished = False
        try:
            metrics = self._fit()
            finished = True
            return metrics
        finally:
            # the queued uploads first (after a failure too: the last good checkpoints are what a restart needs)
            self.mirror.close(self.cfg.upload_wait if finished else min(self.cfg.upload_wait, 60.0))
            self.hooks.fire("teardown")

    def _fit(self) -> dict[str, Any] | None:
        cfg, strategy, hooks = self.cfg, self.strategy, self.hooks
        self._say(f"{strategy.name} x{strategy.world_size} on {self.device.type}, {strategy.precision.name}, "
                  f"batch {cfg.batch} ({self.local_batch}/process, micro-batch {self.micro}), imgsz {self.imgsz}, "
                  f"accumulate {self.accumulate}, run folder {self.log.folder}")
        hooks.fire("on_pretrain_routine_start")
        hooks.fire("on_pretrain_routine_end")
        hooks.plot_labels()
        hooks.fire("on_train_start", epoch=self.position[0])
        metrics, stop, start = None, False, time.time()
        first_epoch, first_batch = self.position
        for epoch in range(first_epoch, cfg.epochs):
            self.schedule.start_epoch(self.groups, epoch)
            self.model.train()
            close_at = max(cfg.epochs - cfg.close_mosaic, 0)
            if cfg.close_mosaic and (epoch == close_at or epoch == first_epoch > close_at):
                self.train_loader.dataset.close_mosaic(hyp=copy(self.hyp))
                # persistent workers hold a copy of the dataset made when they started: new workers see the change
                self.train_loader = self._train_loader(self.train_loader.dataset.dataset)
            self.train_loader.sampler.set_epoch(epoch, start_batch=first_batch if epoch == first_epoch else 0)
            hooks.fire("on_train_epoch_start", epoch=epoch)
            epoch_start = time.time()
            epoch_loss, stop = self._train_epoch(epoch)
            if hasattr(self.criterion, "update"):
                self.criterion.update()
            hooks.fire("on_train_epoch_end", tloss=epoch_loss, epoch_time=time.time() - epoch_start)
            self.ema.update_attr()
            final = stop or epoch + 1 == cfg.epochs
            metrics = self._validate(final=final) if cfg.val or final else None
            self._end_epoch(epoch, epoch_loss, metrics, time.time() - start, done=not stop and epoch + 1 == cfg.epochs)
            hooks.fire("on_fit_epoch_end", metrics={k: v for k, v in (metrics or {}).items() if k != "fitness"},
                       fitness=(metrics or {}).get("fitness"), stop=final, epoch_time=time.time() - epoch_start)
            if final:
                break
        hooks.plot_results()
        hooks.fire("on_train_end")
        memory.write_report(self.strategy, self.ema, self.log.folder / "memory.json")
        self._say(f"done in {time.time() - start:.1f}s: " + _summary(metrics))
        self._say(datamod.wait_report(self.strategy.gather_object((self.time_waiting, self.time_in_steps)),
                                      workers=self.workers))
        return metrics

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], bool]:
        """One epoch of iterations. Losses stay on the device: the step's one host synchronisation (in
        strategy.step) brings the window's mean over ranks, this rank's running means and the grad norm together."""
        from ultralytics.utils import TQDM

        strategy, nb, first = self.strategy, self.batches_per_epoch, self.train_loader.sampler.start
        sums, window, seen = self._zeros(), self._zeros(), 0
        loader = datamod.Timed(self.train_loader)
        tick, mark = time.time(), 0.0
        bar = TQDM(loader, total=nb, initial=first, disable=not strategy.is_main, desc=f"{epoch + 1}/{self.cfg.epochs}")
        for i, batch in enumerate(bar, start=first):
            ni = i + nb * epoch
            progress(f"epoch {epoch + 1} iteration {i + 1}/{nb}, after step {self.step}")
            accumulate = self.schedule.warmup(self.groups, ni, epoch)
            stepping = ni - self.last_opt >= accumulate
            self.hooks.fire("on_train_batch_start")
            if ni < 3:  # Ultralytics plots the run's first three batches
                self.hooks.plot_batch(batch, ni)
            parts = micro_batches(batch, micro=self.micro, device=self.device, per_object=self.per_object,
                                  channels_last=self.channels_last)
            items, names = forward_backward(self.strategy, self.criterion, parts, sync=stepping,
                                            mean_loss=self.task.mean_loss)
            self.loss_names = names or self.loss_names
            sums, window, seen = sums + items, window + items, seen + 1
            if not stepping:
                self.hooks.fire("on_train_batch_end")
                continue
            iterations = ni - self.last_opt
            peaks = memory.rank_peaks(self.device, rank=strategy.rank, world_size=strategy.world_size)
            mean = strategy.all_reduce(torch.cat([window / iterations, peaks]), mean=True)
            norm, stepped, values = strategy.step(torch.cat([mean, sums / seen]))
            n = len(window)
            losses, peak_mib, shown = values[:n], values[n:n + strategy.world_size], values[n + strategy.world_size:]
            if not stepped:
                self._say(f"step {self.step + 1}: non-finite gradient norm ({norm}); optimizer step skipped")
            self.ema.update()  # as Ultralytics: the EMA follows even a skipped step
            self._snapshot_buffers()
            self.step, self.last_opt, window = self.step + 1, ni, self._zeros()
            self.position = (epoch + 1, 0) if i + 1 == nb else (epoch, i + 1)
            elapsed, tick, waited, mark = time.time() - tick, time.time(), loader.waited - mark, loader.waited
            self.time_in_steps, self.time_waiting = self.time_in_steps + elapsed, self.time_waiting + waited
            if strategy.is_main:
                bar.set_postfix(**{k: f"{v:.3f}" for k, v in zip(self.loss_names, shown)})
            system = {"images_per_s": iterations * self.cfg.batch / max(elapsed, 1e-9), "step_s": elapsed,
                      "data_s": waited, "peak_mib": max(peak_mib),
                      **{f"peak_mib_rank{r}": round(p, 1) for r, p in enumerate(peak_mib)}}
            self.log.step({"step": self.step, "epoch": epoch + 1, "loss": sum(losses), "lr": self.groups[0]["lr"],
                           "grad_norm": norm, **system, **dict(zip(self.loss_names, losses))}, losses=self.loss_names)
            self.hooks.fire("optimizer_step", step_metrics=system, tloss=dict(zip(self.loss_names, shown)))
            self.hooks.fire("on_train_batch_end")
            if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0:
                self._save(self.log.folder / "checkpoints" / f"step_{self.step}", fitness=None)
                if strategy.is_main:
                    checkpoint.rotate(self.log.folder / "checkpoints", keep=self.cfg.keep_last)
            if self.cfg.max_steps and self.step >= self.cfg.max_steps:
                return dict(zip(self.loss_names, (sums / seen).tolist())), True
        return dict(zip(self.loss_names, (sums / max(seen, 1)).tolist())), False

    def _zeros(self) -> torch.Tensor:
        return torch.zeros(len(self.loss_names), device=self.device)

    # ---- validation, logging, saving ---------------------------------------------------------------------------
    def _validate(self, *, final: bool) -> dict[str, Any] | None:
        progress(f"validation after step {self.step}")
        metrics = self.evaluator(self.ema.full_model(), self.loss_names, final=final)
        return self.strategy.broadcast_object(metrics)

    def _end_epoch(self, epoch: int, losses: dict[str, float], metrics: dict | None, elapsed: float, *,
                   done: bool) -> None:
        fitness = (metrics or {}).get("fitness")
        improved = fitness is not None and (self.best_fitness is None or fitness > self.best_fitness)
        self.best_fitness = fitness if improved else self.best_fitness
        # Ultralytics' results.csv columns, blank in epochs that were not validated
        shown = {k: (metrics or {}).get(k, "") for k in self.evaluator.metric_keys(self.loss_names)}
        self.log.epoch({"epoch": epoch + 1, "time": round(elapsed, 3),
                        **{f"train/{k}": v for k, v in losses.items()}, **shown,
                        **{f"lr/pg{i}": g["lr"] for i, g in enumerate(self.groups)}})
        weights = self.log.folder / "weights"
        self._save(weights / "last", fitness=fitness, done=done)
        if improved:  # the same state: linked, not written again
            ckpt_state.save_copy(weights / "last", weights / "best", strategy=self.strategy)
            self.mirror.add(weights / "best")
        self.hooks.fire("on_model_save", epoch=epoch)

    def _snapshot_buffers(self) -> None:
        """BatchNorm buffers as of the last optimizer step. A checkpoint holds the state at that step and resumes at
        the iteration after it, re-running iterations whose gradients were still being accumulated (Ultralytics
        carries them across epoch ends); their forward passes must not count twice in the running statistics."""
        self.step_buffers = {k: b.detach().clone() for k, b in self.strategy.raw_model.named_buffers()}

    def _save(self, folder: Path, *, fitness: float | None, done: bool = False) -> None:
        """A sharded checkpoint of the whole training state, every rank writing its own part (a collective)."""
        strategy, model = self.strategy, self.strategy.raw_model
        epoch, batch, start = *self.position, time.time()
        progress(f"saving {folder.name} at step {self.step}")
        ckpt_state.save(folder, strategy=strategy, ema=self.ema, buffers=self.step_buffers,
                        rank_meta={"rng": rng.capture()}, meta={"done": done,
            "strategy": strategy.name, "precision": strategy.precision.name, "world_size": strategy.world_size,
            "micro_batch": self.micro, "step": self.step, "epoch": epoch, "batch": batch, "last_opt": self.last_opt,
            "fitness": fitness, "best_fitness": self.best_fitness, "ema_updates": self.ema.updates,
            "skipped_steps": strategy.skipped_steps, "scaler": strategy.scaler.state_dict(),
            "optimizer": type(strategy.inner_optimizer()).__name__, "loss_names": list(self.loss_names),
            "model_yaml": model.yaml, "task": self.task.name, "nc": self.data["nc"], "names": self.data["names"],
            "kpt_shape": self.data.get("kpt_shape"), "imgsz": self.imgsz,
            "train_args": self.cfg.to_dict()})
        self._say(f"saved {folder} in {time.time() - start:.2f}s")
        self.mirror.add(folder)

    def _say(self, message: str) -> None:
        if self.strategy.is_main:
            print(message, flush=True)


def _on_main_first(strategy, build):
    """Build on rank 0 first (it writes caches: the demo images, Ultralytics' label cache), then the others. A
    mistake rank 0 finds (an empty folder, corrupt labels) stops every rank with its message, none left waiting."""
    result, error = None, None
    if strategy.is_main:
        try:
            result = build()
        except ConfigError as e:
            error = str(e)
    error = strategy.broadcast_object(error)  # also the barrier the others wait in
    if error:
        raise Unanimous(error)
    return result if strategy.is_main else build()


def _summary(metrics: dict | None) -> str:
    if not metrics:
        return "no validation"
    return ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in metrics.items() if k.startswith("metrics/"))
