"""Packing the region sequences of a batch into few LM rows, without padding them to the longest.

A text call of :class:`~fineregion_pl.model.language_model.RegionLanguageModel` is ``R``
sequences ``[context (L, d) | target text (T_r tokens)]``. Padded, every row of a call is as
long as its longest target, and a mixed batch (RefCOCOg's long expressions, Visual Genome's short
phrases) pads a third of its tokens. Packed, the sequences of all the calls of a step are placed
first-fit-decreasing into rows of 1-8 times the longest sequence (the width that wastes least); ``position_ids`` restart at 0 at
each sequence, which is how transformers (5.x, ``masking_utils.find_packed_sequence_indices``)
keeps attention inside each sequence for decoder LMs under ``sdpa``/``eager`` (a block-diagonal
causal mask) and ``flash_attention_2`` (varlen ``cu_seqlens``). It needs ``attention_mask=None``
and no cache. The leftover tail of a row is its own short "sequence" of filler positions whose
outputs nobody reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class PackedLayout:
    """Where every token of every sequence goes, as flat indices (all on one device).

    Attributes:
        rows, width: the packed batch is ``(rows, width)``.
        source: ``(rows * width,)`` per packed slot, the index of its embedding in the
            concatenation ``[contexts..., text embeddings, one zero row]`` (filler slots: the zero row).
        position_ids: ``(rows, width)`` positions restarting at 0 at each sequence.
        predict: ``(P,)`` flat packed slots whose output predicts a target token.
        targets: ``(P,)`` those target token ids.
        sequence: ``(P,)`` the sequence (over all calls, in call order) each prediction belongs to.
        call: ``(P,)`` the call each prediction belongs to.
        sequence_tokens: ``(S,)`` target tokens of each sequence.
        call_tokens: target tokens of each call (host ints: no device sync to read them).
        real_tokens: tokens of real sequences (the rest of ``rows * width`` is filler).
        attention_mask: ``(rows, 1, width, width)`` additive mask (0 or the dtype's minimum) when
            the layout is not a plain block-diagonal causal one (:func:`shared_context_layout`),
            else ``None`` (transformers builds the mask from ``position_ids``).
    """

    rows: int
    width: int
    source: Tensor
    position_ids: Tensor
    predict: Tensor
    targets: Tensor
    sequence: Tensor
    call: Tensor
    sequence_tokens: Tensor
    call_tokens: list[int]
    real_tokens: int
    attention_mask: Optional[Tensor] = None

    @property
    def padding_share(self) -> float:
        """Share of the packed slots that are filler."""
        return 1.0 - self.real_tokens / max(1, self.rows * self.width)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length at most ``capacity``, longest items first."""
    bins: list[list[int]] = []
    free: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, room in enumerate(free):
            if lengths[item] <= room:
                bins[b].append(item)
                free[b] -= lengths[item]
                break
        else:
            bins.append([item])
            free.append(capacity - lengths[item])
    return bins


MAX_ROW_FACTOR = 8
"""Rows are at most this many times the longest sequence: longer rows waste less at their ends, but
with a block-diagonal mask (``sdpa``) attention still computes every pair of a row's positions."""


def packed_rows(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """Row width and bins of least total size among widths of 1..:data:`MAX_ROW_FACTOR` times the
    longest sequence (ties: the narrower)."""
    longest = max(lengths, default=1)
    best = None
    for factor in range(1, MAX_ROW_FACTOR + 1):
        width = min(longest * factor, max(longest, sum(lengths)))
        bins = first_fit_decreasing(lengths, width)
        if best is None or len(bins) * width < best[0] * best[1]:
            best = (len(bins), width, bins)
    return best[1], best[2]


def pack_layout(context_lengths: list[int], call_rows: list[int], text_ids: list[list[list[int]]], device: torch.device) -> PackedLayout:
    """The packed layout of several calls' sequences.

    Args:
        context_lengths: per call, its context length ``L_c`` (template + soft tokens).
        call_rows: per call, its number of sequences ``R_c``.
        text_ids: per call, per sequence, its target token ids (EOS included).
        device: where the index tensors go.

    The embedding sources are numbered: call ``c``'s context row ``r`` position ``l`` is
    ``offset_c + r * L_c + l`` (each call's ``(R_c, L_c, d)`` context flattened, calls in order),
    then the text tokens of all sequences in order, then one zero (filler) row.
    """
    lengths, sources, firsts = [], [], []
    context_total = sum(length * rows for length, rows in zip(context_lengths, call_rows))
    ctx_offset, text_offset = 0, context_total
    calls = []
    for c, (length, rows, ids) in enumerate(zip(context_lengths, call_rows, text_ids)):
        if len(ids) != rows:
            raise ValueError(f"call {c}: {rows} context rows but {len(ids)} texts")
        for r in range(rows):
            t = len(ids[r])
            lengths.append(length + t)
            sources.append((ctx_offset + r * length, length, text_offset, t))
            firsts.append(length - 1)  # the slot whose output predicts the first text token
            calls.append(c)
            text_offset += t
        ctx_offset += rows * length
    filler = text_offset
    width, bins = packed_rows(lengths)
    source = torch.full((len(bins), width), filler, dtype=torch.long)
    positions = torch.zeros(len(bins), width, dtype=torch.long)
    flat_ids = [token for ids in text_ids for seq in ids for token in seq]
    predict, sequence = [], []
    text_starts = []
    for b, items in enumerate(bins):
        start = 0
        for s in items:
            ctx_start, length, txt_start, t = sources[s]
            source[b, start:start + length] = torch.arange(ctx_start, ctx_start + length)
            source[b, start + length:start + length + t] = torch.arange(txt_start, txt_start + t)
            positions[b, start:start + length + t] = torch.arange(length + t)
            first = b * width + start + firsts[s]
            predict.extend(range(first, first + t))
            sequence.extend([s] * t)
            text_starts.append((txt_start, t))
            start += length + t
        positions[b, start:] = torch.arange(width - start) % max(lengths)  # filler: never past a real position
    targets = [flat_ids[txt - context_total + k] for txt, t in text_starts for k in range(t)]
    seq = torch.tensor(sequence, dtype=torch.long)
    return PackedLayout(
        rows=len(bins), width=width, source=source.flatten().to(device), position_ids=positions.to(device),
        predict=torch.tensor(predict, dtype=torch.long).to(device), targets=torch.tensor(targets, dtype=torch.long).to(device),
        sequence=seq.to(device), call=torch.tensor(calls, dtype=torch.long)[seq].to(device),
        sequence_tokens=torch.tensor([len(i) for ids in text_ids for i in ids], dtype=torch.long).to(device),
        call_tokens=[sum(len(i) for i in ids) for ids in text_ids], real_tokens=sum(lengths),
    )


def shared_context_layout(context_length: int, owners: list[int], text_ids: list[list[int]], device: torch.device,
                          dtype: torch.dtype = torch.float32) -> PackedLayout:
    """The layout that scores several texts after one shared context each, with the context computed once.

    Context ``r`` (``L`` slots) is followed by every text ``j`` with ``owners[j] == r``; a text's
    positions continue the context's (``L, L + 1, ...``), and its tokens see the context and the
    earlier tokens of their own text only, so each text's log-likelihood is that of the sequence
    ``[context r | text j]`` alone. Such trees are packed first-fit-decreasing into rows like
    :func:`pack_layout`'s; the mask (additive, ``dtype``) is what keeps them apart. Sources are
    numbered as in :func:`pack_layout` with one call of ``R = max(owners) + 1`` contexts.

    Args:
        context_length: ``L``, the length of every context.
        owners: per text, the index of its context.
        text_ids: per text, its target token ids (EOS included).
        device: where the tensors go.
        dtype: of the additive mask (the LM's).
    """
    if len(owners) != len(text_ids):
        raise ValueError(f"{len(owners)} owners but {len(text_ids)} texts")
    contexts = max(owners, default=-1) + 1
    texts_of: list[list[int]] = [[] for _ in range(contexts)]
    for j, r in enumerate(owners):
        texts_of[r].append(j)
    used = [r for r in range(contexts) if texts_of[r]]
    sizes = [context_length + sum(len(text_ids[j]) for j in texts_of[r]) for r in used]
    width, bins = packed_rows(sizes)
    text_start, offset = [], contexts * context_length
    for ids in text_ids:
        text_start.append(offset)
        offset += len(ids)
    filler = offset
    # built as Python lists, one tensor each at the end: grounding lays out hundreds of short texts
    source, positions, tree, branch = [], [], [], []  # tree -1: filler; branch 0: a context, j + 1: text j
    predict_of: list[list[int]] = [[] for _ in text_ids]
    for items in bins:
        row_start = len(source)
        for item in items:
            r = used[item]
            source.extend(range(r * context_length, (r + 1) * context_length))
            positions.extend(range(context_length))
            branch.extend([0] * context_length)
            last_context = len(source) - 1
            for j in texts_of[r]:
                t = len(text_ids[j])
                predict_of[j] = [last_context] + list(range(len(source), len(source) + t - 1))
                source.extend(range(text_start[j], text_start[j] + t))
                positions.extend(range(context_length, context_length + t))
                branch.extend([j + 1] * t)
            tree.extend([item] * sizes[item])
        pad = width - (len(source) - row_start)
        source.extend([filler] * pad)
        positions.extend([0] * pad)
        branch.extend([0] * pad)
        tree.extend([-1] * pad)
    shape = (len(bins), width)
    source_t, tree = torch.tensor(source).view(shape), torch.tensor(tree).view(shape)
    positions_t, branch = torch.tensor(positions).view(shape), torch.tensor(branch).view(shape)
    free = tree < 0
    tree[free] = -1 - torch.arange(int(free.sum()))  # filler slots only see themselves
    order = torch.arange(width)
    allowed = ((tree[:, :, None] == tree[:, None, :]) & (order[None, :, None] >= order[None, None, :])
               & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])))
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    sequence = [j for j, slots in enumerate(predict_of) for _ in slots]
    return PackedLayout(
        rows=len(bins), width=width, source=source_t.flatten().to(device), position_ids=positions_t.to(device),
        predict=torch.tensor([s for slots in predict_of for s in slots], dtype=torch.long).to(device),
        targets=torch.tensor([t for ids in text_ids for t in ids], dtype=torch.long).to(device),
        sequence=torch.tensor(sequence, dtype=torch.long).to(device), call=torch.zeros(len(sequence), dtype=torch.long).to(device),
        sequence_tokens=torch.tensor([len(ids) for ids in text_ids], dtype=torch.long).to(device),
        call_tokens=[sum(len(ids) for ids in text_ids)], real_tokens=sum(sizes), attention_mask=mask.to(device),
    )


def packed_embeddings(layout: PackedLayout, contexts: list[Tensor], text_embeddings: Tensor) -> Tensor:
    """``(rows, width, d)`` LM input of the layout from the calls' ``(R_c, L_c, d)`` contexts and
    the ``(tokens, d)`` embeddings of all text tokens (in :func:`pack_layout`'s order)."""
    d = text_embeddings.shape[-1]
    pieces = [c.reshape(-1, d).to(text_embeddings.dtype) for c in contexts] + [text_embeddings, text_embeddings.new_zeros(1, d)]
    return torch.cat(pieces).index_select(0, layout.source).view(layout.rows, layout.width, d)


def segment_mean(values: Tensor, segment: Tensor, counts: Tensor) -> Tensor:
    """Mean of the rows of ``values (P, d)`` per segment id ``(P,)``, given each segment's row
    count ``(S,)``: ``(S, d)`` (zeros where empty)."""
    total = values.new_zeros(counts.shape[0], values.shape[-1]).index_add(0, segment, values)
    return total / counts.clamp(min=1).to(values.dtype)[:, None]
