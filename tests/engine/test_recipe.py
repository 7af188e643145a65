"""Recipe parity with Ultralytics' own trainer: param groups, warm-up, lr schedule, accumulation and EMA steps.

The reference values come from running ultralytics' DetectionTrainer on the same data and settings, never from
constants copied into the test.
"""

from __future__ import annotations

import copy

import pytest
from conftest import DETECT, NO_AUGMENT, THREE, check, read_csv, run_cli

SETTINGS = dict(model="yolov8n.yaml", epochs=3, imgsz=64, batch=8, fraction=0.125, workers=0, optimizer="SGD",
                nbs=32, warmup_epochs=2.0, lr0=0.02, lrf=0.1, momentum=0.9, weight_decay=0.001, seed=0)


@pytest.fixture(scope="module")
def ultralytics_run(tmp_path_factory):
    from ultralytics.models.yolo.detect import DetectionTrainer

    from parallel_yolo.data.demo import demo_dataset

    folder = tmp_path_factory.mktemp("ultralytics")
    overrides = {**SETTINGS, "data": str(demo_dataset()), "val": False, "plots": False, "device": "cpu",
                 "amp": False, "project": str(folder), "name": "ref", **_hyp(NO_AUGMENT)}
    trainer = DetectionTrainer(overrides=overrides)
    seen = []
    trainer.add_callback("on_train_batch_end", lambda t: seen.append(
        (copy.deepcopy([{k: g[k] for k in ("lr", "momentum")} for g in t.optimizer.param_groups]), t.accumulate)))
    trainer.train()
    return trainer, seen


def _hyp(tokens):
    return {k: float(v) for k, v in (t.split("=") for t in tokens)}


def test_param_groups_match(ultralytics_run):
    from parallel_yolo.config import TrainConfig
    from parallel_yolo.tasks import yolo

    trainer, _ = ultralytics_run
    cfg = TrainConfig(**{k: v for k, v in SETTINGS.items() if k != "nbs"}, hyp={"nbs": 32})
    accumulate, decay = yolo.nominal_accumulate(cfg, batches_per_epoch=4)
    assert (accumulate, decay) == (trainer.accumulate, trainer.optimizer.param_groups[0]["weight_decay"])
    hyp = yolo.hyp_namespace(cfg, DETECT)
    model = yolo.build_model("yolov8n.yaml", task=DETECT, data=THREE, hyp=hyp)
    ours = yolo.optimizer_factory(cfg, hyp, nc=3, dataset_size=32, weight_decay=decay)(model)
    theirs = trainer.optimizer
    assert type(ours) is type(theirs)
    for a, b in zip(ours.param_groups, theirs.param_groups, strict=True):
        assert (len(a["params"]), a["weight_decay"], a["param_group"], a["nesterov"]) == \
               (len(b["params"]), b["weight_decay"], b["param_group"], b["nesterov"])


def test_warmup_and_schedule_match_per_iteration(ultralytics_run):
    from parallel_yolo.engine.recipe import Schedule

    trainer, seen = ultralytics_run
    nb = len(trainer.train_loader)
    groups = [{"lr": SETTINGS["lr0"], "momentum": SETTINGS["momentum"], "param_group": g["param_group"]}
              for g in trainer.optimizer.param_groups]
    Schedule.remember_initial(groups)
    schedule = Schedule(epochs=3, lrf=SETTINGS["lrf"], cos_lr=False, warmup_epochs=2.0, warmup_bias_lr=0.1,
                        warmup_momentum=0.8, momentum=SETTINGS["momentum"], batches_per_epoch=nb,
                        accumulate=trainer.accumulate)
    ours = []
    for epoch in range(3):
        schedule.start_epoch(groups, epoch)
        for i in range(nb):
            accumulate = schedule.warmup(groups, i + nb * epoch, epoch)
            ours.append(([{k: g[k] for k in ("lr", "momentum")} for g in groups], accumulate))
    assert len(seen) == 3 * nb and schedule.warmup_iters > 0
    for (our_groups, our_acc), (their_groups, their_acc) in zip(ours, seen, strict=True):
        assert our_acc == their_acc
        for a, b in zip(our_groups, their_groups):
            assert a["lr"] == pytest.approx(b["lr"], rel=1e-12) and a["momentum"] == pytest.approx(b["momentum"])


@pytest.mark.slow
def test_trainer_end_to_end_lr_and_ema_steps_match(ultralytics_run, workdir):
    """Our trainer's per-epoch lr (results.csv) and optimizer steps (= EMA updates) equal Ultralytics'."""
    trainer, _ = ultralytics_run
    tokens = [f"{k}={v}" for k, v in SETTINGS.items()]
    check(run_cli("train", *tokens, "data=demo", *NO_AUGMENT, "val=false", "project=runs", "name=ours",
                  cwd=workdir))
    ours = read_csv(workdir / "runs" / "ours" / "results.csv")
    theirs = read_csv(trainer.save_dir / "results.csv")
    for a, b in zip(ours, theirs, strict=True):
        for col in ("lr/pg0", "lr/pg1", "lr/pg2"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-6), col
    assert len(read_csv(workdir / "runs" / "ours" / "steps.csv")) == trainer.ema.updates
