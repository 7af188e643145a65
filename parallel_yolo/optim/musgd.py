"""Ultralytics' MuSGD under every strategy, each matrix orthogonalised once per step by one owner rank.

MuSGD (ultralytics/optim/muon.py) steps matrices and conv filters (its `use_muon` groups) with a Muon update plus an
SGD update, and everything else with SGD. All of that is per element except Muon's Newton–Schulz iteration, which
orthogonalises each whole matrix (a conv filter reshaped to rows x inputs): a ZeRO partition or an FSDP row block is
not a matrix, and Newton–Schulz on a piece is a different update, silently. So the per-element parts (both momentum
buffers, the Nesterov update, weight decay, the SGD half) run here on the elements each rank holds, and each matrix's
Newton–Schulz runs once per step on one owner rank: the ranks send the owner their pieces of the matrix's Muon update,
the owner orthogonalises it with Ultralytics' own `muon_update`, and sends every rank that holds a piece of the matrix
that piece back (two all-to-alls per step). Owners are balanced by Newton–Schulz cost, so each rank does ~1/N of the
work; under DDP, where every rank holds every matrix, that replaces N identical orthogonalisations by one, at the price
of sending the results (an all-gather's bytes). This is the owner-based scheme of Moonlight's distributed Muon
(ZeRO-1), Megatron's M-FSDP Muon and VeOmni's FSDP2 Muon.

What a rank holds comes from the strategy (`param_shards`: the flat range of each parameter in this rank's optimizer
tensors; `optimizer_units`: the tensors the backend steps together), so one class serves single, DDP, ZeRO-1/2/3
(+offload), FSDP2 and HSDP. Collectives run on the strategy's device (NCCL serves CUDA tensors only), whatever device
the optimizer's tensors are on (ZeRO-3 offload keeps them in CPU memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .._torch_internals import foreach
from .._ultralytics_internals import muon_update, musgd_defaults, musgd_fields

__all__ = ["DistributedMuSGD", "distributed"]


def distributed(optimizer: torch.optim.Optimizer, model: nn.Module) -> torch.optim.Optimizer:
    """Ultralytics' MuSGD (as its build_optimizer made it: groups, factors) as a DistributedMuSGD; others unchanged."""
    from ultralytics.optim import MuSGD

    if type(optimizer) is not MuSGD:
        return optimizer
    names = {id(p): name for name, p in model.named_parameters()}
    muon_factor, sgd_factor, groups = musgd_fields(optimizer)
    muon = [names[id(p)] for group, use_muon in groups if use_muon for p in group["params"]
            if p.requires_grad]  # DFL's fixed conv is in a muon group, never has a gradient: MuSGD skips it
    return DistributedMuSGD(optimizer.param_groups, muon=muon_factor, sgd=sgd_factor, muon_names=muon)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), any other tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    local = _local(tensor)
    if not local.is_contiguous():
        raise RuntimeError("MuSGD's sharded step needs contiguous parameters (a channels_last model is not supported "
                           "with optimizer=MuSGD yet); use the default memory format")
    return local.view(-1)


@dataclass(frozen=True, slots=True)
class _Piece:
    """Flat elements [lo, hi) of muon matrix `name`, held by `rank` in its optimizer unit `unit`; `replica`: which of
    the ranks holding the same range this one is (HSDP, DDP)."""

    name: str
    rank: int
    unit: int
    lo: int
    hi: int
    replica: int


def _matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, columns) of a parameter as Muon orthogonalises it: conv filters are rows x (inputs x kernel)."""
    return shape[0], math.prod(shape[1:])


def _newton_schulz_cost(matrices: list[tuple[int, int]]) -> int:
    """Multiply-adds, up to a constant, of Ultralytics' muon_update over these (rows, cols) matrices: it batches the
    matrices of equal columns, zero-padding their rows to the largest of a batch whose rows span at most 16x, and each
    Newton–Schulz iteration on an m x n matrix (m <= n, transposed if needed) costs m^2 (2n + m). The padding counts:
    balancing yolov8x's matrices over 2 ranks by their own sizes left one rank 1.9x the other's padded work."""
    total = 0
    for cols in {c for _, c in matrices}:
        rows = sorted((r for r, c in matrices if c == cols), reverse=True)
        start = 0
        for j in range(1, len(rows) + 1):
            if j == len(rows) or rows[start] > 16 * rows[j]:
                m, n = sorted((rows[start], cols))
                total += (j - start) * m * m * (2 * n + m)
                start = j
    return total


class _Plan:
    """Who orthogonalises which matrix and what moves where, for the matrices of some optimizer units. Computed the
    same way on every rank from every rank's pieces."""

    def __init__(self, pieces: list[_Piece], shapes: dict[str, tuple[int, ...]], order: list[str], world: int,
                 rank: int):
        by_name: dict[str, list[_Piece]] = {}
        for piece in pieces:
            by_name.setdefault(piece.name, []).append(piece)
        names = [n for n in order if n in by_name]
        # largest first, each to the rank whose Newton–Schulz work, padding included, grows least with it
        owned: list[list[tuple[int, int]]] = [[] for _ in range(world)]
        self.owner = {}
        for name in sorted(names, key=lambda n: -_newton_schulz_cost([_matrix(shapes[n])])):
            matrix = _matrix(shapes[name])
            owner = min(range(world), key=lambda r: (_newton_schulz_cost(owned[r] + [matrix]), r))
            self.owner[name] = owner
            owned[owner].append(matrix)
        self.world, self.rank, self.shapes = world, rank, shapes
        self.owned = [n for n in names if self.owner[n] == rank]
        gather, scatter = [], []  # (from rank, to rank, piece): pieces of the update in, orthogonalised pieces out
        for name in names:
            owner = self.owner[name]
            held = [p for p in by_name[name] if p.rank == owner]
            replica = held[0].replica if held else 0  # the owner's own copy of a replicated range, else replica 0
            sources = sorted((p for p in by_name[name] if p.replica == replica), key=lambda p: p.lo)
            covered = 0
            for piece in sources:
                if piece.lo != covered:
                    raise RuntimeError(f"MuSGD: the pieces of {name} do not cover it once (elements {covered} to "
                                       f"{piece.lo}); the strategy's param_shards are inconsistent")
                covered = piece.hi
            if covered != math.prod(shapes[name]):
                raise RuntimeError(f"MuSGD: the pieces of {name} end at element {covered} of "
                                   f"{math.prod(shapes[name])}; the strategy's param_shards are inconsistent")
            gather += [(p.rank, owner, p) for p in sources]
            scatter += [(owner, p.rank, p) for p in by_name[name]]
        self.gather_send, self.gather_recv = self._transfers(gather)
        self.scatter_send, self.scatter_recv = self._transfers(scatter)

    def _transfers(self, moves: list[tuple[int, int, _Piece]]) -> tuple[list[list[_Piece]], list[list[_Piece]]]:
        """Per peer rank, the pieces this rank sends to it and receives from it, in one order both sides know."""
        send = [[p for src, dst, p in moves if src == self.rank and dst == peer] for peer in range(self.world)]
        recv = [[p for src, dst, p in moves if dst == self.rank and src == peer] for peer in range(self.world)]
        return send, recv


class DistributedMuSGD(torch.optim.Optimizer):
    """Ultralytics' MuSGD step on the elements this rank holds, Newton–Schulz by owner ranks (see the module)."""

    def __init__(self, params, *, muon: float, sgd: float, muon_names: list[str]):
        super().__init__(params, musgd_defaults())  # MuSGD's own defaults for what a group leaves out
        self.muon, self.sgd, self.muon_names = muon, sgd, muon_names
        self.newton_schulz_matrices = 0
        """Matrices this rank has orthogonalised (each optimizer step's share of the model's, ~1/N of them)."""
        self.bytes_sent = 0
        """Bytes this rank has sent to other ranks for the Muon step."""
        self._held: dict[str, tuple[torch.Tensor, int, int]] = {}  # muon matrix -> (optimizer tensor, offset, size)
        self._held_in: dict[int, list[str]] = {}  # optimizer tensor's id -> the muon matrices it holds pieces of
        self._unit_of: dict[int, int] = {}
        self._table: list[_Piece] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._plans: dict[frozenset[int], _Plan] = {}
        self._device, self._distributed, self._world, self._rank = torch.device("cpu"), False, 1, 0

    def bind(self, strategy) -> None:
        """Learn from the strategy where this rank's pieces of every muon matrix are, and where everyone else's are
        (a collective: once, after the strategy has wrapped the model and optimizer)."""
        units = strategy.optimizer_units()
        self._unit_of = {id(t): i for i, tensors in enumerate(units) for t in tensors}
        mine, muon = [], set(self.muon_names)
        for shard in strategy.param_shards():
            if shard.name not in muon:
                continue
            self._shapes[shard.name] = shard.shape
            span = shard.optimizer
            if span is None or span.hi <= span.lo:
                continue
            self._held[shard.name] = (span.key, span.offset, span.hi - span.lo)
            self._held_in.setdefault(id(span.key), []).append(shard.name)
            mine.append(_Piece(shard.name, strategy.rank, self._unit_of[id(span.key)], span.lo, span.hi,
                               span.share[0]))
        self._table = [piece for pieces in strategy.gather_object(mine) for piece in pieces]
        self._device, self._distributed = strategy.device, strategy.distributed
        self._world, self._rank = strategy.world_size, strategy.rank

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = [(group, [p for p in group["params"] if p.grad is not None]) for group in self.param_groups]
        for group, params in stepped:
            for p in params:
                if len(self.state[p]) == 0:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    if group["use_muon"]:
                        self.state[p]["momentum_buffer_SGD"] = torch.zeros_like(p)
        orthogonal = self._muon_updates([(g, ps) for g, ps in stepped if g["use_muon"] and ps])
        for group, params in stepped:
            if not params:
                continue
            lr, momentum, nesterov = group["lr"], group["momentum"], group["nesterov"]
            weights, grads = [_flat(p) for p in params], [_flat(p.grad) for p in params]
            if group["use_muon"]:
                foreach.add_(weights, [orthogonal[id(p)] for p in params], alpha=-(lr * self.muon))
                buffers = [_flat(self.state[p]["momentum_buffer_SGD"]) for p in params]
                lr *= self.sgd
            else:
                buffers = [_flat(self.state[p]["momentum_buffer"]) for p in params]
            # SGD update, as MuSGD.step (weight decay on the weights after the Muon update)
            if group["weight_decay"] != 0:
                grads = foreach.add(grads, weights, alpha=group["weight_decay"])
            foreach.mul_(buffers, momentum)
            foreach.add_(buffers, grads)
            updates = foreach.add(grads, buffers, alpha=momentum) if nesterov else buffers
            foreach.add_(weights, updates, alpha=-lr)
        return loss

    def _muon_updates(self, groups: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> dict[int, torch.Tensor]:
        """Per optimizer tensor of the muon groups: the orthogonalised, scaled Muon update of its elements (flat)."""
        if not groups:
            return {}
        updates: dict[int, torch.Tensor] = {}
        for group, params in groups:  # muon_update's momentum and Nesterov lines, on the elements held here
            beta = group["momentum"]
            momenta = [_flat(self.state[p]["momentum_buffer"]) for p in params]
            grads = [_flat(p.grad) for p in params]
            foreach.mul_(momenta, beta)
            foreach.add_(momenta, grads, alpha=1 - beta)
            if group["nesterov"]:
                nesterov = list(foreach.mul(momenta, beta))
                foreach.add_(nesterov, grads, alpha=1 - beta)
            else:
                nesterov = momenta
            updates.update((id(p), u) for p, u in zip(params, nesterov))
        units = frozenset(self._unit_of[k] for k in updates)
        if units not in self._plans:  # the units DeepSpeed steps in one call are the same on every rank
            self._plans[units] = _Plan([p for p in self._table if p.unit in units], self._shapes, self.muon_names,
                                       self._world, self._rank)
        plan = self._plans[units]
        whole = {name: torch.empty(math.prod(self._shapes[name]), device=self._device) for name in plan.owned}
        self._exchange(plan.gather_send, plan.gather_recv, lambda p: self._piece(updates, p.name),
                       lambda p, data: whole[p.name][p.lo:p.hi].copy_(data))
        orthogonal = self._orthogonalise(whole)
        received: dict[str, torch.Tensor] = {}
        self._exchange(plan.scatter_send, plan.scatter_recv, lambda p: orthogonal[p.name][p.lo:p.hi],
                       lambda p, data: received.__setitem__(p.name, data))
        out = {}
        for key_id, update in updates.items():
            names = self._held_in.get(key_id, [])
            if len(names) == 1 and self._held[names[0]][2] == update.numel():  # DDP, FSDP: one matrix per tensor
                out[key_id] = received[names[0]].to(update.device, update.dtype)
                continue
            out[key_id] = torch.zeros_like(update)  # a ZeRO partition: its muon matrices' pieces, padding left at 0
            for name in names:
                _, offset, size = self._held[name]
                out[key_id][offset:offset + size].copy_(received[name])
        return out

    def _piece(self, updates: dict[int, torch.Tensor], name: str) -> torch.Tensor:
        key, offset, size = self._held[name]
        return updates[id(key)][offset:offset + size]

    def _orthogonalise(self, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Ultralytics' muon_update on whole matrices whose momentum step was already taken: with beta 0 and no
        Nesterov its momentum becomes the update itself, then Newton–Schulz, batched as Ultralytics batches it, and
        the rows/cols scale."""
        if not whole:
            return {}
        names = list(whole)
        matrices = [whole[n].view(self._shapes[n]) for n in names]
        result = muon_update(matrices)
        self.newton_schulz_matrices += len(names)
        return {n: r.reshape(-1) for n, r in zip(names, result)}

    def _exchange(self, send: list[list[_Piece]], recv: list[list[_Piece]], read, write) -> None:
        """One all-to-all over every rank: `read(piece)` gives what goes out, `write(piece, data)` takes what came in."""
        out = [read(p).to(self._device, torch.float32) for pieces in send for p in pieces]
        send_sizes = [sum(p.hi - p.lo for p in pieces) for pieces in send]
        recv_sizes = [sum(p.hi - p.lo for p in pieces) for pieces in recv]
        outgoing = torch.cat(out) if out else torch.empty(0, device=self._device)
        incoming = torch.empty(sum(recv_sizes), device=self._device)
        if self._distributed:
            dist.all_to_all_single(incoming, outgoing, recv_sizes, send_sizes)
        else:
            incoming.copy_(outgoing)  # one process, no group: it sends to itself
        self.bytes_sent += 4 * (sum(send_sizes) - send_sizes[self._rank])
        at = 0
        for pieces in recv:
            for p in pieces:
                write(p, incoming[at:at + p.hi - p.lo])
                at += p.hi - p.lo
