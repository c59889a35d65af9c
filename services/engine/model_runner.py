"""Holds the model, the paged KV cache tensors and the step's input tensors; runs the forward pass.

The scheduler's `SchedulerOutput` is the whole contract: for each scheduled request, its tokens
[num_computed, num_computed + num_new) are fed, their KV written to the request's blocks, and the
logits of the positions that sample are returned, [num_sampling_rows, V].
"""
from __future__ import annotations

import torch

from services.engine.config import EngineConfig
from services.engine.layers.attention import AttentionMetadata, as_bytes, get_backend, to_cache_dtype
from services.engine.loader import build_model
from services.engine.scheduler import ScheduledRequest

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, spec_query_len: int | None = None):
        """`spec_query_len`: the most tokens per sequence of the steps that also get CUDA graphs
        (speculative steps); default: 1 + num_speculative_tokens when the config speculates."""
        self.config = config
        self.hf_config = hf_config
        self.device = resolve_device(config.device)
        if config.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = _DTYPES[config.dtype]
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, config.load_format, config.model, self.dtype, self.device, config.seed)
        if config.quantization == "fp8":
            self._quantize_fp8()
        self.backend = get_backend(config.attention_backend, self.device)
        self.block_size = config.block_size
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        self.kv_dtype = torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else self.dtype
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # One allocation [layers, 2 (K, V), blocks, ...]; each layer sees views of it, and the KV tier moves
        # whole blocks of every layer with one gather or scatter.
        self.kv_cache = torch.zeros((self.num_layers, 2, *shape), dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.num_layers)]
        if spec_query_len is None and config.speculative_method is not None:
            spec_query_len = config.num_speculative_tokens + 1
        # GPU decode and speculative steps replay CUDA graphs (cuda_graphs.py)
        self.graphs, self.spec_graphs = self._capture_graphs(spec_query_len or 1)
        self._warm_up_kernels()

    def _quantize_fp8(self) -> None:
        if self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) < (8, 9):
            raise ValueError("quantization='fp8' needs a CUDA GPU with float8 tensor cores (compute capability "
                             "8.9+: Ada, Hopper); leave quantization unset on this device")
        from services.engine.layers.quant import quantize_fp8_  # noqa: PLC0415
        quantize_fp8_(self.model)
        torch.cuda.empty_cache()   # the bf16 weights' memory goes to the KV cache

    @property
    def kv_bytes_per_block(self) -> int:
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.kv_dtype.itemsize

    def _blocks_from_memory(self) -> int:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total - 2 * 2**30  # activations headroom
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
        return max(int(budget // self.kv_bytes_per_block), 2)

    # ---- step -----------------------------------------------------------------------------
    def prepare(self, scheduled: list[ScheduledRequest]):
        """Flat inputs for the step and, per request, which flat rows to compute logits for."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        logit_rows: list[list[int]] = []
        bs = self.block_size
        for s in scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            tokens = r.token_ids + r.spec_token_ids if r.spec_token_ids else r.token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            query_lens.append(end - start)
            seq_lens.append(end)
            # Rows that sample: the last committed token's position and every draft position after it.
            first = len(input_ids) - (end - start)
            if end >= r.num_tokens:
                logit_rows.append(list(range(first + r.num_tokens - 1 - start, first + end - start)))
            else:
                logit_rows.append([])
        max_blocks = max(len(s.block_ids) for s in scheduled)
        tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in scheduled]
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens))
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return ids, pos, meta, logit_rows

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest],
                input_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[int]]]:
        """Returns logits [sum of rows, V] (float32) and, per request, its row indices into them.
        `input_ids` (device, one per request): a decode step launched before the previous step's tokens
        were appended (the engine's overlapped decoding); it runs on the CUDA graphs."""
        if input_ids is not None:
            return self.graphs.run(scheduled, self.model.compute_logits, input_ids)
        for graphs in (self.graphs, self.spec_graphs):
            if graphs is not None and graphs.can_run(scheduled):
                return graphs.run(scheduled, self.model.compute_logits)
        ids, pos, meta, logit_rows = self.prepare(scheduled)
        hidden = self.model(ids, pos, self.kv_caches, meta, self.backend)
        flat = [row for rows in logit_rows for row in rows]
        logits = self.model.compute_logits(hidden[torch.tensor(flat, dtype=torch.long, device=self.device)]) \
            if flat else hidden.new_zeros(0, self.hf_config.vocab_size, dtype=torch.float32)
        out_rows, k = [], 0
        for rows in logit_rows:
            out_rows.append(list(range(k, k + len(rows))))
            k += len(rows)
        return logits, out_rows

    def _capture_graphs(self, spec_query_len: int):
        """CUDA graphs need a GPU, graphs allowed (enforce_eager off) and a graph-safe backend.
        Speculative graphs only up to the batch size where speculation turns off."""
        if self.device.type != "cuda" or self.config.enforce_eager or not getattr(self.backend, "graph_safe", False):
            return None, None
        from services.engine.cuda_graphs import DecodeGraphs  # noqa: PLC0415
        c = self.config
        max_len = c.max_model_len or self.hf_config.max_position_embeddings
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend, self.block_size, c.max_num_seqs, max_len,
                              self.device)
        graphs.capture()
        if spec_query_len <= 1:
            return graphs, None
        spec = DecodeGraphs(self.model, self.kv_caches, self.backend, self.block_size,
                            min(c.max_num_seqs, c.speculative_disable_batch_size or c.max_num_seqs), max_len,
                            self.device, tokens_per_seq=spec_query_len, pool=graphs.pool)
        spec.capture()
        return graphs, spec

    def _warm_up_kernels(self) -> None:
        """Compile now what the first steps would compile mid-serving (up to a second each on a fresh
        machine): the lm_head's GEMV for a single sampled row and the fused sampler, also with a grammar mask."""
        if self.device.type != "cuda":
            return
        from services.engine.layers import fused  # noqa: PLC0415
        logits = self.model.compute_logits(torch.zeros(1, self.hf_config.hidden_size, dtype=self.dtype,
                                                       device=self.device))
        fused.sample_rows(logits, torch.zeros(1, device=self.device), 0)   # both of its kernels
        words = -(-logits.shape[-1] // 32)
        fused.sample_rows(logits, torch.zeros(1, device=self.device), 0, mask=torch.full(
            (1, words), -1, dtype=torch.int32, device=self.device), mask_limit=torch.zeros(1, dtype=torch.int32,
                                                                                          device=self.device))

    # ---- block import / export (the KV tier's seam) ------------------------------------------
    def export_blocks(self, block_ids: list[int]) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """KV of whole blocks, [layers, 2, n, block_size, kv_heads, head_dim] on the CPU: one index_select
        over every layer. On a GPU the copy to (pinned) host memory is queued behind the step's work, not
        waited for: the event marks it done (the KV tier's writer waits)."""
        cache = as_bytes(self.kv_cache)
        cuda = cache.is_cuda
        idx = torch.tensor(block_ids, dtype=torch.long, pin_memory=cuda).to(cache.device, non_blocking=True)
        out = torch.index_select(cache, 2, idx)
        if not cuda:
            return out.view(self.kv_dtype), None
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host.view(self.kv_dtype), done

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        data = to_cache_dtype(data.to(self.device), self.kv_dtype)
        as_bytes(self.kv_cache)[:, :, idx] = as_bytes(data).permute(1, 2, 0, 3, 4, 5)
