"""The demo dataset, the global-batch sampler and micro-batch splitting."""

from __future__ import annotations

import pytest
import torch
from conftest import demo_train_set

from parallel_yolo.data import loader as data


def _indices(sampler):
    return [index for _, index in sampler]


def test_sampler_ranks_partition_each_global_batch_like_micro_batches():
    size, batch = 37, 8
    single = _indices(data.GlobalBatchSampler(size, batch=batch, rank=0, world_size=1, shuffle=True, seed=5))
    ranks = [_indices(data.GlobalBatchSampler(size, batch=batch, rank=r, world_size=2, shuffle=True, seed=5))
             for r in range(2)]
    assert len(single) == 40 and all(len(r) == 20 for r in ranks)  # padded to whole global batches
    for k in range(5):
        chunk = single[k * batch:(k + 1) * batch]
        assert ranks[0][k * 4:(k + 1) * 4] == chunk[:4] and ranks[1][k * 4:(k + 1) * 4] == chunk[4:]
    assert set(single) == set(range(size))
    other_epoch = data.GlobalBatchSampler(size, batch=batch, rank=0, world_size=1, shuffle=True, seed=5)
    other_epoch.set_epoch(1)
    assert _indices(other_epoch) != single


def test_sampler_resumes_mid_epoch_with_the_same_samples_and_seeds():
    full = list(data.GlobalBatchSampler(37, batch=8, rank=1, world_size=2, shuffle=True, seed=5))
    resumed = data.GlobalBatchSampler(37, batch=8, rank=1, world_size=2, shuffle=True, seed=5)
    resumed.set_epoch(0, start_batch=3)
    assert list(resumed) == full[3 * 4:] and len(resumed) == 8
    seeds = [seed for seed, _ in full]
    assert len(set(seeds)) == len(seeds)  # every sample its own augmentation seed


def test_samples_are_augmented_the_same_whatever_was_loaded_before():
    samples = data.SeededSamples(demo_train_set())
    first = samples[(7, 3)]["img"]
    for key in ((1, 0), (2, 5), (3, 9)):
        samples[key]
    assert torch.equal(samples[(7, 3)]["img"], first)
    assert not torch.equal(samples[(8, 3)]["img"], first)  # another seed: another augmentation


def test_split_batch_reindexes_boxes():
    batch = {"img": torch.arange(4).view(4, 1, 1, 1).float(), "batch_idx": torch.tensor([0.0, 1.0, 3.0, 3.0]),
             "cls": torch.tensor([[0.0], [1.0], [2.0], [0.0]]), "bboxes": torch.rand(4, 4),
             "im_file": ["a", "b", "c", "d"], "resized_shape": [(64, 64)] * 4}
    first, second = data.split_batch(batch, 2, per_object=("batch_idx", "cls", "bboxes"))
    assert first["img"].flatten().tolist() == [0, 1] and second["img"].flatten().tolist() == [2, 3]
    assert first["batch_idx"].tolist() == [0, 1] and second["batch_idx"].tolist() == [1, 1]
    assert second["cls"].flatten().tolist() == [2, 0] and second["im_file"] == ["c", "d"]
    assert torch.equal(second["bboxes"], batch["bboxes"][2:])


def test_batches_do_not_depend_on_the_number_of_workers():
    dataset = demo_train_set()
    batches = {}
    for workers in (0, 2):
        loader = data.train_loader(dataset, batch=8, rank=1, world_size=2, workers=workers, seed=3,
                                   device=torch.device("cpu"))
        batches[workers] = [batch["img"] for _, batch in zip(range(3), loader)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))


def test_channels_last_images_keep_their_values():
    batch = {"img": torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), "cls": torch.zeros(1, 1)}
    plain = data.preprocess(batch, torch.device("cpu"))
    nhwc = data.preprocess(batch, torch.device("cpu"), channels_last=True)
    assert nhwc["img"].is_contiguous(memory_format=torch.channels_last) and not plain["img"].is_contiguous(
        memory_format=torch.channels_last)
    assert torch.equal(plain["img"], nhwc["img"])


@pytest.mark.slow
def test_persistent_workers_see_close_mosaic(tmp_path):
    """Workers live for the run; when close_mosaic changes the pipeline they are started anew, so a run with workers
    logs exactly the losses of a run that loads in the main process (augmentations are seeded per sample)."""
    from conftest import TINY, check, read_csv, run_cli

    logged = {}
    for workers in (0, 1):
        check(run_cli("train", *TINY, f"workers={workers}", "epochs=2", "close_mosaic=1", "batch=8", "nbs=8",
                      "fraction=0.1", "val=false", f"project={tmp_path}", f"name=w{workers}", cwd=tmp_path))
        logged[workers] = [(r["epoch"], r["loss"]) for r in read_csv(tmp_path / f"w{workers}" / "steps.csv")]
    assert {epoch for epoch, _ in logged[0]} == {"1", "2"}
    assert logged[0] == logged[1]
