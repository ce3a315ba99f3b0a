"""Steps that mix in a prefill, replayed as CUDA graphs between the attention calls.

A mixed step cannot replay a decode graph: its attention depends on each sequence's query
length. Everything else in the forward depends only on the token count, so for token-count
buckets up to MAX_TOKENS the runner captures each stretch between two attention calls as one
graph, as vLLM's piecewise graphs do: the first stretch embeds and runs layer 0 up to its
queries (norm, q/k/v projection, RoPE, K/V into the cache); stretch i runs layer i-1 from its
attention output (output projection, norm, MLP) to layer i's queries; the last one ends with
the final norm. Attention runs eagerly between them with the step's own metadata and writes
into one static buffer the next stretch reads. A step of n tokens replays the smallest bucket
that holds it: padded tokens get slot `pad_slot` (no K/V written), and attention sees only the
n real ones.

    runner = PiecewiseGraphRunner(model, kv_caches, max_tokens, device, dtype)
    runner.capture()                      # after the decode graphs, on the same device
    if runner.can_run(meta):              # a step with a prefill and at most max_tokens tokens
        hidden = runner.run(input_ids, positions, meta)

Stretch i's inputs are static buffers or stretch i-1's outputs, so a replay copies only the
attention output. With `graphs=False` the same stretches run eagerly on the same buffers: the
plumbing, without capture, on any device. A later pipeline stage (`stage_input`) starts from
static copies of the (hidden, residual) it received, as the decode graphs do.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.graph_inputs import StaticInputs

log = logging.getLogger("pagoda.engine")

MAX_TOKENS = 512  # larger steps run eagerly: their kernels are long enough to hide launches
BUCKETS = (16, 32, 64, 128, 256, 384, 512)


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts captured: BUCKETS up to max_tokens (at most MAX_TOKENS), which is
    always the last."""
    top = min(max_tokens, MAX_TOKENS)
    return [b for b in BUCKETS if b < top] + [top]


def held_bytes(model, tokens: int, dtype: torch.dtype) -> int:
    """Device memory the captured stretches of a `tokens` bucket keep as outputs: every
    layer's queries and residual."""
    layers = list(model.layers.values())
    width = layers[0].self_attn.q_size + model.cfg.hidden_size
    return len(layers) * tokens * width * dtype.itemsize


class PiecewiseGraphRunner:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 max_tokens: int, device: torch.device | str, dtype: torch.dtype,
                 enabled: bool = True, graphs: bool = True, pad_slot: int = -1,
                 stage_input: tuple[int, torch.dtype] | None = None) -> None:
        self.model = model
        self.layers = list(model.layers.values())
        self.kv_caches = kv_caches
        self.buckets = token_buckets(max_tokens)
        self.device = torch.device(device)
        self.graphs = graphs and self.device.type == "cuda"
        self.enabled = enabled and (self.device.type == "cuda" or not graphs)
        self.captured: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, list] = {}  # each stretch's outputs, per bucket
        self.replays = 0  # steps run from these graphs
        n, dev = self.buckets[-1], self.device
        self.inputs = StaticInputs(n, dev, pad_slot, stage_input)
        self.attn_out = torch.zeros(n, self.layers[0].self_attn.q_size, dtype=dtype, device=dev)

    def capture(self) -> None:
        """Every bucket's stretches. Where that fails, mixed steps run eagerly: slower, not
        wrong, so the engine logs the error and goes on."""
        if not (self.enabled and self.graphs) or self.captured:
            return
        free_before = torch.cuda.mem_get_info(self.device)[0]
        try:
            self._capture()
        except RuntimeError:
            log.exception("CUDA graphs for mixed steps could not be captured; they run eagerly")
            self.captured.clear()
            self.outputs.clear()
            self.enabled = False
            return
        log.info("CUDA graphs: mixed steps of up to %d tokens in %d pieces each, %.2f GiB",
                 self.buckets[-1], len(self.layers) + 1,
                 (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**30)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Largest bucket first; all share one memory pool, since they replay one at a time."""
        pool = None
        for size in reversed(self.buckets):
            graphs: list[torch.cuda.CUDAGraph] = []
            outputs: list = []
            for stretch in self._stretches(size):
                args = (self.attn_out[:size], outputs[-1][1]) if outputs else ()
                stretch(*args)  # warm-up compiles kernels; padded slots write no K/V
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    outputs.append(stretch(*args))
                pool = graph.pool()
                graphs.append(graph)
            self.captured[size], self.outputs[size] = graphs, outputs
        torch.cuda.synchronize(self.device)

    def can_run(self, meta: AttentionMetadata) -> bool:
        ready = bool(self.captured) or (self.enabled and not self.graphs)
        return ready and not meta.decode_only and \
            0 < meta.query_start_loc_cpu[-1] <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: tuple[torch.Tensor, ...] | None = None):
        """This stage's output for the step's tokens: hidden states, or (hidden, residual)
        before the last stage; views of static buffers the next run overwrites."""
        if not self.can_run(meta):
            raise ValueError("step cannot replay piecewise graphs: needs a prefill, "
                             f"1..{self.buckets[-1]} tokens, captured graphs")
        n = input_ids.shape[0]
        size = self.stage(input_ids, positions, meta, intermediate)
        stretches = None if self.graphs else self._stretches(size)
        out: tuple | torch.Tensor = ()
        for i in range(len(self.layers) + 1):
            if i:  # the attention of layer i-1, on the real tokens only
                o = self.layers[i - 1].self_attn.attend(out[0][:n], self.kv_caches[i - 1], meta,
                                                        self.model.backend)
                self.attn_out[:n].copy_(o)
            if stretches is None:
                self.captured[size][i].replay()
                out = self.outputs[size][i]
            else:
                out = stretches[i](*((self.attn_out[:size], out[1]) if i else ()))
        self.replays += 1
        return out[:n] if isinstance(out, torch.Tensor) else tuple(t[:n] for t in out)

    def bucket(self, num_tokens: int) -> int:
        if not 0 < num_tokens <= self.buckets[-1]:
            raise ValueError(f"no piecewise bucket for {num_tokens} tokens "
                             f"(1..{self.buckets[-1]})")
        return next(b for b in self.buckets if b >= num_tokens)

    def stage(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              intermediate: tuple[torch.Tensor, ...] | None = None) -> int:
        """Copy a step's tokens into the static inputs, padded to its bucket; the bucket."""
        size = self.bucket(input_ids.shape[0])
        self.inputs.copy_in(size, input_ids, positions, meta.slot_mapping, intermediate)
        return size

    def _stretches(self, size: int) -> list[Callable[..., tuple | torch.Tensor]]:
        """The forward of a `size`-token bucket between its attention calls, on the static
        inputs; each but the last returns (queries, residual)."""
        model, kv, layers = self.model, self.kv_caches, self.layers
        backend, rope = model.backend, model.rope_cache
        ids, positions = self.inputs.input_ids[:size], self.inputs.positions[:size]
        # before attention only the slot mapping is read
        none = ids[:0]
        meta = AttentionMetadata(slot_mapping=self.inputs.slot_mapping[:size], query_start_loc=none,
                                 seq_lens=none, block_tables=none, query_start_loc_cpu=[],
                                 query_lens_cpu=[], seq_lens_cpu=[], max_query_len=0,
                                 max_seq_len=0)
        intermediate = self.inputs.stage_args(size)

        def first() -> tuple:
            x, residual = model.start(ids, intermediate)
            return layers[0].before_attention(x, residual, positions, kv[0], meta, rope, backend)

        def between(i: int) -> Callable[..., tuple]:
            def stretch(o: torch.Tensor, residual: torch.Tensor) -> tuple:
                x, residual = layers[i - 1].after_attention(o, residual, backend)
                return layers[i].before_attention(x, residual, positions, kv[i], meta, rope,
                                                  backend)
            return stretch

        def last(o: torch.Tensor, residual: torch.Tensor):
            return model.finish(*layers[-1].after_attention(o, residual, backend))

        return [first, *(between(i) for i in range(1, len(layers))), last]
