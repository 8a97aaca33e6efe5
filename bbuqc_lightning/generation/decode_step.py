"""One decode step over the KV pool, captured as a CUDA graph once per bucket.

The step maps static buffers ``tokens, positions, steps (rows,)`` and ``prompt_lens (slots,)`` to the next
token logits of every row. Its shapes depend only on the *bucket* ``(slots, group, prompt_bucket,
new_bucket)``: the number of prompt slots in flight rounded up to a power of two, the samples per prompt,
the longest prompt rounded up to a length bucket and the completion budget rounded up to a power of two.
So a process captures a handful of graphs whatever prompt lengths, image sizes and row counts it sees
(vLLM captures per batch size the same way), all sharing one memory pool. On CPU the same step runs
eagerly.

``compile_layers=True`` (``generation.compile_layers``) runs each decoder layer's attention-free halves
through ``torch.compile`` (:mod:`~bbuqc_lightning.generation.compiled_layers`): compiled once for all layers
and row counts in the first warm-up run (a one-time cost, counted in ``compiles`` / ``compile_seconds``), then
captured inside each bucket's graph like the eager code. Never the whole step, never per prompt length.

Example::

    step = DecodeStep(model, pool, cuda_graphs=True)
    logits = step.run(Bucket(slots=8, group=8, prompt_bucket=2048, new_bucket=128))  # (64, vocab) fp32
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bbuqc_lightning.generation.chunked_prefill import Segment
from bbuqc_lightning.generation.compiled_layers import LayerRegions, compiled_graphs
from bbuqc_lightning.generation.kv_pool import KVPool
from bbuqc_lightning.generation.pool_attention import DecodeBatch, MixedBatch, additive_bias, segment_bias
from bbuqc_lightning.models.decoder import language_model, output_embedding, uses_mrope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    """The shape class of a decode step."""

    slots: int
    group: int
    prompt_bucket: int
    new_bucket: int

    @property
    def rows(self) -> int:
        return self.slots * self.group


class DecodeStep:
    """Static input buffers, the step function, and one CUDA graph per bucket seen (GPU)."""

    def __init__(
        self,
        model: nn.Module,
        pool: KVPool,
        cuda_graphs: bool,
        compile_layers: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        self.model = model
        self.pool = pool
        layout = pool.layout
        device = pool.prompt_keys.device
        self.tokens = torch.zeros(layout.rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(layout.rows, dtype=torch.long, device=device)
        self.steps = torch.zeros(layout.rows, dtype=torch.long, device=device)
        self.prompt_lens = torch.zeros(layout.prompt_slots, dtype=torch.long, device=device)
        vocab = output_embedding(model).weight.shape[0]
        self.logits = torch.zeros(layout.rows, vocab, dtype=torch.float32, device=device)
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: dict[Bucket, torch.cuda.CUDAGraph | None] = {}
        self.capture_seconds = 0.0
        self.regions = LayerRegions(compile_backend) if compile_layers else None
        self.compiles = 0  # Dynamo graphs compiled by this step's runs (first compiles and recompiles)
        self.compile_seconds = 0.0  # wall time of the runs that compiled (compiling dominates them)
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None

    @property
    def captures(self) -> int:
        """Distinct buckets run so far (graphs captured on GPU): bounded by the bucket grid, not by shapes."""
        return len(self.graphs)

    def warms_up(self, bucket: Bucket) -> bool:
        """Whether running ``bucket`` next would capture a graph or compile (its first run, on GPU or with
        ``compile_layers``): work during which no other thread may launch CUDA calls freely."""
        return bucket not in self.graphs and (self.cuda_graphs or self.regions is not None)

    def run(self, bucket: Bucket) -> torch.Tensor:
        """Logits ``(bucket.rows, vocab)`` for the tokens in the buffers (a view of a static buffer)."""
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket) if self.cuda_graphs else None
        graph = self.graphs[bucket]
        if graph is None:
            self._counted_forward(bucket)
        else:
            graph.replay()
        return self.logits[: bucket.rows]

    def _capture(self, bucket: Bucket) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm-up: cuBLAS handles and workspaces exist (and compiling is done) before the capture
            self._counted_forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # Under generation.overlap_decode_priority the caller's stream has a high priority, and a graph's kernels may
        # keep the priority of the stream they were captured on (CUDA copies it into each kernel node): capture on a
        # stream of the caller's priority then. At the default priority, PyTorch's own capture stream.
        priority = torch.cuda.current_stream().priority
        capture = torch.cuda.Stream(priority=priority) if priority else None
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=capture):
            self._forward(bucket)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        log.log(
            logging.INFO if self.regions is not None else logging.DEBUG,
            "captured decode graph %s in %.2f s (%d captures, %.2f s; %d compiles, %.2f s so far)",
            bucket,
            seconds,
            len(self.graphs) + 1,
            self.capture_seconds,
            self.compiles,
            self.compile_seconds,
        )
        return graph

    def _counted_forward(self, bucket: Bucket) -> None:
        """:meth:`_forward`, adding what it compiled to ``compiles`` and ``compile_seconds``."""
        if self.regions is None:
            self._forward(bucket)
            return
        before = compiled_graphs()
        start = time.perf_counter()
        self._forward(bucket)
        new = compiled_graphs() - before
        if new:
            self.compiles += new
            self.compile_seconds += time.perf_counter() - start
            log.info("compiled %d decode-layer graphs for %s (%d in all)", new, bucket, self.compiles)

    @torch.no_grad()
    def run_mixed(
        self, bucket: Bucket | None, segments: Sequence[Segment]
    ) -> tuple[torch.Tensor | None, list]:
        """One eager step with prompt chunks (:mod:`~bbuqc_lightning.generation.chunked_prefill`) beside the
        decode rows of ``bucket`` (None: no row is running): the rows' logits ``(rows, vocab)`` fp32 (None without
        rows) and, for each segment that ends its prompt, its last token's logits ``(vocab,)`` fp32."""
        lm = language_model(self.model)
        mrope = uses_mrope(lm)
        decode = None if bucket is None else self._decode_batch(bucket)
        rows = 0 if bucket is None else bucket.rows
        parts, positions = [], []
        if bucket is not None:
            parts.append(lm.embed_tokens(self.tokens[:rows]))
            positions.append(self.positions[:rows][None].expand(3, -1))
        for segment in segments:
            parts.append(segment.embeds.to(lm.embed_tokens.weight.dtype))
            positions.append(segment.positions)
        hidden = torch.cat(parts)[None]  # (1, T, H): one sequence of the rows' tokens, then the chunks
        position_ids = torch.cat(positions, dim=1)[:, None]  # (3, 1, T)
        rope = position_ids if mrope else position_ids[0]
        embeddings = lm.rotary_emb(hidden, rope)
        pool = self.pool
        per_kv = lm.config.num_attention_heads // pool.layout.kv_heads
        biases = [segment_bias(s.start, s.n, per_kv, pool.dtype, hidden.device) for s in segments]
        batch = MixedBatch(pool, decode, [(s.slot, s.start, s.n) for s in segments], biases)
        visual = _visual_index(segments, rows, hidden.device)
        deep = [s for s in segments if s.visual is not None]
        depth = len(deep[0].deepstack) if deep else 0
        for index, layer in enumerate(lm.layers):
            hidden = _layer_forward(layer, hidden, batch, position_ids[0], embeddings)
            if visual is not None and index < depth:  # DeepStack: features of the vision tower's inner layers
                features = torch.cat([s.deepstack[index] for s in deep]).to(hidden.dtype)
                hidden[0].index_add_(0, visual, features)
        hidden = lm.norm(hidden)[0]
        ends = [rows + sum(s.n for s in segments[: i + 1]) - 1 for i, s in enumerate(segments) if s.last]
        picked = torch.cat([hidden[:rows], hidden[ends]]) if ends else hidden[:rows]
        logits = output_embedding(self.model)(picked).float()
        return (logits[:rows] if rows else None), list(logits[rows:])

    def _decode_batch(self, bucket: Bucket) -> DecodeBatch:
        device = self.tokens.device
        steps = self.steps[: bucket.rows]
        prompt_keys = torch.arange(bucket.prompt_bucket, device=device)
        new_keys = torch.arange(bucket.new_bucket, device=device)
        return DecodeBatch(
            pool=self.pool,
            slots=bucket.slots,
            group=bucket.group,
            prompt_bucket=bucket.prompt_bucket,
            new_bucket=bucket.new_bucket,
            steps=steps,
            prompt_bias=_bias(prompt_keys[None] < self.prompt_lens[: bucket.slots, None], self.pool.dtype),
            decode_bias=_bias(new_keys[None] <= steps[:, None], self.pool.dtype),
            row_index=torch.arange(bucket.rows, device=device),
        )

    @torch.no_grad()
    def _forward(self, bucket: Bucket) -> None:
        rows = bucket.rows
        lm = language_model(self.model)
        batch = self._decode_batch(bucket)
        hidden = lm.embed_tokens(self.tokens[:rows, None])
        positions = self.positions[:rows, None]
        rope = positions[None].expand(3, rows, 1) if uses_mrope(lm) else positions
        embeddings = lm.rotary_emb(hidden, rope)
        for layer in lm.layers:
            if self.regions is not None:
                hidden = self.regions.layer(layer, hidden, batch, embeddings)
            else:
                hidden = _layer_forward(layer, hidden, batch, positions, embeddings)
        hidden = lm.norm(hidden)
        self.logits[:rows].copy_(output_embedding(self.model)(hidden[:, -1]).float())


def _layer_forward(
    layer: nn.Module,
    hidden: torch.Tensor,
    batch: DecodeBatch,
    positions: torch.Tensor,
    embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    call: Callable[..., torch.Tensor] = layer
    return call(
        hidden,
        attention_mask=batch,
        position_ids=positions,
        past_key_values=batch,
        position_embeddings=embeddings,
    )


def _visual_index(segments: Sequence[Segment], rows: int, device: torch.device) -> torch.Tensor | None:
    """Where the segments' visual tokens sit in a mixed step's sequence (after the ``rows`` decode tokens)."""
    index, offset = [], rows
    for segment in segments:
        if segment.visual is not None:
            index.append(segment.visual + offset)
        offset += segment.n
    return torch.cat(index).to(device) if index else None


def _bias(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean ``(n, keys)`` -> additive ``(n, 1, 1, keys)`` in ``dtype`` (:func:`additive_bias`)."""
    return additive_bias(allowed, dtype)[:, None, None]
