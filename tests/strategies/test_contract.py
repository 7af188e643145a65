"""The contract test: every registered strategy, on 2 gloo processes, trains like one process.

Reference: one process with the same global batch of 8, split into the two micro-batches of 4 that the two
ranks see (see test_ddp.py for why a single forward over all 8 is a different computation). Loss gains are
scaled down so the gradient norm stays under Ultralytics' clip of 10: a clip coefficient is computed from a
global norm that sharded strategies sum in another order (~1e-7), and the task-aligned assigner amplifies
such differences within a few steps. Clipping itself is checked through the gradient norms.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import NO_AUGMENT, TINY, check, load_weights, read_csv, run_cli

from parallel_yolo.strategies import REGISTRY

STEPS = 5
COMMON = [*TINY, *NO_AUGMENT, "batch=8", "nbs=8", f"max_steps={STEPS}", "lr0=0.01", "val=false",
          "box=0.75", "cls=0.05", "dfl=0.15", "project=runs"]
# Reference and distributed runs use the same intra-op thread count, the caller's OMP_NUM_THREADS or 1: the test
# passes at 1 and 2 (run `OMP_NUM_THREADS=2 python -m pytest tests/strategies/test_contract.py`).
THREADS = os.environ.get("OMP_NUM_THREADS") or "1"

# Tolerances, relative, and where each comes from.
# - Every strategy but ZeRO-3 runs the operations one process runs, on the same values in the same order, so its
#   training is bit-identical on any machine as long as both runs use the same thread count (measured: loss 0.0,
#   weights and EMA 0.0, at 2 threads 8e-15 for zero1/2). Only the reported norm is summed over shards in another
#   order, as the step-1 norm below (measured <= 6.3e-7 at OMP_NUM_THREADS 2).
# - ZeRO-3 sums each gradient element over its partitioned reduce in another order than one process accumulates
#   it: one rounding (2^-24 relative) per element per step. The task-aligned assigner's top-k turns such roundings
#   into different assignments within a few steps, which moves the gradient norm ~30x more than the mean loss. A
#   change of thread count is the same kind of perturbation for one process (what another CPU's kernels do); on
#   this machine, one process at 2 threads against 1 thread: loss 6.6e-6, weights 1.4e-6, norms of steps 2-5
#   2.0e-4. ZeRO-3 against one process (1 and 2 threads, and across them): loss <= 1.1e-5, weights <= 1.3e-6,
#   later norms <= 2.5e-4; on a machine 2x slower (issue 19): loss 1.0e-5, weights 9.4e-7, norms 4.3e-4. Another
#   process count changes the order too: at 4 processes (one process with micro_batch=2 as reference) zero3 gives
#   8.3e-6 / 7.0e-6 / 4.2e-4 and even DDP, whose all-reduce then adds 4 gradients in ring order, 1.3e-5 / 7.0e-6 /
#   1.9e-4. The bounds are ~4-7x the largest of these. A real fault is far outside them: an unaveraged gradient, a
#   lost bucket or an unclipped step moves the loss by percents.
# The step-1 norm comes from identical weights and one gradient: only the order of the sum of squares over shards
# differs (fp32, a few million elements summed in blocks: ~log2(n) roundings of 2^-24, 1.3e-6; measured <= 8.8e-7).
FIRST_NORM = 2e-6
EXACT = {"loss": 1e-6, "weights": 1e-6, "later_norms": FIRST_NORM}
SUMMATION_ORDER = {"loss": 5e-5, "weights": 5e-5, "later_norms": 2e-3}
# MuSGD (tests/optim/test_musgd.py): every strategy but ZeRO-3 steps exactly as one process (measured 0.0 for loss,
# weights and EMA here too). Under ZeRO-3 Newton–Schulz, which computes in bfloat16, turns the reduce's changed last
# bits into changed bfloat16 roundings: measured loss 2.1e-6 at step 2 and 2.2e-3 by step 5, weights 7.1e-4, later
# norms 8.9e-2. Newton–Schulz per shard instead of per matrix (the bug the owner-based step replaces) measured on
# zero3: step-2 loss 1.3e-3, loss 9.8e-2, weights 5.3e-3; so the second step's loss, one optimizer step from
# identical weights, separates them by ~600x, and the bounds over all steps are ~4x the measured figures.
MUSGD_ZERO3 = {"loss": 1e-2, "weights": 3e-3, "later_norms": 0.5, "second_loss": 1e-4}
TOLERANCE = {("SGD", "zero3"): SUMMATION_ORDER, ("SGD", "zero3_offload"): SUMMATION_ORDER,
             ("MuSGD", "zero3"): MUSGD_ZERO3, ("MuSGD", "zero3_offload"): MUSGD_ZERO3}
DISTRIBUTED = sorted(name for name in REGISTRY if name != "single")
# MuSGD's step is checked against Ultralytics' own for every strategy in tests/optim/test_musgd.py; here the whole
# trainer runs it, by default on ZeRO-3 (the layout where a shard is furthest from a matrix; the default suite's
# time went to the other tasks), the others (ZeRO's flat partition, FSDP's row blocks ...) when the suite's time allows
MUSGD_DEFAULT = {"zero3"}
CASES = [("SGD", name) for name in DISTRIBUTED] + [
    ("MuSGD", name) if name in MUSGD_DEFAULT else pytest.param("MuSGD", name, marks=pytest.mark.extended)
    for name in DISTRIBUTED]


def _train(workdir, name, *extra):
    check(run_cli("train", *COMMON, f"name={name}", *extra, cwd=workdir, env={"OMP_NUM_THREADS": THREADS}))
    run = workdir / "runs" / name
    rows = read_csv(run / "steps.csv")
    return (torch.tensor([float(r["loss"]) for r in rows], dtype=torch.float64),
            torch.tensor([float(r["grad_norm"]) for r in rows], dtype=torch.float64),
            load_weights(run / "weights" / "last"), load_weights(run / "weights" / "last", "ema"), run)


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    runs = {}

    def get(optimizer: str):
        if optimizer not in runs:
            runs[optimizer] = _train(tmp_path_factory.mktemp(f"ref{optimizer}"), "ref", "strategy=single",
                                     "micro_batch=4", f"optimizer={optimizer}")
        return runs[optimizer]

    return get


def _check_like_one_process(run: tuple, reference: tuple, tol: dict[str, float], label: str, more: str = "") -> None:
    """Per-step losses, final weights and EMA, and gradient norms of a run (loss, norm, weights, ema) against the
    one-process reference, within `tol`; the figures are printed (pytest -s shows them)."""
    loss, norm, weights, ema = run
    ref_loss, ref_norm, ref_w, ref_ema = reference[:4]
    loss_rel = float(((loss - ref_loss).abs() / ref_loss.abs()).max())
    params = [k for k, v in ref_w.items() if v.is_floating_point() and "running" not in k]
    weight_rel = _rel(_flat(weights, params), _flat(ref_w, params))
    ema_rel = _rel(_flat(ema, params), _flat(ref_ema, params))
    norm_rel = float(((norm - ref_norm).abs() / ref_norm).max())
    print(f"\n{label}: loss {loss_rel:.1e}{more}  weights {weight_rel:.1e}  EMA {ema_rel:.1e}  grad norm "
          f"{norm_rel:.1e}")
    assert loss_rel <= tol["loss"] and weight_rel <= tol["weights"] and ema_rel <= tol["weights"]
    # Step 1 starts from identical weights: the global norm over all shards equals one process's norm.
    assert abs(float(norm[0] - ref_norm[0])) / float(ref_norm[0]) <= FIRST_NORM
    assert norm_rel <= tol["later_norms"]


def _flat(state: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in keys])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-12))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, strategy", CASES)
def test_strategy_matches_single_process(optimizer, strategy, references, workdir):
    reference = references(optimizer)
    ref_loss, _, ref_w, _, _ = reference
    loss, norm, weights, ema, run = _train(workdir, strategy, "nproc=2", f"strategy={strategy}",
                                           f"optimizer={optimizer}")
    tol = TOLERANCE.get((optimizer, strategy), EXACT)
    assert yaml.safe_load((run / "args.yaml").read_text())["strategy"] == strategy
    assert len(loss) == STEPS
    second_loss = abs(float(loss[1] - ref_loss[1])) / abs(float(ref_loss[1]))
    assert second_loss <= tol.get("second_loss", tol["loss"]), second_loss
    _check_like_one_process((loss, norm, weights, ema), reference, tol, f"{optimizer} {strategy}",
                            f" (step 2: {second_loss:.1e})")
    assert set(weights) == set(ref_w) and all(weights[k].dtype == ref_w[k].dtype for k in ref_w)
    assert not torch.equal(ema["model.0.conv.weight"], weights["model.0.conv.weight"])  # EMA is its own copy
    # memory.json: what each rank holds. Every strategy but DDP shards the optimizer state over the 2 ranks.
    held = [r["optimizer_state_bytes"] for r in json.loads((run / "memory.json").read_text())["ranks"]]
    full = json.loads((reference[4] / "memory.json").read_text())["ranks"][0]["optimizer_state_bytes"]
    expected = 1.0 if strategy == "ddp" else 0.5
    assert len(held) == 2 and all(abs(h / full - expected) < 0.02 for h in held), (held, full)


ACCUMULATE = ["nbs=16", "micro_batch=2", "max_steps=3"]  # 2 iterations per step, 2 forward passes per iteration


@pytest.fixture(scope="session")
def accumulating_reference(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("accref"), "ref", "strategy=single", "optimizer=SGD", *ACCUMULATE)


@pytest.mark.slow
# zero1 as well as zero2: with overlap_comm, stage 1 reduces in the backward hooks at the boundary, not after it
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", pytest.param("zero1", marks=pytest.mark.extended), "zero2",
                                      "zero3"])
def test_gradient_accumulation_matches_single_process(strategy, accumulating_reference, workdir):
    """no_sync / DeepSpeed's accumulation boundary across micro-batches and iterations: each rank sums its
    micro-batches' gradients before the ranks' sums are added, one process adds all 8 in turn. Another summation
    order, so ZeRO-3's bounds hold for every strategy here (measured: loss <= 2e-6, norms <= 1.1e-4)."""
    ref_loss, ref_norm, ref_w, _, _ = accumulating_reference
    loss, norm, weights, _, _ = _train(workdir, strategy, "nproc=2", f"strategy={strategy}", "optimizer=SGD",
                                       *ACCUMULATE)
    assert len(loss) == len(ref_loss) == 3
    assert float(((loss - ref_loss).abs() / ref_loss).max()) <= SUMMATION_ORDER["loss"]
    assert abs(float(norm[0] - ref_norm[0])) / float(ref_norm[0]) <= FIRST_NORM
    assert float(((norm - ref_norm).abs() / ref_norm).max()) <= SUMMATION_ORDER["later_norms"]
    params = [k for k, v in ref_w.items() if v.is_floating_point() and "running" not in k]
    assert _rel(_flat(weights, params), _flat(ref_w, params)) <= SUMMATION_ORDER["weights"]


# Every other task (tasks/task.py) under every strategy, against one process on the same micro-batches, fp32, SGD: the
# same bounds as detection's. By default each task runs on one strategy, the strategies turning over the tasks so each
# kind of layout (ZeRO's flat partition, ZeRO-3's slices, FSDP's row blocks) meets three tasks; the rest are extended.
TASK_MODELS = {"segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml",
               "classify": "yolov8n-cls.yaml", "semantic": "yolo26n-sem.yaml", "depth": "yolo26n-depth.yaml"}
TASK_DEFAULT = {"segment": "zero3", "pose": "fsdp", "obb": "zero2", "classify": "zero3", "semantic": "fsdp",
                "depth": "zero2"}
# The loss gains that keep each task's gradient norm under Ultralytics' clip of 10, as COMMON's do for detection (the
# default gains give norms of 460 (segment), 2100 (pose), 740 (OBB), 320 (depth)); semantic segmentation's loss has
# no gains (norms 70-90): its pixel loss has no assigner to amplify the clip coefficient's last bits.
TASK_GAINS = {"segment": ["box=0.01"], "pose": ["box=0.1", "pose=0.03", "kobj=0.01"],
              "obb": ["box=0.01", "dfl=0.01", "cls=0.005", "angle=0.001"], "depth": ["dlog=0.02", "dgrad=0.01"]}
# Tolerances per task, measured on this machine (2 processes against one, 5 steps; the bounds ~4x the largest):
# - segment, pose, OBB and depth with the gains above: every strategy but ZeRO-3 bit-identical (loss 0.0, weights
#   <= 5e-13), ZeRO-3 as detection's (segment 2.6e-5 / 3.3e-5, pose 1.9e-5 / 2.4e-5, OBB 1.3e-6 / 1.7e-7) except
#   depth: DepthLoss26 (a log loss on every pixel, then a mean over the image) turns ZeRO-3's changed last bits into
#   loss 1.5e-3, weights 8.0e-4, norms 2.3e-2 by step 5;
# - classification and semantic segmentation, whose losses have no gains and whose norms (15-90) stay above the clip:
#   the clip coefficient, from a norm summed over shards in another order, differs in its last bits on every step;
#   measured loss <= 4.5e-5, weights <= 1.5e-4, norms <= 3.8e-3 (semantic), <= 1.1e-5 / 2.1e-6 / 7.8e-5 (classify).
#   DDP, which sums the norm as one process does, stays bit-identical for both.
CLIPPED = {"loss": 2e-4, "weights": 6e-4, "later_norms": 2e-2}
DEPTH_ZERO3 = {"loss": 6e-3, "weights": 3.2e-3, "later_norms": 0.1}


def task_tolerance(task: str, strategy: str) -> dict[str, float]:
    if strategy != "ddp" and task in ("classify", "semantic"):
        return CLIPPED
    if task == "depth" and strategy.startswith("zero3"):
        return DEPTH_ZERO3
    return TOLERANCE.get(("SGD", strategy), EXACT)


TASK_CASES = [(task, name) if TASK_DEFAULT[task] == name else pytest.param(task, name, marks=pytest.mark.extended)
              for task in TASK_MODELS for name in DISTRIBUTED]


@pytest.fixture(scope="session")
def task_references(tmp_path_factory):
    runs = {}

    def get(task: str):
        if task not in runs:
            runs[task] = _train(tmp_path_factory.mktemp(f"ref{task}"), "ref", "strategy=single", "micro_batch=4",
                                "optimizer=SGD", f"model={TASK_MODELS[task]}", "data=demo", *TASK_GAINS.get(task, ()))
        return runs[task]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("task, strategy", TASK_CASES)
def test_every_task_matches_single_process(task, strategy, task_references, workdir):
    ref_w = task_references(task)[2]
    loss, norm, weights, ema, run = _train(workdir, strategy, "nproc=2", f"strategy={strategy}", "optimizer=SGD",
                                           f"model={TASK_MODELS[task]}", "data=demo", *TASK_GAINS.get(task, ()))
    tol = task_tolerance(task, strategy)
    assert len(loss) == STEPS and yaml.safe_load((run / "args.yaml").read_text())["model"] == TASK_MODELS[task]
    _check_like_one_process((loss, norm, weights, ema), task_references(task), tol, f"{task} {strategy}")
    assert float(loss.min()) > 0 and set(weights) == set(ref_w)
