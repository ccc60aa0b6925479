"""torch.distributed: products summed over ranks, replicated solvers, kernel tiles split.

Data-parallel diagnostics: every rank holds the same parameters (a DDP replica)
and its own shard of the data. A :class:`Group` is what rdiag needs from a
``torch.distributed`` process group:

* :meth:`Group.sum`: a product summed over the ranks and **bitwise identical on
  every rank** (reduced onto the group's first rank, then broadcast from it; an
  ``all_reduce`` does not promise every rank the same bits). Solvers that see
  only the operator (Lanczos, Hutch++, SLQ) then run replicated: every rank
  takes the same decisions, so all make the same number of products.
* :meth:`Group.check_replicas`: every rank selects the same parameters (names,
  shapes, dtypes) with the same values; otherwise a ``ValueError`` names the
  parameters and the ranks.
* :meth:`Group.check_replicated`: a solver's input vectors are the same on every
  rank (a different seed or warm start on one rank is named, not a hang or a
  silently different result).
* :meth:`Group.gather_rows`: the ranks' shards of a batch, joined in rank order.
* :func:`sharded_kernel`: a kernel of the joined batch whose tiles are split
  across the ranks (balanced by their per-sample work) and all-gathered.

Backends: gloo (CPU tensors) and NCCL (CUDA tensors on the current device);
tensors are moved to the backend's device for a collective and back. Every
collective is entered by every rank in the same order, so a rank that raises
before one leaves the others waiting until the process group's timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rdiag._inputs import Inputs, batch_size, rows, tree_map
from rdiag._tiling import place

Kernels = Tensor | dict[str, Tensor]


class Group:
    """A process group as rdiag uses it: rank, size, device, and the collectives.

    Args:
        process_group: A ``torch.distributed`` process group of which this process
            is a member (``torch.distributed.group.WORLD`` for all processes).

    Attributes:
        rank: This process's rank in the group.
        size: Number of ranks.
        device: Where the backend's collectives take tensors (CUDA for NCCL).

    Raises:
        ValueError: torch.distributed is not initialized, or this process is not
            in the group.
    """

    def __init__(self, process_group: Any) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "expected an initialized torch.distributed process group for "
                "process_group=, got none initialized; call "
                "torch.distributed.init_process_group(...) first, or pass "
                "process_group=None for one process"
            )
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        if self.rank < 0:
            raise ValueError(
                "expected a process group this process is a member of, got one "
                "without it; pass a group that holds this rank"
            )
        self.size = dist.get_world_size(process_group)
        self.root = dist.get_global_rank(process_group, 0)
        nccl = dist.get_backend(process_group) == "nccl"
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if nccl
            else torch.device("cpu")
        )

    # ---- sums -----------------------------------------------------------------
    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the ranks, the same bits on every rank.

        Args:
            tensor: This rank's part, of the same shape and dtype on every rank.

        Returns:
            The sum, on ``tensor``'s device.
        """
        dist = torch.distributed
        buf = tensor.detach().to(self.device, copy=True).contiguous()
        dist.reduce(buf, dst=self.root, group=self.group)
        dist.broadcast(buf, src=self.root, group=self.group)
        return buf.to(tensor.device)

    def total(self, count: int) -> int:
        """An integer summed over the ranks (exact)."""
        buf = torch.tensor([int(count)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(buf, group=self.group)
        return int(buf.item())

    def agree(self, flag: bool) -> bool:
        """The first rank's ``flag`` on every rank (a decision all must share)."""
        buf = torch.tensor([int(flag)], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(buf, src=self.root, group=self.group)
        return bool(buf.item())

    # ---- gathers --------------------------------------------------------------
    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor``, in rank order; first axes may differ in length.

        Args:
            tensor: ``(n_r, ...)``, the trailing shape and dtype the same everywhere.

        Returns:
            One ``(n_r, ...)`` tensor per rank, on ``tensor``'s device.
        """
        dist = torch.distributed
        flag = tensor.dtype == torch.bool  # not every backend reduces bools
        local = (tensor.to(torch.uint8) if flag else tensor).to(self.device)
        sizes = self._sizes(local.shape[0])
        padded = local.new_zeros((max(sizes), *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return [
            (p[:n].bool() if flag else p[:n]).to(tensor.device)
            for p, n in zip(parts, sizes)
        ]

    def _sizes(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(mine) for _ in range(self.size)]
        torch.distributed.all_gather(sizes, mine, group=self.group)
        return [int(s.item()) for s in sizes]

    def gather_rows(self, x: Inputs) -> Inputs:
        """The ranks' shards of a batch joined along the sample axis, in rank order.

        Args:
            x: This rank's ``(n_r, ...)`` inputs (a tensor, tuple or dict).

        Returns:
            The ``(sum_r n_r, ...)`` batch of the same form, on every rank.
        """
        return tree_map(lambda t: torch.cat(self.gather(t)), x)

    def objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order."""
        out: list[Any] = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    # ---- checks ---------------------------------------------------------------
    def check_replicas(self, module: nn.Module, names: Sequence[str]) -> None:
        """Check that every rank selects the same parameters, with the same values.

        Compares names, shapes and dtypes, then each parameter's values with the
        first rank's (broadcast one at a time: no extra copy of the model).
        Every rank raises the same error.

        Args:
            module: This rank's model.
            names: The selected parameter names.

        Raises:
            ValueError: The ranks differ; the message names the parameters and
                the ranks and says how to make them equal.
        """
        named = dict(module.named_parameters())
        layout = [(n, tuple(named[n].shape), str(named[n].dtype)) for n in names]
        layouts = self.objects(layout)
        for r, other in enumerate(layouts):
            if other != layouts[0]:
                first = next(
                    (a, b)
                    for a, b in zip(layouts[0] + [None], other + [None])
                    if a != b
                )
                raise ValueError(
                    f"expected every rank to select the same parameters, got rank {r} "
                    f"with {first[1]} where rank 0 has {first[0]} (name, shape, "
                    "dtype); build the operator from the same model and selector on "
                    "every rank"
                )
        flags = []
        for n in names:
            mine = named[n].detach().to(self.device)
            ref = mine.clone()
            torch.distributed.broadcast(ref, src=self.root, group=self.group)
            same = (ref == mine) | (ref.isnan() & mine.isnan())
            flags.append(not bool(same.all()))
        differ = torch.stack(self.gather(torch.tensor([flags], dtype=torch.bool)))
        bad = {
            n: [r for r in range(self.size) if bool(differ[r, 0, i])]
            for i, n in enumerate(names)
            if bool(differ[:, 0, i].any())
        }
        if bad:
            listed = "; ".join(
                f"{n!r} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}"
                for n, r in list(bad.items())[:5]
            )
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise ValueError(
                f"expected every rank to hold the same parameters, got {len(bad)} "
                f"that differ from rank 0's: {listed}{more}; broadcast rank 0's "
                "parameters (DistributedDataParallel does at construction) or load "
                "the same checkpoint on every rank"
            )

    def check_replicated(self, matrix: Tensor, what: str) -> None:
        """Check that ``matrix`` is the same on every rank (shape and two sums).

        Args:
            matrix: A solver's input, e.g. the ``(P, K)`` block of a product.
            what: What it is, for the message.

        Raises:
            ValueError: A rank's ``matrix`` differs from the first rank's.
        """
        m = matrix.detach().double()
        mine = torch.tensor(
            [float(m.shape[-1]), float(m.sum()), float(m.abs().sum())],
            dtype=torch.float64,
        )
        prints = self.gather(mine[None])
        ref = prints[0]
        bad = [
            r
            for r, p in enumerate(prints)
            if not bool(torch.isclose(p, ref, rtol=0, atol=0, equal_nan=True).all())
        ]
        if bad:
            raise ValueError(
                f"expected {what} to be the same on every rank, got ranks {bad} "
                "differing from rank 0; run the solver with the same arguments (seed, "
                "warm start, k) on every rank: each product is a collective that "
                "every rank must enter with the same vectors"
            )


def _blocks(n: int, parts: int) -> list[slice]:
    """``min(n, parts)`` contiguous, nearly equal slices covering ``range(n)``."""
    parts = max(1, min(n, parts))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def assign_tiles(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each tile: longest first onto the least-loaded rank (LPT).

    Deterministic: ties go to the earlier tile and the lower rank.

    Args:
        costs: Estimated cost of each tile.
        size: Number of ranks.

    Returns:
        One rank per tile.
    """
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def sharded_kernel(
    group: Group,
    compute: Callable[[Inputs, Inputs | None], Kernels],
    x1: Inputs,
    x2: Inputs | None = None,
    *,
    diagonal: bool = False,
) -> Kernels:
    """The kernel of the ranks' joined batches, its tiles computed across the ranks.

    ``x1`` (and ``x2``) are this rank's shards; the kernel is that of
    ``X1 = [x1 of rank 0; x1 of rank 1; ...]`` (against ``X2`` likewise, or
    ``X1`` itself). ``X1`` is cut into one block of rows per rank; the tiles
    (upper triangle only for a symmetric kernel) go to the ranks by their
    per-sample work (a diagonal tile's rows once, another tile's rows and columns),
    each rank computes its tiles with ``compute`` and all of them are
    all-gathered, so every rank returns the same whole kernel. With
    ``diagonal`` each rank computes the diagonal of its own shard.

    .. warning::
        The per-sample work of a tile (Jacobians, captured factors) is done by
        the rank that computes it, for its rows and its columns: ``R`` ranks split
        the contraction and the kernel's memory ``R`` ways, but each still does
        about the per-sample work of the whole batch. The split pays off when
        the contraction or the kernel dominates (large ``N``).

    Args:
        group: The ranks.
        compute: The local kernel function ``(a, b or None) -> kernel`` (a tensor
            ``(Na, Nb, ...)`` or ``(Na, ...)`` diagonal, or a dict of them per layer).
        x1: This rank's ``(n1_r, ...)`` inputs.
        x2: This rank's ``(n2_r, ...)`` inputs, or ``None`` (symmetric kernel).
        diagonal: Only ``K(x_i, x_i)``: ``(N1, ...)`` gathered from the ranks.

    Returns:
        The whole kernel, of the form ``compute`` returns.
    """
    if diagonal:
        local = compute(x1, None)
        if isinstance(local, Tensor):
            return torch.cat(group.gather(local))
        return {layer: torch.cat(group.gather(k)) for layer, k in local.items()}
    all1 = group.gather_rows(x1)
    symmetric = x2 is None
    all2 = all1 if symmetric else group.gather_rows(x2)
    row_blocks = _blocks(batch_size(all1), group.size)
    col_blocks = row_blocks if symmetric else _blocks(batch_size(all2), group.size)
    pairs = [
        (a, b)
        for a in range(len(row_blocks))
        for b in range(a if symmetric else 0, len(col_blocks))
    ]

    def work(a: int, b: int) -> float:
        n = row_blocks[a].stop - row_blocks[a].start
        m = col_blocks[b].stop - col_blocks[b].start
        return float(n if symmetric and a == b else n + m)

    owner = assign_tiles([work(a, b) for a, b in pairs], group.size)
    tiles: dict[tuple[int, int], dict[str, Tensor]] = {}
    for (a, b), r in zip(pairs, owner):
        if r != group.rank:
            continue
        rows_a = rows(all1, row_blocks[a])
        other = None if symmetric and a == b else rows(all2, col_blocks[b])
        part = compute(rows_a, other)
        tiles[(a, b)] = {"": part} if isinstance(part, Tensor) else dict(part)
    # A rank without tiles (fewer samples than ranks) learns the layout from others.
    layouts = group.objects(
        None
        if not tiles
        else [
            (layer, tuple(k.shape[2:]), k.dtype, str(k.device))
            for layer, k in next(iter(tiles.values())).items()
        ]
    )
    layout = next(entry for entry in layouts if entry is not None)
    dtype, device = layout[0][2], torch.device(layout[0][3])
    mine = [tiles[p][layer].reshape(-1) for p in tiles for layer, *_ in layout]
    flat = torch.cat(mine) if mine else torch.empty(0, dtype=dtype, device=device)
    buffers = group.gather(flat.to(device))
    n1, n2 = batch_size(all1), batch_size(all2)
    out = {
        layer: torch.empty((n1, n2, *tail), dtype=dtype, device=device)
        for layer, tail, _, _ in layout
    }
    for r, buf in enumerate(buffers):
        offset = 0
        for (a, b), o in zip(pairs, owner):
            if o != r:
                continue
            ra, cb = row_blocks[a], col_blocks[b]
            shape = (ra.stop - ra.start, cb.stop - cb.start)
            part = {}
            for layer, tail, _, _ in layout:
                count = math.prod(shape) * math.prod(tail)
                part[layer] = buf[offset : offset + count].reshape(*shape, *tail)
                offset += count
            place(out, part, ra, cb, symmetric)
    return out[""] if set(out) == {""} else out


def shard_of(x: Inputs, group: Group) -> Inputs:
    """This rank's contiguous share of a batch held whole on every rank.

    Joined in rank order (:meth:`Group.gather_rows`) the shares are ``x`` again.

    Raises:
        ValueError: Fewer samples than ranks (a rank would get none).
    """
    n = batch_size(x)
    if n < group.size:
        raise ValueError(
            f"expected at least one probe sample per rank, got {n} samples for "
            f"{group.size} ranks; pass a larger probe or measure on rank 0 only "
            "(shard_probe=False)"
        )
    return rows(x, _blocks(n, group.size)[group.rank])
