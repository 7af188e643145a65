"""`parallel-yolo compare`: the accounting matches the ZeRO formula, the outputs agree, and the communication
counter counts a known collective exactly."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from conftest import check, free_port, run_cli

from parallel_yolo.monitor import memory
from parallel_yolo.monitor.comm import CommCounter, ring_bytes


@pytest.mark.slow
def test_compare_two_strategies(tmp_path):
    result = check(run_cli("compare", "model=yolov8n.yaml", "strategies=ddp,fsdp", "nproc=2", "imgsz=64", "batch=4",
                           "steps=3", "optimizer=AdamW", "budget=2GiB", "activation_checkpointing=none,all",
                           "project=runs", cwd=tmp_path))
    folder = tmp_path / "runs" / "compare"
    report = json.loads((folder / "compare.json").read_text())
    assert "ddp" in result.stdout and "fsdp" in result.stdout and (folder / "compare.png").stat().st_size > 10_000
    with open(folder / "compare.csv") as f:
        table = list(csv.DictReader(f))
    labels = ["ddp", "ddp+all", "fsdp", "fsdp+all"]  # each strategy without and with activation checkpointing
    assert [row["strategy"] for row in table] == labels == [s["strategy"] for s in report["summary"]]
    for row, summary in zip(table, report["summary"]):
        assert float(row["states_MiB"]) == pytest.approx(summary["states_MiB"])
        assert float(row["peak_MiB"]) == pytest.approx(summary["peak_MiB"])
    for entry in report["ranks"]:
        assert len(entry["ranks"]) == 2
        for rank in entry["ranks"]:
            # every category within 2% of the formula (AdamW: two states per parameter)
            for category in memory.CATEGORIES:
                held, theory = rank["states"][category], rank["formula"][category]
                assert abs(held - theory) <= 0.02 * theory + 1024, (entry["strategy"], category, held, theory)
            assert rank["formula"]["optimizer_state"] == 2 * rank["formula"]["params"]
            assert rank["peak_bytes"] > sum(rank["states"].values())
            # bytes sent: DDP all-reduces every gradient, FSDP sends 1.5x (two gathers and a reduce-scatter)
            assert abs(rank["sent_bytes_per_step"] - rank["sent_theory_bytes"]) <= 0.02 * rank["sent_theory_bytes"]
    ddp, ddp_all, fsdp, fsdp_all = report["summary"]
    for plain, recomputed in ((ddp, ddp_all), (fsdp, fsdp_all)):  # recompute changes activations, not states
        assert 0 < recomputed["forecast_activations_MiB"] < plain["forecast_activations_MiB"] / 2
        assert recomputed["states_MiB"] == pytest.approx(plain["states_MiB"], rel=1e-3)
        assert recomputed["sent_MiB_per_step"] == pytest.approx(plain["sent_MiB_per_step"], rel=1e-3)
    assert ddp["sent_vs_ddp"] == 1.0 and fsdp["sent_vs_ddp"] == pytest.approx(1.5, rel=0.02)
    assert fsdp["params_MiB"] == pytest.approx(ddp["params_MiB"] / 2, rel=0.02)


def test_formula_follows_the_strategy_and_optimizer():
    n = 1000
    ddp = memory.formula(numel=n, world_size=4, sharded=frozenset(), master=False, optimizer="SGD")
    zero2 = memory.formula(numel=n, world_size=4, sharded=frozenset({"optimizer_state", "grads"}), master=True,
                           optimizer="Adam")
    zero3 = memory.formula(numel=n, world_size=4, sharded=frozenset({"optimizer_state", "grads", "params"}),
                           master=True, optimizer="AdamW")
    assert ddp == {"params": 4000, "master": 0, "grads": 4000, "optimizer_state": 4000, "ema": 4000}
    assert zero2 == {"params": 4000, "master": 1000, "grads": 1000, "optimizer_state": 2000, "ema": 4000}
    assert zero3 == {"params": 1000, "master": 1000, "grads": 1000, "optimizer_state": 2000, "ema": 1000}
    # MuSGD: a momentum per parameter, and its SGD half's for the parameters of the muon groups (here 900)
    musgd = memory.formula(numel=n, world_size=4, sharded=frozenset({"optimizer_state"}), master=False,
                           optimizer="MuSGD", muon_numel=900)
    assert musgd["optimizer_state"] == 4 * 475  # (1000 + 900) elements over 4 ranks, 4 bytes each


def _count_all_reduce(rank: int, world: int, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    with CommCounter(world) as counter:
        tensor = torch.ones(1000)
        torch.distributed.all_reduce(tensor)
        torch.distributed.all_reduce(tensor=tensor[:10])
        # MuSGD's exchange: uneven parts, a rank's own part stays with it (rank 0 keeps 2 of 6, rank 1 5 of 6)
        splits = [[2, 4], [1, 5]]
        received = torch.empty(splits[0][rank] + splits[1][rank])
        torch.distributed.all_to_all_single(received, torch.ones(6), [s[rank] for s in splits], splits[rank])
    out.put((rank, dict(counter.bytes), dict(counter.calls), tensor[0].item()))
    torch.distributed.destroy_process_group()


def test_counter_counts_a_known_all_reduce_exactly():
    import multiprocessing

    port = free_port()
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_count_all_reduce, args=(r, 2, port, out)) for r in range(2)]
    for w in workers:
        w.start()
    results = sorted(out.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    # ring all-reduce over 2 ranks: each sends half of the tensor twice, i.e. the tensor's bytes
    expected = ring_bytes("all_reduce", 4000, 2) + ring_bytes("all_reduce", 40, 2)
    assert expected == 4040
    for rank, sent, calls, value in results:
        assert sent == {"all_reduce": 4040, "all_to_all_single": [16, 4][rank]} and value == 4.0
        assert calls == {"all_reduce": 2, "all_to_all_single": 1}
