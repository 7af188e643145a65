"""Ultralytics' callbacks fired from our loop: the events in Ultralytics' order with what its integrations read, the
TensorBoard and MLflow integrations switched on through Ultralytics' own settings (read back with the real libraries
and checked against results.csv and steps.csv), per-step system metrics, and the plots."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, check, read_csv

from parallel_yolo.config import ConfigError, TrainConfig
from parallel_yolo.engine import callbacks


def test_add_callback_refuses_what_is_not_a_training_event():
    with pytest.raises(ConfigError, match="on_train_epoch_end"):
        callbacks.add_callback("on_train_epoch_ends", print)
    with pytest.raises(ConfigError, match="not callable"):
        callbacks.add_callback("on_train_end", "print")


def test_events_come_in_ultralytics_order_with_what_integrations_read(tmp_path):
    from parallel_yolo.engine.trainer import train

    seen: list[tuple[str, dict]] = []

    def recorder(event):
        def record(trainer):
            state = {"epoch": trainer.epoch}
            if event == "on_train_epoch_end":
                state.update(tloss=trainer.label_loss_items(trainer.tloss, prefix="train"), lr=trainer.lr)
            if event == "on_fit_epoch_end":
                state.update(metrics=dict(trainer.metrics), fitness=trainer.fitness, save_dir=trainer.save_dir,
                             name=trainer.args.name, keys=trainer.validator.metrics.keys)
            if event == "optimizer_step":
                state.update(step=trainer.step, system=dict(trainer.step_metrics))
            seen.append((event, state))
        return record

    from parallel_yolo._ultralytics_internals import trainer_events

    for event in trainer_events():
        callbacks.add_callback(event, recorder(event))
    try:
        train(TrainConfig(model="yolov8n.yaml", data="demo", imgsz=64, epochs=2, batch=8, hyp={"nbs": 8}, fraction=0.09,
                          workers=0, plots=False, project=str(tmp_path), name="run"))
    finally:
        callbacks.clear_callbacks()
    events = [e for e, _ in seen if e not in ("on_train_batch_start", "on_train_batch_end", "optimizer_step")]
    epoch = ["on_train_epoch_start", "on_train_epoch_end", "on_model_save", "on_fit_epoch_end"]
    assert events == ["on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_start", *epoch, *epoch,
                      "on_train_end", "teardown"], events
    steps = read_csv(tmp_path / "run" / "steps.csv")
    fired = [s for e, s in seen if e == "optimizer_step"]
    assert [s["step"] for s in fired] == [int(r["step"]) for r in steps]
    for state, row in zip(fired, steps):
        assert set(state["system"]) == {"images_per_s", "step_s", "data_s", "peak_mib", "peak_mib_rank0"}
        assert state["system"]["peak_mib_rank0"] == pytest.approx(float(row["peak_mib_rank0"]))
        assert state["system"]["peak_mib"] > 100  # a process that trains a model holds more than that
    results = read_csv(tmp_path / "run" / "results.csv")
    for (_, state), row in zip([x for x in seen if x[0] == "on_train_epoch_end"], results):
        assert state["tloss"] == {k: pytest.approx(float(row[k]), abs=1e-5) for k in state["tloss"]}
        assert state["lr"] == {k: pytest.approx(float(row[k])) for k in state["lr"]}
    for (_, state), row in zip([x for x in seen if x[0] == "on_fit_epoch_end"], results):
        assert state["save_dir"] == tmp_path / "run" and state["name"] == "run"
        assert set(state["keys"]) <= set(state["metrics"]) and "fitness" not in state["metrics"]
        assert state["metrics"]["metrics/mAP50(B)"] == pytest.approx(float(row["metrics/mAP50(B)"]))


def _without_pytest_markers() -> dict[str, str]:
    """The environment a user's shell gives: Ultralytics switches its integrations off under pytest and CI."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "GITHUB_WORKFLOW", "RUNNER_OS", "CI")}


@pytest.mark.slow
def test_tensorboard_and_mlflow_from_ultralytics_settings_under_fsdp(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**_without_pytest_markers(), "YOLO_CONFIG_DIR": str(tmp_path / "config"),
           "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}
    yolo = shutil.which("yolo", path=str(Path(sys.executable).parent)) or "yolo"
    check(subprocess.run([yolo, "settings", "tensorboard=True", "mlflow=True"], env=env, capture_output=True,
                         text=True, cwd=tmp_path))
    result = check(subprocess.run(
        [sys.executable, "-m", "parallel_yolo", "train", *TINY, "plots=true", "epochs=2", "batch=8", "nbs=8",
         "fraction=0.09", "strategy=fsdp", "nproc=2", f"project={tmp_path}", "name=run"],
        env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600))
    assert "model graph not logged" in result.stdout + result.stderr
    run = tmp_path / "run"
    results, steps = read_csv(run / "results.csv"), read_csv(run / "steps.csv")
    assert len(results) == 2 and len(steps) >= 2

    events = EventAccumulator(str(run))
    events.Reload()
    os.environ.update(MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"], MLFLOW_ALLOW_FILE_STORE="true")
    try:
        client = MlflowClient(env["MLFLOW_TRACKING_URI"])
        (experiment,) = [e for e in client.search_experiments() if e.name == str(tmp_path)]
        (mlrun,) = client.search_runs([experiment.experiment_id])
        history = {}

        def mlflow_values(key):
            if key not in history:
                history[key] = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
            return history[key]

        per_epoch = [k for k in results[0] if k.startswith(("train/", "metrics/", "val/", "lr/"))]
        assert len(per_epoch) == 13  # 3 train losses, 4 metrics, 3 val losses, 3 lr
        for key in per_epoch:
            board = {e.step: e.value for e in events.Scalars(key)}
            flow = mlflow_values(key.replace("(", "").replace(")", ""))
            for epoch, row in enumerate(results):  # TensorBoard counts epochs from 1, MLflow from 0 (Ultralytics')
                assert board[epoch + 1] == pytest.approx(float(row[key]), abs=1e-5), key
                assert flow[epoch] == pytest.approx(float(row[key]), abs=1e-5), key
        for key in ("images_per_s", "step_s", "data_s", "peak_mib", "peak_mib_rank0", "peak_mib_rank1"):
            board = {e.step: e.value for e in events.Scalars(f"sys/{key}")}
            flow = mlflow_values(f"sys/{key}")
            expected = {int(r["step"]): float(r[key]) for r in steps}
            assert board == pytest.approx(expected, rel=1e-5) and flow == pytest.approx(expected, rel=1e-5), key
        assert mlrun.info.status == "FINISHED" and mlrun.data.params["name"] == "run"
    finally:
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
            os.environ.pop(key, None)
    # the plots, drawn with a local font
    for name in ("results.png", "labels.jpg", "train_batch0.jpg", "confusion_matrix.png", "BoxPR_curve.png",
                 "val_batch0_pred.jpg"):
        assert (run / name).stat().st_size > 1000, name


def test_the_font_is_local():
    from ultralytics.utils import plotting

    from parallel_yolo._ultralytics_internals import use_local_font

    use_local_font()
    font = Path(plotting.check_font("Arial.Unicode.ttf"))
    assert font.is_file() and font.suffix == ".ttf"


def test_sharded_runs_do_not_log_the_model_graph(tmp_path):
    """TensorBoard's graph callback traces the whole model: dropped where the parameters are sharded."""
    from parallel_yolo import _ultralytics_internals as ul

    def graph(trainer):
        pass

    graph.__module__ = "ultralytics.utils.callbacks.tensorboard"
    kept = [print]
    table = {"on_train_start": [print, graph]}
    assert ul.drop_model_graph(table) and table["on_train_start"] == kept
    assert not ul.drop_model_graph(table)


def test_integrations_never_send_to_ultralytics():
    from parallel_yolo import _ultralytics_internals as ul

    class FakeTrainer:
        pass

    table = ul.integration_callbacks(FakeTrainer())
    modules = {getattr(f, "__module__", "") for fs in table.values() for f in fs}
    assert not modules & {"ultralytics.utils.events", "ultralytics.utils.callbacks.platform"}, modules


def test_system_metrics_go_nowhere_where_the_integrations_did_not_start():
    """Under pytest and CI Ultralytics' TensorBoard module has no writer at all, and MLflow opened no run: the
    per-step logger passes (the suite's README run found it raising in every training with tensorboard=True)."""
    from types import SimpleNamespace

    import ultralytics.utils.callbacks.mlflow  # noqa: F401
    import ultralytics.utils.callbacks.tensorboard  # noqa: F401

    from parallel_yolo import _ultralytics_internals as ul

    (log_step,) = ul.system_metric_loggers()["optimizer_step"]
    log_step(SimpleNamespace(step=1, step_metrics={"images_per_s": 1.0, "peak_mib_rank0": 2.0}))
