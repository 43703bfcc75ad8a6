"""One training step of a MIMO model on every rank: encoders, bridges, the language pipeline, one update.

Every rank (stub ranks too) calls `MimoTrainer.train_step(batch)` with the same global batch and runs
the part it hosts, in three phases:
1. encoder ranks encode their DP replica's items micro-batch by micro-batch and hand each result to
   the bridge (heterogeneous: sent at once, so the language pipeline can start on micro-batch 0); images of
   different sizes are encoded split by patch count and exchanged back to their samples' replica first
   (`patch_balance`; a homogeneous encoder under CP: each replica's images over its CP ranks, each CP rank then
   given only its sequence chunks' rows);
2. language ranks run the 1F1B schedule; stage 0 takes each micro-batch's embeddings from the bridge
   and, on a heterogeneous edge, returns their gradient as soon as its backward is done;
3. encoder ranks run each micro-batch's backward as its gradient arrives (colocated: all ranks of the
   span exchange the gradients collectively first).
A homogeneous edge skips phases 1 and 3: stage 0 encodes micro-batch m when its forward needs it, and
the language backward runs on into the encoder, so only one micro-batch's encoder activations are alive
at a time (the memory of a plain loop).
Loss normalization (DESIGN §3): every rank backpropagates loss_sum / (label tokens of the whole global
batch), and every DP reduction sums (`mimo.distributed`), so gradients are those of the global mean.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mimo import weight_casts
from mimo.bridge import Bridge, make_bridge
from mimo.config import LANGUAGE
from mimo.context_parallel import ContextText, chunk_rows, split_text
from mimo.data import MimoBatch
from mimo.data.balance import RankSplit
from mimo.data.packing import LanguageText, PaddedText, TextLayout, sample_extents
from mimo.ddp_shards import local_tensor
from mimo.distributed import (
    ChunkGradients,
    align_gradients,
    no_sync_forward,
    prepare_backward,
    prepare_chunk_backward,
    reduces_by_chunk,
    unwrap,
    wrapped_modules,
)
from mimo.exchange import RowRoute
from mimo.grid import pipeline_pairs, seam_pairs
from mimo.infra import MimoModelInfra
from mimo.models import MimoModel, ModalityBatch
from mimo.models.transfer import to_device
from mimo.training.deepstack import DeepStackCarry
from mimo.training.encoder_pipeline import EncoderStages, StageTraining
from mimo.training.grad_scaler import GlobalGradScaler
from mimo.training.optim import OptimizerConfig, build_optimizers, build_schedulers, clip_grads, local_grad_sq
from mimo.training.patch_balance import (
    PatchBalance,
    chunk_route,
    images_of,
    split_images,
    split_replicas,
    step_imbalance,
)
from mimo.training.pipeline import Activation, PipelineSchedule, StageWork


@dataclass
class StepResult:
    """What a step reports on every rank: the global per-token loss, the token counts, the gradient norm.

    Over the global batch: `tokens` counts the samples' real tokens (each up to its last scored label or
    modality token, `sample_extents`: no padding, packed or not); `positions` the positions the language
    model computed (padding and a packed row's tail included); `label_tokens` the labels the loss scores
    (its divisor); `documents` each sample's length in packed rows, within which it attends (None: padded rows,
    `TextLayout.documents`)."""

    loss: float
    label_tokens: int
    tokens: int
    positions: int
    grad_norm: float
    lr: float
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # fp16: an overflow somewhere made every rank skip this update
    documents: tuple[int, ...] | None = None
    votes: tuple[float, ...] = ()  # the caller's `votes`, summed over every rank (`train_step`)
    # per modality of packed items on an encoder with DP > 1 (or of any items on a homogeneous encoder under CP):
    # max / mean patches per encoder rank (`PatchBalance`, `split_replicas`)
    patch_balance: dict[str, float] = field(default_factory=dict)


class MimoTrainer:
    """Runs training steps of a wrapped MIMO model (a stub rank's is empty) with its bridges, optimizers and
    schedules."""

    def __init__(
        self,
        model: MimoModel,
        infra: MimoModelInfra,
        *,
        hidden_size: int,
        global_batch_size: int,
        num_microbatches: int,
        optimizer: OptimizerConfig | None = None,
        clip_grad: float | None = 1.0,
        activation_dtype: torch.dtype = torch.float32,
        scaler: GlobalGradScaler | None = None,
        device: torch.device | str = "cpu",
        text_layout: TextLayout | None = None,
        embedding_widths: Mapping[str, int] | None = None,
    ) -> None:
        """Check the batch against every module's DP size, build the bridges and the optimizers.
        `text_layout` is how the language model reads a micro-batch's text: padded rows (default) or packed;
        `embedding_widths` a modality's embedding rows' width where it is not `hidden_size` (DeepStack's extra
        features ride with the tokens: `DecoderConfig.deepstack_layers`)."""
        self.model, self.infra, self.device = model, infra, torch.device(device)
        self.text_layout = text_layout or PaddedText()
        self.num_microbatches = num_microbatches
        self.global_batch_size = global_batch_size
        self.micro_batch_size = infra.config.validate_batch(global_batch_size, num_microbatches)
        self.hidden_size, self.activation_dtype, self.clip_grad = hidden_size, activation_dtype, clip_grad
        self.scaler = scaler  # fp16: one loss scale for the whole model (GlobalGradScaler)
        self.special_token_ids = dict(model.special_token_ids)
        self.wide_modality = _wide_modality(embedding_widths or {}, hidden_size)
        trained = self._trained_modules()
        self.bridges: dict[str, Bridge] = {
            src: make_bridge(infra.module_to_grid_map[src], infra.module_to_grid_map[dst], self.micro_batch_size,
                             (embedding_widths or {}).get(src, hidden_size), activation_dtype, self.device,
                             infra.p2p_groups, carries_grad=src in trained)
            for src, dst in infra.config.edges if dst == LANGUAGE}
        self.encoder_stages = self._encoder_stages()
        self.p2p_pairs = self._open_p2p_channels()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.optimizers = build_optimizers(model, self.optimizer_config)
        self.schedulers = build_schedulers(self.optimizers, self.optimizer_config)
        self.step_count = 0
        # the layers whose weight casts (float8, or autocast's) are made once a step (`cache_weight_casts`,
        # `mimo.weight_casts`): filled as a step starts, dropped after its optimizer step, when the weights change
        self.cached_casts = weight_casts.cached_layers(wrapped_modules(model).values())

    def _trained_modules(self) -> set[str]:
        """The modules with a parameter to train, agreed by every rank (one all-reduce, at build): a language rank
        need not host an encoder, yet its bridge must know whether the encoder's gradient travels back."""
        names = self.infra.config.module_names
        hosted = wrapped_modules(self.model)
        flags = torch.tensor([any(p.requires_grad for p in hosted[n].parameters()) if n in hosted else False
                              for n in names], dtype=torch.int32, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return {name for name, flag in zip(names, flags.tolist(), strict=True) if flag}

    def _open_p2p_channels(self) -> list[tuple[int, int]]:
        """Every rank pair the bridges and the pipelines send between, opened now (`P2PGroups.warm_up`),
        the interleaved ring's seam on its own groups: no NCCL communicator is created inside a step."""
        groups = self.infra.p2p_groups
        if groups is None:
            return []
        grids = self.infra.module_to_grid_map
        pairs = [pair for bridge in self.bridges.values() for pair in bridge.p2p_pairs()]
        pairs += [pair for grid in grids.values() for pair in pipeline_pairs(grid)]  # the encoders' pipelines too
        opened = groups.warm_up(pairs, self.device)
        if seam := seam_pairs(grids[LANGUAGE]):
            opened = sorted({*opened, *groups.warm_up(seam, self.device, groups.seam_groups)})
        return opened

    def _encoder_stages(self) -> dict[str, EncoderStages]:
        """This rank's stage of each hosted encoder split over pipeline stages (`encoder_pipeline`), each knowing
        which stages train (one all-gather over its pipeline group)."""
        stages = {}
        for index, name in enumerate(self.infra.config.module_names):
            grid = self.infra.module_to_grid_map[name]
            if name == LANGUAGE or name not in self.infra.participating_modules or grid.size("pp") == 1:
                continue
            sub = unwrap(self.model.modality_submodules[name])
            trains = any(p.requires_grad for p in sub.parameters())
            training = StageTraining.gather(trains, grid.get_group("pp"), self.device)
            stages[name] = EncoderStages(grid, index, training, self.activation_dtype, self.device,
                                         self.infra.p2p_groups)
        return stages

    # -- the step -----------------------------------------------------------------------------------------
    def train_step(self, batch: MimoBatch, votes: Callable[[], Sequence[float]] | None = None) -> StepResult:
        """Forward and backward of every micro-batch, then one clipped optimizer step on every module. `votes`:
        numbers the caller wants summed over the world (asked for just before the step's one all-reduce, which
        carries them: no collective or host sync of their own), returned in `StepResult.votes`."""
        if batch.num_samples != self.global_batch_size:
            raise ValueError(f"the batch has {batch.num_samples} samples, but the trainer was built for a "
                             f"global batch of {self.global_batch_size}")
        t0 = time.perf_counter()
        # the normalizer, from the batch every rank holds
        label_tokens = int(batch.num_label_tokens(self.special_token_ids))
        # each sample's kept positions, found once on the host ids: the text layout and the token counts read them
        extents = self._extent_shares(sample_extents(batch.input_ids, batch.labels, self.special_token_ids))
        splits = self._patch_splits(batch)
        self._state = _StepState(batch, label_tokens, extents, *self._prefetch(batch, extents, splits))
        seconds = self._state.seconds
        weight_casts.fill(self.cached_casts)  # valid for every micro-batch's forward, recomputation and backward
        hosted = self.infra.participating_modules
        inside = [n for n in hosted if n != LANGUAGE and self.bridges[n].encodes_inside_language_forward]
        encoded = [n for n in self.bridges if n in hosted and n not in inside]
        for name, microbatches in self._receive_order(encoded):
            self._timed(seconds, f"{name}.forward", self._encode_all, name, microbatches)
        if LANGUAGE in hosted:
            self._timed(seconds, "language.forward_backward", self._language, batch)
            for name in inside:  # those encoders ran inside the language phase; keep phases disjoint
                seconds["language.forward_backward"] -= seconds[f"{name}.forward"]
        for src, microbatches in self._receive_order(list(self.bridges)):
            self._timed(seconds, f"{src}.backward", self._encoder_backward, src, microbatches)
        for waits in (*self.bridges.values(), *self.encoder_stages.values()):
            waits.wait()
        align_gradients(self.model)
        self._sync_tied_embeddings()
        skipped = self._unscale_and_check()
        asked = tuple(votes()) if votes is not None else ()
        totals = self._global_sums(asked)
        grad_norm = totals[2].sqrt()
        clip_grads(self.model, grad_norm, None if skipped else self.clip_grad)
        lr = next(iter(self.schedulers.values())).get_last_lr()[0] if self.schedulers else 0.0
        self._timed(seconds, "optimizer", self._optimizer_step, skipped)
        # the step's one host sync, after the update is queued: reading earlier would leave the GPU idle
        # while the host launches clipping and the optimizer
        loss_sum, tokens, norm, *summed = torch.cat([totals[:2], grad_norm.reshape(1), totals[3:]]).tolist()
        seconds["step"] = time.perf_counter() - t0
        return StepResult(loss=loss_sum / max(tokens, 1), label_tokens=int(tokens),
                          **self._token_counts(extents, batch.input_ids.shape[1]),
                          grad_norm=norm, lr=lr, seconds=dict(seconds), skipped=skipped, votes=tuple(summed),
                          patch_balance={name: step_imbalance(s) for name, s in splits.items()})

    def _extent_shares(self, extents: torch.Tensor) -> torch.Tensor:
        """The global batch's `sample_extents` [N] as [micro-batch, language DP replica, sample]: micro-batch m's
        share d (`microbatch(m).shard(d)`) is the (m·dp + d)-th of num_microbatches·dp equal runs of samples."""
        dp = self.infra.config.module_parallelisms[LANGUAGE].data_parallel_size
        return extents.reshape(self.num_microbatches, dp, -1)

    def _token_counts(self, extents: torch.Tensor, width: int) -> dict[str, Any]:
        """The global batch's real tokens, the positions the language model computes for them (every language DP
        replica's share of every micro-batch of `width` columns, as `text_layout` lays it out) and the documents
        it attends within; `extents` as `_extent_shares` gives them."""
        return {"tokens": int(extents.sum()),
                "positions": sum(self.text_layout.positions(share, width) for share in extents.flatten(0, 1)),
                "documents": self.text_layout.documents(extents.flatten())}

    def _receive_order(self, names: list[str]) -> list[tuple[str, range]]:
        """(edge, micro-batches) in the order stage 0 receives the edges' rows and returns their gradients: one
        edge, all its micro-batches (one phase); several, micro-batch by micro-batch, each edge in turn (two
        encoders on the same ranks share a pair with stage 0, and NCCL pairs a pair's messages in posting order)."""
        if len(names) == 1:
            return [(names[0], range(self.num_microbatches))]
        return [(name, range(m, m + 1)) for m in range(self.num_microbatches) for name in names]

    # -- phase 1: encoders ---------------------------------------------------------------------------------
    def _encode_all(self, name: str, microbatches: range) -> None:
        """Encode this replica's items of these micro-batches and hand them to the bridge (which keeps what it
        delivers here for stage 0's `receive`)."""
        for m in microbatches:
            self._encode_microbatch(name, m)

    def _encode_microbatch(self, name: str, m: int) -> tuple | None:
        """Encode this replica's items of micro-batch m (balanced by patches: its share of the micro-batch's images,
        their tokens then exchanged so that it holds its own samples') and hand them to the bridge; what it
        delivers here."""
        bridge, encoder = self.bridges[name], self.model.modality_submodules[name]
        work = self._state.inputs[name][m]
        self._state.inputs[name][m] = None  # autograd keeps what the backward needs; nothing else outlives its use
        if name in self.encoder_stages:  # pipelined: only the last stage's output crosses the bridge
            out = self._encode_stage(name, m, work)
            if out is None:  # an earlier stage: a colocated bridge's collectives still need it (others: no-op)
                return bridge.forward(m, microbatch_tokens=self.microbatch_tokens(self._state.batch, name, m),
                                      replica_chunks=self._replica_chunks(name, m))
        else:
            with no_sync_forward(encoder):  # [tokens, H]; no items: [0, H], the graph still at every parameter
                out = encoder(work.items.items, work.items.item_grids)  # (one zero item encoded, no rows kept)
        grid = self.infra.module_to_grid_map[name]
        if work.balance is not None:
            out = work.balance.exchange(out, grid.get_group("dp"))
        out = out.to(self.activation_dtype)
        if work.route is not None:  # homogeneous under CP: each CP rank gets its chunks' rows (nothing else moves)
            return work.route(out, grid.get_group("cp")), work.counts
        tokens = self.microbatch_tokens(self._state.batch, name, m)
        return bridge.forward(m, out, work.counts, tokens, replica_chunks=self._replica_chunks(name, m))

    def _encode_stage(self, name: str, m: int, work: _EncoderWork) -> torch.Tensor | None:
        """Micro-batch m through this rank's stage of a pipelined encoder: stage 0 takes the items, a later stage
        the hidden states of the one before (packed items: every stage reads the grids); the last stage's rows are
        returned, an earlier stage's sent on."""
        encoder, items, grids = self.model.modality_submodules[name], work.items.items, work.items.item_grids

        def run(x: torch.Tensor | None) -> torch.Tensor:
            with no_sync_forward(encoder):
                return encoder(items if x is None else x, grids, empty=x is not None and items.shape[0] == 0)
        return self.encoder_stages[name].forward(m, unwrap(encoder).stage_input_shape(work.items), run)

    def _replica_chunks(self, name: str, m: int) -> Callable[[int], list[torch.Tensor]] | None:
        """Under context parallelism, for a language DP replica d: which of its `name` rows of micro-batch m each CP
        rank's sequence chunks hold (`chunk_rows`, on the host text every rank holds: this replica's split, another
        arranged as `text_layout` arranges it there); None without CP."""
        grid = self.infra.module_to_grid_map[LANGUAGE]
        if grid.size("cp") == 1:
            return None
        token, state = self.special_token_ids[name], self._state

        def chunks(d: int) -> list[torch.Tensor]:
            if d == grid.coord.dp:
                return state.host_text[m].every_rank_rows[token]
            share = state.batch.microbatch(m, self.num_microbatches).shard(d, grid.size("dp"))
            text = self.text_layout.arrange(share, self.special_token_ids, state.extents[m, d])
            return chunk_rows(text, grid.size("cp"), token)
        return chunks

    def microbatch_tokens(self, batch: MimoBatch, name: str, m: int) -> torch.Tensor | None:
        """Tokens per sample of modality `name` in the whole micro-batch m of `batch`, counted on the CPU ids every
        rank holds (a rank that receives embeddings need not host the encoder), for a bridge that
        `uses_microbatch_tokens`: they spare it moving the counts and reading them back (a host sync); None for
        other bridges. The ids must match the items; the bridge and `check_alignment` say so if they do not.
        Public so that a benchmark drives the bridge exactly as the step does."""
        if not self.bridges[name].uses_microbatch_tokens:
            return None
        ids = batch.microbatch(m, self.num_microbatches).input_ids
        return (ids == self.special_token_ids[name]).sum(1)

    def _patch_splits(self, batch: MimoBatch) -> dict[str, list[RankSplit]]:
        """Per modality of packed items (images of different sizes) whose encoder has DP > 1: each micro-batch's
        images split over its DP ranks by patch count (`PatchBalance`); per modality of a homogeneous encoder under
        CP: each replica's images over its CP ranks (`split_replicas`, stacked items too). Found on the host batch
        every rank holds."""
        splits = {}
        for name in self.bridges:
            layout = self.infra.config.module_parallelisms[name]
            items = batch.modality_inputs.get(name)
            if items is None:
                continue
            whole = [batch.microbatch(m, self.num_microbatches).modality_inputs[name]
                     for m in range(self.num_microbatches)]
            if layout.context_parallel_size > 1:
                splits[name] = [split_replicas(w, layout.data_parallel_size, layout.context_parallel_size)
                                for w in whole]
            elif layout.data_parallel_size > 1 and items.packed:
                splits[name] = [split_images(w, layout.data_parallel_size) for w in whole]
        return splits

    def _encoder_work(self, name: str, batch: MimoBatch, share: MimoBatch, m: int,
                      splits: dict[str, list[RankSplit]], text: LanguageText | None) -> _EncoderWork:
        """What this encoder replica encodes of micro-batch m (on the device) and the token counts of its samples:
        its samples' items, or its patch-balanced share of the micro-batch's images (under CP, of its replica's,
        routed to the CP ranks whose chunks of `text`, the language model's, hold them)."""
        encoder = unwrap(self.model.modality_submodules[name])
        own = share.modality_inputs[name]
        counts = encoder.tokens_per_sample(own)  # host metadata: stays on the CPU
        later = name in self.encoder_stages and not self.encoder_stages[name].is_first
        if later and name not in splits:
            return _EncoderWork(own, counts)  # a later stage reads only how many items there are, or their grids
        if name not in splits:
            return _EncoderWork(own.with_items(to_device(own.items, self.device)), counts)
        whole = batch.microbatch(m, self.num_microbatches).modality_inputs[name]
        grid = self.infra.module_to_grid_map[name]
        if grid.size("cp") > 1:
            return self._chunk_work(name, whole, splits[name][m], counts, text)
        rank = grid.coord.dp
        balance = PatchBalance.plan(whole, encoder.item_tokens(whole), splits[name][m], rank)
        items = balance.items(whole)  # a later stage of a pipeline reads their grids (the last also exchanges)
        return _EncoderWork(items if later else items.with_items(to_device(items.items, self.device)), counts, balance)

    def _chunk_work(self, name: str, whole: ModalityBatch, split: RankSplit, counts: torch.Tensor,
                    text: ContextText) -> _EncoderWork:
        """A homogeneous encoder's CP rank under CP: its share of its replica's images (`split_replicas`) and the
        route that gives every CP rank of the replica the rows its chunks of `text` hold (`chunk_route`)."""
        grid = self.infra.module_to_grid_map[name]
        cp, first = grid.size("cp"), grid.coord.dp * grid.size("cp")
        groups = split.images[first:first + cp]
        start = int(whole.items_per_sample[:grid.coord.dp * (whole.items_per_sample.shape[0] // grid.size("dp"))]
                    .sum())  # the replica's first image
        tokens = unwrap(self.model.modality_submodules[name]).item_tokens(whole)
        route = chunk_route(tokens, groups, start, text.every_rank_rows[self.special_token_ids[name]],
                            grid.coord.cp, self.device)
        items = images_of(whole, groups[grid.coord.cp])
        return _EncoderWork(items.with_items(to_device(items.items, self.device)), counts, route=route)

    def _prefetch(self, batch: MimoBatch, extents: torch.Tensor,
                  splits: dict[str, list[RankSplit]]) -> tuple[dict[str, list], list[LanguageText]]:
        """This rank's share of every micro-batch, per hosted module, on the device (the language model's as
        `text_layout` arranges it with the share's `extents`, `_extent_shares`, also kept on the host; an
        encoder's as `_encoder_work` says): all copies queued at the start of the step from pinned memory, so
        no copy later waits for the GPU to drain."""
        shares, host_text = {}, []
        # the language model's text first: a homogeneous encoder under CP routes its rows to the text's chunks
        for name in sorted(self.infra.participating_modules, key=lambda n: n != LANGUAGE):
            grid = self.infra.module_to_grid_map[name]
            own = [batch.microbatch(m, self.num_microbatches).shard(grid.coord.dp, grid.size("dp"))
                   for m in range(self.num_microbatches)]
            if name == LANGUAGE:
                host_text = [self.text_layout.arrange(share, self.special_token_ids, extents[m, grid.coord.dp])
                             for m, share in enumerate(own)]
                self._check_positions(host_text)
                host_text = [self._context_share(text) for text in host_text]
                shares[name] = [text.to(self.device) for text in host_text]
            else:
                texts = host_text if grid.size("cp") > 1 else [None] * len(own)
                shares[name] = [self._encoder_work(name, batch, share, m, splits, texts[m])
                                for m, share in enumerate(own)]
        return shares, host_text

    def _context_share(self, text: LanguageText) -> LanguageText:
        """This rank's chunks of a micro-batch share's text under context parallelism (`mimo.context_parallel`),
        else the text itself."""
        grid = self.infra.module_to_grid_map[LANGUAGE]
        if grid.size("cp") == 1:
            return text
        return split_text(text, grid.coord.cp, grid.size("cp"), self.special_token_ids.values(),
                          grid.get_group("cp"))

    def _check_positions(self, texts: list[LanguageText]) -> None:
        """Every sample's positions fit the language model's rotary table (checked on the host copies)."""
        limit = unwrap(self.model.language_model).config.max_seq_len
        longest = max(text.longest for text in texts)
        if longest > limit:
            raise ValueError(f"sequence length {longest} exceeds the language model's max_seq_len {limit}; "
                             f"drop or shorten the longer samples")

    # -- phase 2: the language pipeline --------------------------------------------------------------------
    def _language(self, batch: MimoBatch) -> None:
        """The 1F1B schedule (interleaved over model chunks with VPP > 1) over this rank's stage; virtual stage 0
        talks to the bridges."""
        grid = self.infra.module_to_grid_map[LANGUAGE]
        pp = grid.get_group("pp") if grid.size("pp") > 1 else None
        chunks = grid.config.virtual_pipeline_model_parallel_size
        lm = self.model.language_model
        carries = [self._deepstack_carry(c) for c in range(chunks)]
        shapes = [self._activation_shapes(carry) for carry in carries]
        schedule = PipelineSchedule(pp, self.num_microbatches, shapes[0] if chunks == 1 else shapes,
                                    self.activation_dtype, self.device, self.infra.p2p_groups, chunks)
        by_chunk = ChunkGradients(grid.get_group("dp_cp")) if reduces_by_chunk(lm, grid) else None

        def forward(m: int, c: int, x: Activation | None) -> Activation:
            first, last, carry = schedule.first(c), schedule.last(c), carries[c]
            mb = batch.microbatch(m, self.num_microbatches).shard(grid.coord.dp, grid.size("dp"))  # on the CPU
            text = self._state.inputs[LANGUAGE][m]
            if c == chunks - 1:  # the micro-batch's last pass on this rank: its text is no longer needed
                self._state.inputs[LANGUAGE][m] = None
            host_ids = self._state.host_text[m].input_ids
            x, blocks = x if isinstance(x, tuple) else (x, None)  # DeepStack's blocks for this and later stages
            if first:
                kwargs = self._first_stage_inputs(m, mb, text, host_ids)
                blocks = self._wide_rows(kwargs["embeddings_at"]) if carry is not None else None
            elif blocks is not None:
                where = self.model.special_positions(self.wide_modality, text.input_ids, host_ids)
                kwargs = {"added_after_layer": carry.added(where, blocks)}
            else:
                kwargs = {}
            labels = self.model.language_labels(text.input_ids, text.labels) if last else None
            if chunks > 1:
                kwargs["chunk"] = c
            with no_sync_forward(lm):
                out = lm(x, **kwargs, labels=labels, **text.model_kwargs())
            if not last:
                onward = carry.onward(blocks) if blocks is not None else None
                return out if onward is None else (out, onward)
            self._state.loss_sum = self._state.loss_sum + out[0].detach().double()  # no host sync until the end
            loss = out[0] / max(self._state.label_tokens, 1)
            return self.scaler.scale(loss) if self.scaler is not None else loss

        def before_backward(m: int, c: int, out: Activation, is_last: bool) -> None:
            if chunks == 1:
                prepare_backward(lm, is_last)
            else:
                prepare_chunk_backward(lm, unwrap(lm).chunk_blocks(c), unwrap(lm).chunk_holds_ends(c), is_last)
            for src, bridge in self.bridges.items():  # an encoder run inside the forward: backward reaches it
                if bridge.encodes_inside_language_forward and schedule.first(c):
                    prepare_backward(self.model.modality_submodules[src], is_last)

        def after_backward(m: int, c: int) -> None:
            if by_chunk is not None and m == self.num_microbatches - 1:  # the chunk's gradients are final
                by_chunk.reduce(unwrap(lm).chunk_parameters(c))
            if not schedule.first(c):
                return
            for bridge in self.bridges.values():
                if not bridge.encodes_inside_language_forward:
                    bridge.return_grad(m)

        schedule.run(StageWork(forward, before_backward, after_backward))
        if by_chunk is not None:
            by_chunk.wait()

    def _deepstack_carry(self, chunk: int = 0) -> DeepStackCarry | None:
        """What model chunk `chunk` of this language stage receives and sends of DeepStack's features; None without
        any (or PP 1)."""
        lm = unwrap(self.model.language_model)
        layers = lm.config.deepstack_layers
        if self.wide_modality is None or not layers or self.infra.module_to_grid_map[LANGUAGE].size("pp") == 1:
            return None
        return DeepStackCarry(self.hidden_size, layers, lm.chunk_ranges[chunk])

    def _activation_shapes(self, carry: DeepStackCarry | None) -> list[tuple]:
        """What this stage receives per micro-batch: the hidden states [R, T, H], and the DeepStack blocks of the
        layers from its start on [n, H·j] (n the image tokens of this replica's share, from the host ids)."""
        shapes = []
        for text in self._state.host_text:
            hidden = (*text.input_ids.shape, self.hidden_size)
            if carry is None or not carry.received_width():
                shapes.append(hidden)
                continue
            tokens = int((text.input_ids == self.special_token_ids[self.wide_modality]).sum())
            shapes.append((hidden, (tokens, carry.received_width())))
        return shapes

    def _wide_rows(self, embeddings_at: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Stage 0's rows that carry DeepStack's features beside the tokens (wider than the hidden size)."""
        return next(values for _, values in embeddings_at if values.shape[-1] != self.hidden_size)

    def _first_stage_inputs(self, m: int, mb: MimoBatch, text: LanguageText, host_ids: torch.Tensor) -> dict:
        """Stage 0's keyword inputs: text ids (as arranged, with their host copy) and every modality's
        embeddings for this replica's samples of micro-batch m (alignment checked per sample on the CPU ids
        `mb`, so no host sync); under CP only the rows this rank's chunks hold."""
        embeddings, counts = {}, {}
        for src, bridge in self.bridges.items():
            if bridge.encodes_inside_language_forward:  # encoded now: its activations live for this micro-batch
                t0 = time.perf_counter()
                embeddings[src], counts[src] = self._encode_microbatch(src, m)
                self._state.seconds[f"{src}.forward"] += time.perf_counter() - t0
            else:
                chunks = text.every_rank_rows[self.special_token_ids[src]] if isinstance(text, ContextText) else None
                embeddings[src], counts[src] = bridge.receive(m, self.microbatch_tokens(self._state.batch, src, m),
                                                              chunks)
        # rows the replica's samples hold (under CP each rank got only its chunks' rows: the counts are the replica's)
        chunked = isinstance(text, ContextText)
        rows = {name: int(counts[name].sum()) if chunked else e.shape[0] for name, e in embeddings.items()}
        self.model.check_alignment(mb.input_ids, {n: c.cpu() for n, c in counts.items()}, rows)
        return self.model.language_inputs(text.input_ids, embeddings, counts, check=False, host_ids=host_ids)

    # -- phase 3: encoder backward ------------------------------------------------------------------------
    def _encoder_backward(self, src: str, microbatches: range) -> None:
        """Deliver these micro-batches' embedding gradients to the encoder replicas and run their backward."""
        bridge = self.bridges[src]
        if bridge.encodes_inside_language_forward or src not in self.infra.participating_modules:
            return  # the language backward already ran it; receivers of a disjoint span: done
        encoder, stages = self.model.modality_submodules[src], self.encoder_stages.get(src)
        for m in microbatches:
            prepare_backward(encoder, m == self.num_microbatches - 1)
            bridge.run_encoder_backward(m)  # off a pipelined encoder's last stage: nothing, or a collective's part
            if stages is None:
                continue
            if stages.is_last:
                stages.return_input_grad(m)
            else:
                stages.backward(m)  # nothing where no stage up to this one trains (a frozen tower)

    # -- after the backward ----------------------------------------------------------------------------------
    def _sync_tied_embeddings(self) -> None:
        """With tied embeddings split over pipeline stages, sum the two copies' gradients over `embd`."""
        if LANGUAGE not in self.infra.participating_modules:
            return
        grid = self.infra.module_to_grid_map[LANGUAGE]
        lm = unwrap(self.model.language_model)
        if grid.size("pp") == 1 or not lm.config.tie_embeddings:
            return
        embd = grid.get_group("embd")
        if embd is None:
            return
        weight = lm.embed_tokens.weight if lm.has_embedding else lm.lm_head.weight
        dist.all_reduce(local_tensor(weight.grad), group=embd)

    def _global_sums(self, votes: tuple[float, ...] = ()) -> torch.Tensor:
        """[loss sum, label count, squared gradient norm, *votes] of the global batch on every rank, stub ranks
        included, from one world all-reduce: each language DP replica's loss owners (one per CP rank: each holds its
        chunks' loss) add their loss sums, replica 0's first the count (how stub ranks learn it), every rank its
        share of the norm (`local_grad_sq`) and its `votes` (the caller's)."""
        owner, counter = self._loss_owner()
        total = torch.zeros(3 + len(votes), dtype=torch.float64, device=self.device)  # no blocking copy
        if owner:
            total[0].copy_(self._state.loss_sum)
        if counter:
            total[1].fill_(self._state.label_tokens)  # `total[1] = n` would copy n from the host, blocking
        total[2].copy_(local_grad_sq(self.model, self.infra))
        for i, vote in enumerate(votes):
            if vote:
                total[3 + i].fill_(vote)  # fill_, not `=`: a host number, no blocking copy
        dist.all_reduce(total)
        return total

    def _loss_owner(self) -> tuple[bool, bool]:
        """(whether this rank reports its loss sum: last stage, TP rank 0, every CP rank (each its chunks'); whether
        it reports the label count: the owner of DP replica 0, CP rank 0)."""
        if LANGUAGE not in self.infra.participating_modules:
            return False, False
        grid = self.infra.module_to_grid_map[LANGUAGE]
        owner = grid.is_last_stage() and grid.coord.tp == 0
        return owner, owner and grid.coord.dp == 0 and grid.coord.cp == 0

    def _unscale_and_check(self) -> bool:
        """fp16: unscale every gradient and agree world-wide whether any overflowed (then skip the step)."""
        if self.scaler is None:
            return False
        params = [p for opt in self.optimizers.values() for g in opt.param_groups for p in g["params"]]
        self.scaler.unscale_(params)
        return self.scaler.found_inf(params)

    def _optimizer_step(self, skipped: bool) -> None:
        """Every module steps (or, after an overflow, none does), then its schedule advances."""
        for name, opt in self.optimizers.items():
            if not skipped:
                opt.step()
                self.schedulers[name].step()
            opt.zero_grad(set_to_none=True)
        weight_casts.drop(self.cached_casts)  # the weights changed (and the casts' graphs are spent)
        if self.scaler is not None:
            self.scaler.update()
        self.step_count += 1

    @staticmethod
    def _timed(seconds: dict[str, float], key: str, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        seconds[key] += time.perf_counter() - t0


@dataclass
class _EncoderWork:
    """One encoder replica's micro-batch: the items it encodes (on the device), the token counts of its own
    samples (CPU) and, when balanced by patches, the exchange that brings it its samples' tokens."""

    items: ModalityBatch
    counts: torch.Tensor
    balance: PatchBalance | None = None
    route: RowRoute | None = None  # a homogeneous encoder under CP: its rows to the CP ranks whose chunks hold them


def _wide_modality(widths: Mapping[str, int], hidden_size: int) -> str | None:
    """The one modality whose rows are wider than the hidden size (DeepStack's features beside its tokens)."""
    wide = sorted(name for name, width in widths.items() if width != hidden_size)
    if len(wide) > 1:
        raise ValueError(f"embedding_widths: modalities {wide} all have rows wider than hidden_size {hidden_size}; "
                         f"only one modality may carry DeepStack features")
    return wide[0] if wide else None


@dataclass
class _StepState:
    """Per-step scratch: the batch, its label count (the loss divisor), its samples' extents and this rank's
    prefetched shares of it (the language model's text also on the host), the loss sum, each phase's seconds."""

    batch: MimoBatch
    label_tokens: int
    extents: torch.Tensor  # `_extent_shares`: how `text_layout` arranges any replica's share
    inputs: dict[str, list]
    host_text: list[LanguageText]
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

