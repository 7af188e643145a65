"""Train from Python instead of the command line: the same typed config the CLI builds from key=value pairs.

    python examples/train_from_python.py            # one process
    torchrun --nproc_per_node 2 examples/train_from_python.py
"""

from parallel_yolo.config import TrainConfig
from parallel_yolo.trainer import train

if __name__ == "__main__":
    metrics = train(TrainConfig(model="yolov8n.yaml", data="demo", epochs=1, imgsz=64, batch=8, max_steps=3,
                                workers=0, project="runs/examples", name="python", exist_ok=True))
    if metrics is not None:  # rank 0
        print({k: round(v, 4) for k, v in metrics.items() if k.startswith("metrics/")})
