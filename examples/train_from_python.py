"""Train from Python instead of the command line: the same typed config the CLI builds from key=value pairs, and
callbacks of your own on Ultralytics' events (as `YOLO.add_callback`; they run on rank 0).

    python examples/train_from_python.py            # one process
    torchrun --nproc_per_node 2 examples/train_from_python.py
"""

from parallel_yolo import add_callback
from parallel_yolo.config import TrainConfig
from parallel_yolo.engine.trainer import train


def report(trainer) -> None:
    """Called after every epoch's validation with Ultralytics' trainer attributes (metrics, lr, tloss, ...)."""
    print(f"epoch {trainer.epoch + 1}/{trainer.epochs}: mAP50 {trainer.metrics.get('metrics/mAP50(B)', 0):.4f}, "
          f"lr {trainer.lr['lr/pg0']:.6f}")


if __name__ == "__main__":
    add_callback("on_fit_epoch_end", report)
    metrics = train(TrainConfig(model="yolov8n.yaml", data="demo", epochs=1, imgsz=64, batch=8, max_steps=3,
                                workers=0, project="runs/examples", name="python", exist_ok=True))
    if metrics is not None:  # rank 0
        print({k: round(v, 4) for k, v in metrics.items() if k.startswith("metrics/")})
