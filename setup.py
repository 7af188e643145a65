from setuptools import find_packages, setup

S3 = ["boto3>=1.34"]
TENSORBOARD = ["tensorboard>=2.14"]
MLFLOW = ["mlflow-skinny>=2.10"]
DOCS = ["mkdocs>=1.6", "mkdocs-material>=9.5"]

setup(
    name="parallel_yolo",
    version="0.1.0",
    description="Train Ultralytics YOLO detectors with DDP, DeepSpeed ZeRO and FSDP2 behind one strategy layer",
    python_requires=">=3.10",
    packages=find_packages(include=["parallel_yolo", "parallel_yolo.*"]) + ["parallel_yolo.presets"],
    # The strategy presets live in the top-level strategies/ folder (what a user edits) and ship as package
    # data, so `strategy=zero3` resolves after a plain `pip install` too.
    package_dir={"parallel_yolo.presets": "strategies"},
    package_data={"parallel_yolo.presets": ["*.yaml"]},
    # The ranges the suite was run against (torch 2.14.1, deepspeed 0.19.8, accelerate 1.15.0, ultralytics 8.4.190;
    # torch 2.11 is the GPU image's). The project touches private parts of torch, DeepSpeed and Ultralytics, which a
    # release may move: widen a range only after the suite passed on the new version (README, Tests).
    install_requires=[
        "torch>=2.11,<2.15",
        "deepspeed>=0.19.8,<0.20",
        "accelerate>=1.15,<2",
        "ultralytics>=8.4.190,<8.5",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "rich>=13",  # `parallel-yolo compare` prints its table with it
    ],
    # What the code asks users to install, by feature (each import is gated where it is used, with a one-line hint):
    # s3: upload=s3://... and resume= / val / consolidate from s3:// (AWS S3, MinIO ...); tensorboard and mlflow:
    # Ultralytics' logger integrations (`yolo settings tensorboard=True`); docs: the mkdocs site of docs/.
    # test: moto's real S3-compatible server on 127.0.0.1, onnx for the export test, the loggers read back, the docs
    # built in strict mode, `build` for the wheel and sdist test.
    extras_require={
        "s3": S3,
        "tensorboard": TENSORBOARD,
        "mlflow": MLFLOW,
        "docs": DOCS,
        "test": ["pytest>=8", "onnx", "moto[server]>=5", "build>=1", *S3, *TENSORBOARD, *MLFLOW, *DOCS],
    },
    entry_points={"console_scripts": ["parallel-yolo=parallel_yolo.cli:run"]},
)
