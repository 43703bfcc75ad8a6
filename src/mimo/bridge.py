"""One edge's embeddings forward and their gradients back, between two module layouts (DESIGN §3 "The bridge").

Per micro-batch an edge src → dst carries a 2-D tensor [n_tokens, H] in sample order plus the token count of
each sample. The training step calls each micro-batch itself, so it decides the order. One class per kind,
chosen by `make_bridge`:

- `HeterogeneousBridge` (disjoint spans): one leader per DP replica on each side (TP rank 0 of src's last and dst's
  first pipeline stage) talks point-to-point with global ranks, counts first, then rows; fan-in and fan-out
  follow the replicas' sample ranges; the receiving leader broadcasts in its TP × CP group (under context
  parallelism, given each CP rank's rows, it scatters: each rank gets only its CP rank's chunks' rows). Sends never
  block (their tensors are kept until the works complete); receives do.
- `ColocatedBridge` (same span): the whole span re-partitions with collectives: an all-gather of each rank's rows,
  padded to the longest replica, sliced per dst replica; backward is the matching reduce-scatter. Under context
  parallelism (given each dst replica's chunk rows) one all-to-all instead sends each CP rank only its chunks' rows.
- `HomogeneousBridge` (same span and layout): nothing moves.

Only each dst replica's TP leader sends a gradient back: its TP peers hold identical copies (TP all-reduces
the input gradient), so sending theirs too would count it twice. Under context parallelism each CP rank ends up
with the rows its sequence chunks hold (`mimo.context_parallel`), so its gradient is its chunks' share, and the
shares meet at the leader: heterogeneous, gathered from the scatter's ranks (or, for a caller that gave no chunk
rows, every CP rank got all rows and a reduce over CP sums them); colocated, each CP rank's TP rank 0 sends its
rows' gradient back through the span's all-to-all to the src ranks that own them (`mimo.exchange.RowRoute`).

An edge whose src module has nothing to train (a frozen encoder and projection: `carries_grad` False, agreed by
every rank) moves no gradient: the receivers' rows need none, stage 0 sends none back and the encoder ranks wait
for none (heterogeneous: no message; colocated: no reduce-scatter); each micro-batch's state is dropped instead.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from mimo.exchange import RowRoute
from mimo.grid import ModuleGrid, P2PGroups
from mimo.models.transfer import to_device

Kind = Literal["homogeneous", "colocated", "heterogeneous"]
Piece = tuple[int, int, int]  # (peer replica or rank, start, stop)

# A gloo tag: 16 bits of edge, 13 of micro-batch, 2 of message kind (< 2**31, as gloo requires).
_COUNTS, _ROWS, _GRAD = 0, 1, 2
_KIND_BITS, _MICROBATCH_BITS, _EDGE_BITS = 2, 13, 16


def bridge_kind(src: ModuleGrid, dst: ModuleGrid) -> Kind:
    """heterogeneous (spans differ), homogeneous (same span and layout, `same_layout`; a pipelined encoder never is:
    its last stage is not the language model's first) or colocated (same span)."""
    if src.span != dst.span:
        return "heterogeneous"
    homogeneous = src.config.same_layout(dst.config) and src.config.pipeline_model_parallel_size == 1
    return "homogeneous" if homogeneous else "colocated"


def sample_overlaps(replica: int, own: int, other: int) -> list[Piece]:
    """(peer, start, stop) for each replica of the other side (`other` samples each) that shares samples with
    `replica` (`own` samples each); start and stop count from `replica`'s first sample."""
    first, last = replica * own, (replica + 1) * own
    return [(p, max(first, p * other) - first, min(last, (p + 1) * other) - first)
            for p in range(first // other, (last - 1) // other + 1)]


def row_offsets(counts: Tensor) -> list[int]:
    """Where each sample's rows start, plus the total: [0, c0, c0 + c1, ...]."""
    return [0, *torch.cumsum(counts, 0).tolist()]


@dataclass
class _Sent:
    """What a sender keeps between forward and backward of one micro-batch."""

    embeddings: Tensor  # with autograd history
    counts: Tensor  # CPU int64, one per sample of this rank's src replica


class Bridge(ABC):
    """Moves one edge's embeddings forward and their gradients back, micro-batch by micro-batch.

    One subclass per deployment kind (`make_bridge` picks it). The training step drives it through four
    questions: does this edge encode inside the language forward (`encodes_inside_language_forward`);
    stage 0's rows of micro-batch m (`receive`); hand their gradient back (`return_grad`); run the
    encoder's backward of m (`run_encoder_backward`). `forward` / `backward` are the transport itself."""

    kind: ClassVar[Kind]
    encodes_inside_language_forward: ClassVar[bool] = False  # stage 0 encodes m when its forward needs it
    delivers_chunks: ClassVar[bool] = False  # `receive(..., chunk_rows)` hands each CP rank only its chunks' rows
    uses_microbatch_tokens: ClassVar[bool] = False  # `microbatch_tokens` spare moving (and reading) counts

    def __init__(self, src: ModuleGrid, dst: ModuleGrid, micro_batch_size: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", p2p_groups: P2PGroups | None = None,
                 carries_grad: bool = True) -> None:
        """Plan the edge from the two grids; no communication happens here. `p2p_groups` (world-wide, one
        per direction) keep forward rows and backward gradients on separate NCCL streams. `carries_grad`: whether
        src trains (the same on every rank), so that its embeddings' gradient must travel back."""
        self.src, self.dst = src, dst
        self.carries_grad = carries_grad
        self.p2p_groups = p2p_groups
        self.name = f"{src.name} -> {dst.name}"
        self.micro_batch_size, self.hidden_size = micro_batch_size, hidden_size
        self.dtype, self.device = dtype, torch.device(device)
        self._src_samples = self._samples_per_replica(src)
        self._dst_samples = self._samples_per_replica(dst)
        self.is_sender = src.is_last_stage()
        self.is_receiver = dst.is_first_stage()
        self._src_replica = src.coord.dp if self.is_sender else -1
        self._dst_replica = dst.coord.dp if self.is_receiver else -1
        self._is_src_leader = self.is_sender and src.is_tp_leader()
        self._is_dst_leader = self.is_receiver and dst.is_tp_leader()
        self._holds_grad_share = self.is_receiver and dst.coord.tp == 0  # TP rank 0 of each CP rank
        self._edge_tag = zlib.crc32(self.name.encode()) % 2**_EDGE_BITS
        self._sent: dict[int, _Sent] = {}
        self._received: dict[int, Tensor] = {}  # receiver: its counts per micro-batch
        self._leaves: dict[int, Tensor] = {}  # receiver: the rows `receive` handed out, whose .grad goes back
        self._pending: dict[int, list[tuple[dist.Work, Tensor]]] = {}  # sends in flight, tensors kept alive
        self._chunks: dict[int, list[Tensor]] = {}  # receiver under CP: each CP rank's rows, until the gradient

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, sender={self.is_sender}, receiver={self.is_receiver})"

    # -- the transport ------------------------------------------------------------------------
    def forward(self, microbatch: int, embeddings: Tensor | None = None, tokens_per_sample: Tensor | None = None,
                microbatch_tokens: Tensor | None = None,
                replica_chunks: Callable[[int], list[Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
        """Senders pass their replica's embeddings and counts; receivers get (rows of their dst replica's
        samples, their counts on CPU), the rows a leaf with requires_grad unless homogeneous; others None.

        Where `uses_microbatch_tokens`, every rank of the edge passes `microbatch_tokens`, the counts of the
        whole micro-batch (every rank holds the global batch), or none does: that spares moving the counts, and
        the host sync of reading them, per micro-batch (colocated: the all-gather; heterogeneous: the message).
        Colocated under context parallelism, every rank of the span passes `replica_chunks` (dst replica → which of
        its rows each CP rank's sequence chunks hold, on the host; `context_parallel.chunk_rows`) or none does:
        then each receiver gets only its CP rank's rows, in that order (the counts stay the replica's)."""
        counts = self._accept(microbatch, embeddings, tokens_per_sample)
        if not self._takes_part:
            return None
        return self._forward(microbatch, embeddings, counts, microbatch_tokens, replica_chunks)

    def backward(self, microbatch: int, grad: Tensor | None = None) -> None:
        """Receivers pass their leaf's grad (None means zeros); senders get their embeddings' gradient and
        run autograd through them. Colocated: every rank of the span calls it, in the same order."""
        if grad is not None and not self.is_receiver:
            raise ValueError(f"bridge {self.name}, micro-batch {microbatch}: rank {self.dst.rank} is not a "
                             f"receiver (first pipeline stage of '{self.dst.name}') but was given a grad")
        if not self.carries_grad:  # src trains nothing: no gradient travels, no rank waits for one
            self._release(microbatch)
        elif self._takes_part:
            self._backward(microbatch, grad)

    @property
    def _takes_part(self) -> bool:
        """Whether this rank moves anything of the edge: its senders and receivers (colocated: the whole span)."""
        return self.is_sender or self.is_receiver

    def _release(self, microbatch: int) -> None:
        """Drop what forward kept of micro-batch m (an edge that carries no gradient)."""
        for store in self._kept():
            store.pop(microbatch, None)

    def _kept(self) -> list[dict[int, Any]]:
        """The per-micro-batch state forward keeps until backward."""
        return [self._sent, self._received, self._leaves, self._chunks]

    def wait(self) -> None:
        """Complete every send still in flight (call at the end of a step)."""
        for microbatch in list(self._pending):
            self._wait_sends(microbatch)

    @abstractmethod
    def _forward(self, microbatch: int, embeddings: Tensor | None, counts: Tensor | None,
                 microbatch_tokens: Tensor | None,
                 replica_chunks: Callable[[int], list[Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
        """The kind's forward on a sender or receiver (inputs already checked)."""

    @abstractmethod
    def _backward(self, microbatch: int, grad: Tensor | None) -> None:
        """The kind's backward on a sender or receiver."""

    def p2p_pairs(self) -> list[tuple[int, int]]:
        """The rank pairs this edge sends between point to point (none but heterogeneous). Known on every rank,
        so all can open the same channels before the first step (`P2PGroups.warm_up`)."""
        return []

    # -- what the training step asks ----------------------------------------------------------
    def receive(self, microbatch: int, microbatch_tokens: Tensor | None = None,
                chunk_rows: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Stage 0 of dst: micro-batch m's rows (a leaf, kept for `return_grad`) and counts on CPU. Under context
        parallelism a bridge that `delivers_chunks`, given `chunk_rows` (per CP rank, which of the replica's rows
        its sequence chunks hold, on the host), hands each CP rank only those rows, in that order; the counts stay
        the replica's."""
        if chunk_rows is not None and self.delivers_chunks:
            self._chunks[microbatch] = chunk_rows
        rows, counts = self._deliver(microbatch, microbatch_tokens)
        self._leaves[microbatch] = rows
        return rows, counts

    def return_grad(self, microbatch: int) -> None:
        """Stage 0 of dst, after micro-batch m's backward: hand the gradient of `receive`'s rows back."""
        leaf = self._leaves.pop(microbatch, None)
        self._hand_back(microbatch, leaf.grad if leaf is not None else None)

    def run_encoder_backward(self, microbatch: int) -> None:
        """Encoder ranks: get micro-batch m's embedding gradient and run the encoder's backward."""
        self.backward(microbatch)

    @abstractmethod
    def _deliver(self, microbatch: int, microbatch_tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        """Stage 0's rows and counts of micro-batch m."""

    @abstractmethod
    def _hand_back(self, microbatch: int, grad: Tensor | None) -> None:
        """What the kind does with stage 0's gradient of micro-batch m."""

    # -- checks -------------------------------------------------------------------------------
    def _samples_per_replica(self, grid: ModuleGrid) -> int:
        """B / DP of `grid`, or a clear error if the micro-batch does not split evenly."""
        dp = grid.size("dp")
        if self.micro_batch_size < 1 or self.micro_batch_size % dp:
            raise ValueError(f"bridge {self.name}: micro_batch_size {self.micro_batch_size} must be a positive "
                             f"multiple of '{grid.name}' data_parallel_size {dp}")
        return self.micro_batch_size // dp

    def _accept(self, microbatch: int, embeddings: Tensor | None, counts: Tensor | None) -> Tensor | None:
        """Check a sender's inputs and keep them for backward; returns the counts on CPU."""
        where = f"bridge {self.name}, micro-batch {microbatch}"
        if not self.is_sender:
            if embeddings is not None or counts is not None:
                raise ValueError(f"{where}: rank {self.src.rank} does not hold '{self.src.name}' (its last "
                                 f"pipeline stage) but was given embeddings or tokens_per_sample")
            return None
        if embeddings is None or counts is None:
            raise ValueError(f"{where}: a sender must pass both embeddings and tokens_per_sample")
        if microbatch in self._sent:
            raise RuntimeError(f"{where}: forward was already called for this micro-batch without backward")
        counts = self._check_counts(where, counts)
        self._check_embeddings(where, embeddings, int(counts.sum()))
        return counts

    def _check_counts(self, where: str, counts: Tensor) -> Tensor:
        """tokens_per_sample as CPU int64, or a ValueError: one non-negative count per replica sample."""
        expected = (self._src_samples,)
        if tuple(counts.shape) != expected or counts.is_floating_point() or counts.is_complex():
            raise ValueError(f"{where}: tokens_per_sample must be an integer tensor with one count per sample of "
                             f"this '{self.src.name}' replica: expected shape {expected}, got "
                             f"{tuple(counts.shape)} ({counts.dtype})")
        counts = counts.detach().to("cpu", torch.long)
        if (counts < 0).any():
            raise ValueError(f"{where}: tokens_per_sample must be >= 0, got {counts.tolist()}")
        return counts

    def _check_microbatch_tokens(self, microbatch: int, full: Tensor, counts: Tensor) -> Tensor:
        """The whole micro-batch's counts as CPU int64, or a ValueError unless this replica's slice is `counts`."""
        where = f"bridge {self.name}, micro-batch {microbatch}"
        full = full.detach().to("cpu", torch.long)
        start = self._src_replica * self._src_samples
        if full.shape != (self.micro_batch_size,) or not torch.equal(full[start:start + self._src_samples], counts):
            raise ValueError(f"{where}: microbatch_tokens must hold the counts of all {self.micro_batch_size} "
                             f"samples, with this '{self.src.name}' replica's tokens_per_sample {counts.tolist()} "
                             f"at [{start}, {start + self._src_samples}); got {full.tolist()}")
        return full

    def _whole_microbatch(self, microbatch: int, full: Tensor) -> Tensor:
        """A receiver's `microbatch_tokens` as CPU int64, or a ValueError unless it has one count per sample."""
        full = full.detach().to("cpu", torch.long)
        if full.shape != (self.micro_batch_size,):
            raise ValueError(f"bridge {self.name}, micro-batch {microbatch}: microbatch_tokens must hold the counts of "
                             f"all {self.micro_batch_size} samples, got shape {tuple(full.shape)}")
        return full

    def _check_embeddings(self, where: str, embeddings: Tensor, rows: int) -> None:
        """A ValueError unless embeddings are [sum of counts, hidden_size] of the bridge's dtype."""
        expected = (rows, self.hidden_size)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"{where}: embeddings must be [sum of tokens_per_sample, hidden_size]: expected "
                             f"{expected}, got {tuple(embeddings.shape)}")
        if embeddings.dtype != self.dtype:
            raise ValueError(f"{where}: embeddings must be {self.dtype}, got {embeddings.dtype}")

    def _grad_or_zeros(self, microbatch: int, grad: Tensor | None, rows: int) -> Tensor:
        """The receiver's gradient (zeros for None), checked against the rows it received."""
        shape = (rows, self.hidden_size)
        if grad is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        if tuple(grad.shape) != shape:
            raise ValueError(f"bridge {self.name}, micro-batch {microbatch}: grad must have the received "
                             f"embeddings' shape: expected {shape}, got {tuple(grad.shape)}")
        return grad.detach().to(self.dtype).contiguous()

    def _pop(self, store: dict[int, Any], microbatch: int) -> Any:
        """The state forward kept for `microbatch`, or a clear error if forward did not run."""
        if microbatch not in store:
            raise RuntimeError(f"bridge {self.name}, micro-batch {microbatch}: backward without forward")
        return store.pop(microbatch)

    # -- rank arithmetic ------------------------------------------------------------------------
    def _src_leader(self, replica: int) -> int:
        """Global rank of src replica `replica`'s leader: TP/CP rank 0 of the last pipeline stage."""
        return int(self.src.ranks[-1, replica, 0, 0])

    def _dst_leader(self, replica: int) -> int:
        """Global rank of dst replica `replica`'s leader: TP/CP rank 0 of the first pipeline stage."""
        return int(self.dst.ranks[0, replica, 0, 0])

    def _wait_sends(self, microbatch: int) -> None:
        """Complete and release the sends of `microbatch`."""
        for work, _ in self._pending.pop(microbatch, []):
            work.wait()


class HeterogeneousBridge(Bridge):
    """Disjoint spans: TP leaders talk point to point (counts, then rows; gradients back), fan-in and
    fan-out by sample overlap; each receiving leader broadcasts in its TP group."""

    kind = "heterogeneous"
    uses_microbatch_tokens = True
    delivers_chunks = True

    def p2p_pairs(self) -> list[tuple[int, int]]:
        """(src leader, dst leader) of every pair of replicas that share samples."""
        return [(self._src_leader(i), self._dst_leader(j)) for i in range(self.src.size("dp"))
                for j, _, _ in sample_overlaps(i, self._src_samples, self._dst_samples)]

    def _forward(self, microbatch: int, embeddings: Tensor | None, counts: Tensor | None,
                 microbatch_tokens: Tensor | None,
                 replica_chunks: Callable[[int], list[Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
        """Senders post their rows at once (and the counts, unless the receivers know them); receivers block
        until theirs arrived."""
        known = None
        if microbatch_tokens is not None:
            known = self._check_microbatch_tokens(microbatch, microbatch_tokens, counts) if self.is_sender else \
                self._whole_microbatch(microbatch, microbatch_tokens)
        if self.is_sender:
            self._sent[microbatch] = _Sent(embeddings, counts)
            self._send_rows(microbatch, send_counts=known is None)
        return self._receive_rows(microbatch, known) if self.is_receiver else None

    def _backward(self, microbatch: int, grad: Tensor | None) -> None:
        """Receivers post their gradient; senders receive theirs and run the encoder's backward."""
        if self.is_receiver:
            self._send_grad(microbatch, grad)
        if self.is_sender:
            self._receive_grad(microbatch)

    def _deliver(self, microbatch: int, microbatch_tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        """Receive micro-batch m now (the encoders sent it in their phase)."""
        return self.forward(microbatch, microbatch_tokens=microbatch_tokens)

    def _hand_back(self, microbatch: int, grad: Tensor | None) -> None:
        """Send it at once, so the encoder's backward of m can start."""
        self.backward(microbatch, grad)

    def _tag(self, microbatch: int, kind: int) -> int:
        """A gloo tag unique per edge, micro-batch (mod 2**13) and message kind."""
        mb = microbatch % 2**_MICROBATCH_BITS
        return (self._edge_tag << (_MICROBATCH_BITS + _KIND_BITS)) | (mb << _KIND_BITS) | kind

    def _isend(self, tensor: Tensor, peer: int, microbatch: int, kind: int) -> None:
        """Start a non-blocking send; the tensor stays referenced until `_wait_sends` completes it."""
        if tensor.numel():
            work = dist.isend(tensor, dst=peer, group=self._p2p_group(kind), tag=self._tag(microbatch, kind))
            self._pending.setdefault(microbatch, []).append((work, tensor))

    def _recv(self, buffer: Tensor, pieces: list[Piece], microbatch: int, kind: int) -> None:
        """Fill rows [start, stop) of `buffer` from each (peer rank, start, stop); block until all arrived."""
        tag = self._tag(microbatch, kind)
        group = self._p2p_group(kind)
        works = [dist.irecv(buffer[a:b], src=peer, group=group, tag=tag) for peer, a, b in pieces if b > a]
        for work in works:
            work.wait()

    def _p2p_group(self, kind: int) -> dist.ProcessGroup | None:
        """The world-wide group of this message's direction (global rank = group rank), or the default."""
        return P2PGroups.pick(self.p2p_groups, backward=kind == _GRAD)

    @staticmethod
    def _broadcast(tensor: Tensor, group: dist.ProcessGroup | None, leader: int) -> None:
        """Broadcast from global rank `leader` within `group` (skipped for one rank or no data)."""
        if group is not None and dist.get_world_size(group) > 1 and tensor.numel():
            dist.broadcast(tensor, src=leader, group=group)

    def _send_rows(self, microbatch: int, send_counts: bool = True) -> None:
        """Src leader: post counts (unless the receivers know them), then rows, to every dst leader sharing
        samples; returns at once."""
        if not self._is_src_leader:
            return
        sent = self._sent[microbatch]
        offsets = row_offsets(sent.counts)
        rows = sent.embeddings.detach().contiguous()
        counts = sent.counts.to(self.device) if send_counts else None  # from pageable memory: a host sync
        for j, a, b in sample_overlaps(self._src_replica, self._src_samples, self._dst_samples):
            if counts is not None:
                self._isend(counts[a:b], self._dst_leader(j), microbatch, _COUNTS)
            self._isend(rows[offsets[a]:offsets[b]], self._dst_leader(j), microbatch, _ROWS)

    def _receive_rows(self, microbatch: int, full: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Dst first stage: the leader receives from its src leaders, then broadcasts counts (unless `full`, the
        whole micro-batch's, is known here) and rows."""
        pieces = [(self._src_leader(i), a, b)
                  for i, a, b in sample_overlaps(self._dst_replica, self._dst_samples, self._src_samples)]
        leader, group = self._dst_leader(self._dst_replica), self.dst.get_group("tp_cp")
        if full is None:
            counts = self._receive_counts(microbatch, pieces, group, leader)
        else:
            start = self._dst_replica * self._dst_samples
            counts = full[start:start + self._dst_samples]
        offsets = row_offsets(counts)
        rows = torch.empty(offsets[-1], self.hidden_size, dtype=self.dtype, device=self.device)
        if self._is_dst_leader:
            self._recv(rows, [(p, offsets[a], offsets[b]) for p, a, b in pieces], microbatch, _ROWS)
        self._received[microbatch] = counts
        if microbatch in self._chunks:
            rows = self._scatter_chunks(rows, self._chunks[microbatch], group, leader)
            return rows.requires_grad_(self.carries_grad), counts
        self._broadcast(rows, group, leader)
        return rows.requires_grad_(self.carries_grad), counts

    def _group_cp_ranks(self, group: dist.ProcessGroup) -> list[int]:
        """The CP coordinate of each rank of the dst TP × CP group, in group order."""
        return [self.dst.coordinates(dist.get_global_rank(group, i)).cp for i in range(dist.get_world_size(group))]

    def _scatter_chunks(self, rows: Tensor, chunks: list[Tensor], group: dist.ProcessGroup, leader: int) -> Tensor:
        """The leader sends each rank of its TP × CP group the rows its CP rank's chunks hold (padded to the
        longest, one scatter); this rank's rows."""
        width = max(len(c) for c in chunks)
        mine = torch.empty(width, self.hidden_size, dtype=self.dtype, device=self.device)
        pieces = None
        if self._is_dst_leader:
            pieces = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
            for piece, cp in zip(pieces, self._group_cp_ranks(group), strict=True):
                piece[:len(chunks[cp])] = rows.index_select(0, to_device(chunks[cp], self.device))
        if width:
            dist.scatter(mine, pieces, src=leader, group=group)
        return mine[:len(chunks[self.dst.coord.cp])].clone()

    def _gather_chunks(self, grad: Tensor, chunks: list[Tensor], rows: int) -> Tensor | None:
        """The gradients of every CP rank's rows gathered to the leader (one gather over TP × CP) and put back in
        the replica's row order; None off the leader."""
        group, leader = self.dst.get_group("tp_cp"), self._dst_leader(self._dst_replica)
        width = max(len(c) for c in chunks)
        mine = torch.zeros(width, self.hidden_size, dtype=self.dtype, device=self.device)
        mine[:grad.shape[0]] = grad
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))] if self._is_dst_leader \
            else None
        if width:
            dist.gather(mine, gathered, dst=leader, group=group)
        if not self._is_dst_leader:
            return None
        full = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        for i, cp in enumerate(self._group_cp_ranks(group)):
            if self.dst.coordinates(dist.get_global_rank(group, i)).tp == 0:  # TP peers hold copies
                full.index_copy_(0, to_device(chunks[cp], self.device), gathered[i][:len(chunks[cp])])
        return full

    def _receive_counts(self, microbatch: int, pieces: list[Piece], group: dist.ProcessGroup | None,
                        leader: int) -> Tensor:
        """This dst replica's per-sample counts from its src leaders, broadcast in the TP group (CPU int64)."""
        counts = torch.empty(self._dst_samples, dtype=torch.long, device=self.device)
        if self._is_dst_leader:
            self._recv(counts, pieces, microbatch, _COUNTS)
        self._broadcast(counts, group, leader)
        return counts.cpu()

    def _send_grad(self, microbatch: int, grad: Tensor | None) -> None:
        """Dst leader: post each src replica's slice of the replica's gradient (`_replica_grad`); other TP and CP
        ranks send nothing."""
        offsets = row_offsets(self._pop(self._received, microbatch))
        grad = self._replica_grad(microbatch, grad, offsets[-1])
        if not self._is_dst_leader:
            return
        for i, a, b in sample_overlaps(self._dst_replica, self._dst_samples, self._src_samples):
            self._isend(grad[offsets[a]:offsets[b]], self._src_leader(i), microbatch, _GRAD)

    def _replica_grad(self, microbatch: int, grad: Tensor | None, rows: int) -> Tensor | None:
        """The gradient of the replica's `rows` rows, whole on the leader: as received without CP; under CP summed
        over the CP ranks (a reduce) where each received every row, or gathered from each CP rank's chunks' rows
        where each received only those (`receive`'s chunk_rows; then None off the leader)."""
        chunks = self._chunks.pop(microbatch, None)
        if chunks is not None:
            mine = self._grad_or_zeros(microbatch, grad, len(chunks[self.dst.coord.cp]))
            return self._gather_chunks(mine, chunks, rows)
        grad = self._grad_or_zeros(microbatch, grad, rows)
        if self._holds_grad_share and self.dst.size("cp") > 1 and grad.numel():
            grad = grad.clone()
            dist.reduce(grad, dst=self._dst_leader(self._dst_replica), group=self.dst.get_group("cp"))
        return grad

    def _receive_grad(self, microbatch: int) -> None:
        """Src: the leader receives the gradient from its dst leaders and broadcasts it; all run backward."""
        sent: _Sent = self._pop(self._sent, microbatch)
        offsets = row_offsets(sent.counts)
        grad = torch.empty(offsets[-1], self.hidden_size, dtype=self.dtype, device=self.device)
        if self._is_src_leader:
            pieces = sample_overlaps(self._src_replica, self._src_samples, self._dst_samples)
            spans = [(self._dst_leader(j), offsets[a], offsets[b]) for j, a, b in pieces]
            self._recv(grad, spans, microbatch, _GRAD)
            self._wait_sends(microbatch)  # the gradient came back, so the forward sends are done
        self._broadcast(grad, self.src.get_group("tp"), self._src_leader(self._src_replica))
        _backward(sent.embeddings, grad)


class ColocatedBridge(Bridge):
    """The same span, different layouts: the span re-partitions rows with a padded all-gather and
    gradients with the matching reduce-scatter; every rank of the span calls both, in the same order."""

    kind = "colocated"
    uses_microbatch_tokens = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counts: dict[int, Tensor] = {}  # per-sample counts of the whole micro-batch (CPU)
        self._delivered: dict[int, tuple[Tensor, Tensor]] = {}  # receiver: what forward gathered, until receive
        self._grads: dict[int, Tensor | None] = {}  # receiver: stage 0's gradients, until the collective
        self._routes: dict[int, tuple[RowRoute, int]] = {}  # under CP: the gradient exchange, rows received

    def _forward(self, microbatch: int, embeddings: Tensor | None, counts: Tensor | None,
                 microbatch_tokens: Tensor | None,
                 replica_chunks: Callable[[int], list[Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
        """Keep the sender's inputs (and the micro-batch's counts, if given), then the all-gather (under context
        parallelism, given `replica_chunks`, the all-to-all of each CP rank's rows). A rank of the span off the
        encoder's last pipeline stage sends no rows (None) but takes part in the collectives."""
        self._sent[microbatch] = _Sent(embeddings, counts)
        if microbatch_tokens is not None:
            self._counts[microbatch] = (self._check_microbatch_tokens(microbatch, microbatch_tokens, counts)
                                        if self.is_sender else self._whole_microbatch(microbatch, microbatch_tokens))
        if replica_chunks is not None and self.dst.size("cp") > 1:
            out = self._chunks_forward(microbatch, replica_chunks)
        else:
            out = self._colocated_forward(microbatch)
        if out is not None:
            self._delivered[microbatch] = out
        return out

    @property
    def _takes_part(self) -> bool:
        """Every rank of the span: the collectives need them all (a pipelined encoder's earlier stages too)."""
        return self.src.rank in self.src.span

    def _backward(self, microbatch: int, grad: Tensor | None) -> None:
        self._delivered.pop(microbatch, None)
        self._colocated_backward(microbatch, grad)

    def _kept(self) -> list[dict[int, Any]]:
        return [*super()._kept(), self._counts, self._delivered, self._grads, self._routes]

    def _deliver(self, microbatch: int, microbatch_tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        """What the all-gather of the encoders' phase delivered for micro-batch m."""
        return self._pop(self._delivered, microbatch)

    def _hand_back(self, microbatch: int, grad: Tensor | None) -> None:
        """Keep it: the reduce-scatter needs every rank of the span at the same micro-batch."""
        self._grads[microbatch] = grad

    def run_encoder_backward(self, microbatch: int) -> None:
        """The reduce-scatter of micro-batch m's gradients (stage 0's, kept by `return_grad`), then backward."""
        self.backward(microbatch, self._grads.pop(microbatch, None))

    def _span_group(self) -> dist.ProcessGroup:
        """The span's process group (the same span for both modules)."""
        return self.src.get_group("span")

    def _replica_rows(self, offsets: list[int], replica: int, samples: int) -> tuple[int, int]:
        """Rows [lo, hi) of the whole micro-batch that a replica of `samples` samples owns."""
        return offsets[replica * samples], offsets[(replica + 1) * samples]

    def _colocated_counts(self, counts: Tensor) -> Tensor:
        """Counts of the whole micro-batch (CPU), from an all-gather of every span rank's replica counts."""
        span = self.src.span
        gathered = [torch.empty_like(counts) for _ in span]
        dist.all_gather(gathered, counts, group=self._span_group())
        return torch.cat([gathered[self._src_leader(i) - span.start] for i in range(self.src.size("dp"))]).cpu()

    def _max_rows(self, offsets: list[int]) -> int:
        """The most rows any src replica holds (every rank's slot in the collectives has this size)."""
        sizes = (self._replica_rows(offsets, i, self._src_samples) for i in range(self.src.size("dp")))
        return max(hi - lo for lo, hi in sizes)

    def _slots(self, width: int) -> Tensor:
        """One zeroed [width, H] slot per span rank, for the colocated collectives."""
        return torch.zeros(len(self.src.span), width, self.hidden_size, dtype=self.dtype, device=self.device)

    def _colocated_forward(self, microbatch: int) -> tuple[Tensor, Tensor] | None:
        """Every span rank all-gathers its rows (padded); receivers slice their dst replica's rows."""
        sent = self._sent[microbatch]
        offsets = self._micro_counts(microbatch)
        full = self._counts[microbatch]
        slots = self._slots(self._max_rows(offsets))
        if slots.shape[1]:
            mine = torch.zeros_like(slots[0])
            if sent.embeddings is not None:
                mine[:sent.embeddings.shape[0]] = sent.embeddings.detach()
            dist.all_gather(list(slots.unbind(0)), mine, group=self._span_group())
        if not self.is_receiver:
            return None
        start = self._dst_replica * self._dst_samples
        counts = self._received[microbatch] = full[start:start + self._dst_samples]
        return self._gathered_rows(slots, offsets).requires_grad_(self.carries_grad), counts

    def _gathered_rows(self, slots: Tensor, offsets: list[int]) -> Tensor:
        """This receiver's dst replica's rows, cut from the src leaders' gathered slots."""
        lo, hi = self._replica_rows(offsets, self._dst_replica, self._dst_samples)
        pieces = []
        for i in range(self.src.size("dp")):
            lo_i, hi_i = self._replica_rows(offsets, i, self._src_samples)
            a, b = max(lo, lo_i), min(hi, hi_i)
            if a < b:
                pieces.append(slots[self._src_leader(i) - self.src.span.start, a - lo_i:b - lo_i])
        return torch.cat(pieces) if pieces else slots.new_empty(0, self.hidden_size)

    def _micro_counts(self, microbatch: int) -> list[int]:
        """Row offsets of micro-batch m's samples (the counts gathered first if the caller did not pass them)."""
        if microbatch not in self._counts:  # a rank off the encoder's last stage adds zeros (its slot is unread)
            counts = self._sent[microbatch].counts
            counts = counts if counts is not None else torch.zeros(self._src_samples, dtype=torch.long)
            self._counts[microbatch] = self._colocated_counts(counts.to(self.device))
        return row_offsets(self._counts[microbatch])

    def _chunks_forward(self, microbatch: int, replica_chunks: Callable[[int], list[Tensor]]
                        ) -> tuple[Tensor, Tensor] | None:
        """Under context parallelism: one all-to-all over the span in which each src replica's leader sends every
        first-stage dst rank the rows of its replica that the dst rank's CP chunks hold (`_plan_chunks`)."""
        offsets = self._micro_counts(microbatch)
        forward, backward = self._plan_chunks(offsets, replica_chunks)
        embeddings = self._sent[microbatch].embeddings  # None off a pipelined encoder's last stage: no rows held
        none = torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        rows = forward(embeddings.detach() if embeddings is not None else none, self._span_group())
        self._routes[microbatch] = backward, rows.shape[0]
        if not self.is_receiver:
            return None
        start = self._dst_replica * self._dst_samples
        counts = self._received[microbatch] = self._counts[microbatch][start:start + self._dst_samples]
        return rows.requires_grad_(self.carries_grad), counts

    def _plan_chunks(self, offsets: list[int], replica_chunks: Callable[[int], list[Tensor]]
                     ) -> tuple[RowRoute, RowRoute]:
        """The forward route (src leaders hold their replica's rows; each first-stage dst rank needs its CP rank's
        chunks' rows) and the backward one (each such rank's TP rank 0 holds their gradient, TP peers hold copies;
        every src rank of its last pipeline stage needs its replica's rows' gradient, to run the encoder's backward).
        Rows are numbered over the micro-batch; only the dst replicas that share samples with this rank's are asked
        (`RowRoute.plan`)."""
        asked = ({p for p, _, _ in sample_overlaps(self._src_replica, self._src_samples, self._dst_samples)}
                 if self.is_sender else set())
        asked.add(self._dst_replica)
        wanted = {d: [rows + self._replica_rows(offsets, d, self._dst_samples)[0] for rows in replica_chunks(d)]
                  for d in asked if d >= 0}
        none = torch.zeros(0, dtype=torch.long)
        held, needed, grad_held, grad_needed = [], [], [], []
        for r in self.src.span:
            src, dst = self.src.coordinates(r), self.dst.coordinates(r)
            replica = torch.arange(*self._replica_rows(offsets, src.dp, self._src_samples))
            want = wanted[dst.dp][dst.cp] if self.dst.is_first_stage(r) and dst.dp in wanted else none
            held.append(replica if r == self._src_leader(src.dp) else none)
            needed.append(want)
            grad_held.append(want if dst.tp == 0 else none)
            grad_needed.append(replica if self.src.is_last_stage(r) else none)
        rank = self.src.rank - self.src.span.start
        return (RowRoute.plan(held, needed, rank, self.device),
                RowRoute.plan(grad_held, grad_needed, rank, self.device))

    def _colocated_backward(self, microbatch: int, grad: Tensor | None) -> None:
        """Dst TP rank 0s (one per CP rank) place their gradient in each src rank's slot; a reduce-scatter
        delivers it, summed. Under context parallelism, the backward route sends each CP rank's rows' gradient
        straight to the src ranks of the replica that encoded them."""
        if microbatch in self._routes:
            self._chunks_backward(microbatch, grad)
            return
        sent: _Sent = self._pop(self._sent, microbatch)
        offsets = row_offsets(self._pop(self._counts, microbatch))
        width = self._max_rows(offsets)
        slots = self._slots(width)
        if self.is_receiver:
            self._pop(self._received, microbatch)
            lo, hi = self._replica_rows(offsets, self._dst_replica, self._dst_samples)
            grad = self._grad_or_zeros(microbatch, grad, hi - lo)
            if self._holds_grad_share:
                self._place(slots, grad, offsets, lo, hi)
        mine = torch.empty(width, self.hidden_size, dtype=self.dtype, device=self.device)
        if width:
            dist.reduce_scatter(mine, list(slots.unbind(0)), group=self._span_group())
        if sent.embeddings is not None:
            _backward(sent.embeddings, mine[:sent.embeddings.shape[0]])

    def _chunks_backward(self, microbatch: int, grad: Tensor | None) -> None:
        """The backward route of micro-batch m: each first-stage TP rank 0 sends its rows' gradient (zeros for None)
        to the src ranks owning them; every src rank runs the encoder's backward on its replica's rows."""
        sent: _Sent = self._pop(self._sent, microbatch)
        route, rows = self._pop(self._routes, microbatch)
        self._pop(self._counts, microbatch)
        block = torch.zeros(0, self.hidden_size, dtype=self.dtype, device=self.device)
        if self.is_receiver:
            self._pop(self._received, microbatch)
            if self._holds_grad_share:  # its TP peers hold copies
                block = self._grad_or_zeros(microbatch, grad, rows)
        grad = route(block, self._span_group())
        if sent.embeddings is not None:
            _backward(sent.embeddings, grad)

    def _place(self, slots: Tensor, grad: Tensor, offsets: list[int], lo: int, hi: int) -> None:
        """Copy the gradient of rows [lo, hi) into the slot of every span rank whose src replica owns them."""
        for r in self.src.span:
            lo_i, hi_i = self._replica_rows(offsets, self.src.coordinates(r).dp, self._src_samples)
            a, b = max(lo, lo_i), min(hi, hi_i)
            if a < b:
                slots[r - self.src.span.start, a - lo_i:b - lo_i] = grad[a - lo:b - lo]


class HomogeneousBridge(Bridge):
    """The same span and layout: nothing moves and autograd stays connected, so stage 0 encodes micro-batch m
    inside its forward and the language backward runs on into the encoder."""

    kind = "homogeneous"
    encodes_inside_language_forward = True

    def _forward(self, microbatch: int, embeddings: Tensor | None, counts: Tensor | None,
                 microbatch_tokens: Tensor | None,
                 replica_chunks: Callable[[int], list[Tensor]] | None = None) -> tuple[Tensor, Tensor] | None:
        return embeddings, counts

    def _backward(self, microbatch: int, grad: Tensor | None) -> None:
        """Nothing: the language backward already ran through the encoder."""

    def _deliver(self, microbatch: int, microbatch_tokens: Tensor | None) -> tuple[Tensor, Tensor]:
        raise RuntimeError(f"bridge {self.name} is homogeneous: stage 0 encodes micro-batch {microbatch} itself "
                           f"and passes the embeddings to forward")

    def _hand_back(self, microbatch: int, grad: Tensor | None) -> None:
        """Nothing: autograd is connected."""

    def run_encoder_backward(self, microbatch: int) -> None:
        """Nothing: the language backward already ran it."""


BRIDGES: dict[Kind, type[Bridge]] = {b.kind: b for b in (HeterogeneousBridge, ColocatedBridge, HomogeneousBridge)}


def make_bridge(src: ModuleGrid, dst: ModuleGrid, micro_batch_size: int, hidden_size: int, dtype: torch.dtype,
                device: torch.device | str = "cpu", p2p_groups: P2PGroups | None = None,
                carries_grad: bool = True) -> Bridge:
    """The bridge of the edge's kind (`bridge_kind`), planned from the two grids."""
    return BRIDGES[bridge_kind(src, dst)](src, dst, micro_batch_size, hidden_size, dtype, device, p2p_groups,
                                          carries_grad)



def _backward(embeddings: Tensor, grad: Tensor) -> None:
    """Backpropagate `grad` through the sender's embeddings (nothing to do if they carry no graph)."""
    if embeddings.requires_grad:
        torch.autograd.backward(embeddings, grad)
