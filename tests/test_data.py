"""The demo dataset, the global-batch sampler and micro-batch splitting."""

from __future__ import annotations

import torch

from parallel_yolo import data


def test_demo_dataset_is_deterministic_and_valid(tmp_path, monkeypatch):
    trees = []
    for sub in ("a", "b"):
        monkeypatch.setenv("PARALLEL_YOLO_CACHE", str(tmp_path / sub))
        yaml_file = data.demo_dataset(n_train=8, n_val=4, size=64, seed=3)
        trees.append({p.relative_to(yaml_file.parent): p.read_bytes()
                      for p in sorted(yaml_file.parent.rglob("*")) if p.is_file() and p.name != "data.yaml"})
    assert trees[0] == trees[1] and len(trees[0]) == 2 * (8 + 4)
    for name, content in trees[0].items():
        if name.suffix == ".txt":
            for line in content.decode().splitlines():
                cls, *box = line.split()
                assert int(cls) in data.DEMO_CLASSES and all(0.0 < float(v) <= 1.0 for v in box)
    parsed = data.resolve_dataset(str(yaml_file))
    assert parsed["nc"] == 3 and parsed["names"] == data.DEMO_CLASSES


def test_sampler_ranks_partition_each_global_batch_like_micro_batches():
    size, batch = 37, 8
    single = list(data.GlobalBatchSampler(size, batch=batch, rank=0, world_size=1, shuffle=True, seed=5))
    ranks = [list(data.GlobalBatchSampler(size, batch=batch, rank=r, world_size=2, shuffle=True, seed=5))
             for r in range(2)]
    assert len(single) == 40 and all(len(r) == 20 for r in ranks)  # padded to whole global batches
    for k in range(5):
        chunk = single[k * batch:(k + 1) * batch]
        assert ranks[0][k * 4:(k + 1) * 4] == chunk[:4] and ranks[1][k * 4:(k + 1) * 4] == chunk[4:]
    assert set(single) == set(range(size))
    other_epoch = data.GlobalBatchSampler(size, batch=batch, rank=0, world_size=1, shuffle=True, seed=5)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != single


def test_split_batch_reindexes_boxes():
    batch = {"img": torch.arange(4).view(4, 1, 1, 1).float(), "batch_idx": torch.tensor([0.0, 1.0, 3.0, 3.0]),
             "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0]]), "bboxes": torch.rand(4, 4),
             "im_file": ["a", "b", "c", "d"], "resized_shape": [(64, 64)] * 4}
    first, second = data.split_batch(batch, 2)
    assert first["img"].flatten().tolist() == [0, 1] and second["img"].flatten().tolist() == [2, 3]
    assert first["batch_idx"].tolist() == [0, 1] and second["batch_idx"].tolist() == [1, 1]
    assert second["cls"].flatten().tolist() == [2, 0] and second["im_file"] == ["c", "d"]
    assert torch.equal(second["bboxes"], batch["bboxes"][2:])
