"""Self-describing KV block blobs: what the KV tier stores under one block's key.

A blob is `MAGIC | u32 header length | JSON header | payload`. The header names everything a reader
needs to reject a block that is not the one it asked for: the KV layout (name, per-block shape,
dtype), the model fingerprint, the block hash, the encoding and a CRC32 of the payload. A blob that
fails any check decodes to an error that the tier counts and treats as a miss (the block is then
recomputed), never to wrong KV.

Encodings:
  "raw"  the block's bytes as they are (exact).
  "fp8"  float8 e4m3 with one float32 scale per group, where a group is one index of every dim but
         the last two (for a block laid out [layers, 2, block_size, kv_heads, head_dim] that is one
         scale per layer, K/V and token, shared across heads). Half the bytes of bf16, a quarter of
         fp32; per-element error is at most 2^-4 of the value (3 mantissa bits, round to nearest),
         or 2^-10 of the scale for values in e4m3's subnormal range. tests/unit/test_prefix_blob.py
         measures it.
No pickle: the header is JSON, the payload raw tensor bytes.

`encode_batch` encodes a whole step's blocks at once for the tier's writer thread: one tensor copy
into one buffer (which also does the layer-major -> block-major transpose), then per block only a
CRC32 (which releases the GIL on buffers this large) and a header written into place. The header is
padded with spaces (valid JSON) so that payloads start 16-byte aligned; readers need no change.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAGIC = b"KVB1"
_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max   # 448
ENCODINGS = ("raw", "fp8")
_HASH_BYTES = 16       # services/prefix_cache/hashing.py
_CRC_CHARS = 10        # len(str(2**32 - 1))
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float8_e4m3fn": _FP8}   # an engine's fp8 KV cache (EngineConfig.kv_cache_dtype)


class BlobError(ValueError):
    """A blob that is corrupt or describes a different block, model or layout than expected."""


@dataclass(slots=True, frozen=True)
class KVLayout:
    """How one block's KV is laid out: `shape` excludes the block dimension.

    `name` names the axis order (e.g. "LKBHD": layers, K/V, block slot, kv heads, head dim); two
    layouts with the same shape but a different axis order must have different names.
    """
    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"KVLayout.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"KVLayout.shape must be non-empty positive dims, got {self.shape!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def num_bytes(self) -> int:
        """Bytes of one block in the engine's cache (the raw payload size)."""
        return self.numel * self.torch_dtype.itemsize

    @property
    def fingerprint(self) -> str:
        """Short id of this layout, part of every tier key."""
        text = f"{self.name}:{'x'.join(map(str, self.shape))}:{self.dtype}"
        return f"{zlib.crc32(text.encode()):08x}"


@dataclass(slots=True, frozen=True)
class BlockCodec:
    """Encodes one block tensor (shape `layout.shape`) to a blob and back, checking everything."""
    layout: KVLayout
    model_fingerprint: str
    encoding: str = "raw"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}")

    def encode(self, block_hash: bytes, block: torch.Tensor) -> bytes:
        if tuple(block.shape) != self.layout.shape or block.dtype != self.layout.torch_dtype:
            raise ValueError(f"block of shape {tuple(block.shape)} {block.dtype} does not match "
                             f"layout {self.layout.shape} {self.layout.dtype}")
        return bytes(self.encode_batch([block_hash], block.unsqueeze(0))[0])

    def encode_batch(self, block_hashes: Sequence[bytes], blocks: torch.Tensor) -> list[memoryview]:
        """Blobs of `blocks` [n, *layout.shape] (any strides, any device), one per hash, as views
        into one fresh buffer (hand them to the store as they are: no further copy)."""
        n, shape = len(block_hashes), self.layout.shape
        if tuple(blocks.shape) != (n, *shape) or blocks.dtype != self.layout.torch_dtype:
            raise ValueError(f"blocks of shape {tuple(blocks.shape)} {blocks.dtype} do not match "
                             f"{n} blocks of layout {shape} {self.layout.dtype}")
        if any(len(h) != _HASH_BYTES for h in block_hashes):
            raise ValueError(f"block hashes are {_HASH_BYTES} bytes (services/prefix_cache/hashing.py)")
        template = self._header_template
        off = len(template) - len(b"@HASH@@CRC@") + 2 * _HASH_BYTES + _CRC_CHARS
        nbytes = self._payload_bytes
        stride = -(-(off + nbytes) // 16) * 16       # every row's payload stays 16-byte aligned
        buf = torch.empty((n, stride), dtype=torch.uint8)
        body = buf[:, off:off + nbytes]
        blocks = blocks.detach().to("cpu")
        if self.encoding == "fp8":
            groups = _num_groups(shape)
            scales, q = _fp8_quantize(blocks.float())       # [n * groups], [n, *shape]
            body[:, :groups * 4].view(torch.float32).copy_(scales.view(n, groups))
            body[:, groups * 4:].view(_FP8).view(n, *shape).copy_(q)
        else:
            body.view(self.layout.torch_dtype).view(n, *shape).copy_(blocks)
        flat = memoryview(buf.numpy()).cast("B")
        blobs = []
        for i, h in enumerate(block_hashes):
            base = i * stride
            crc = zlib.crc32(flat[base + off:base + off + nbytes])
            flat[base:base + off] = template.replace(b"@HASH@", h.hex().encode()).replace(
                b"@CRC@", f"{crc:{_CRC_CHARS}d}".encode())
            blobs.append(flat[base:base + off + nbytes])
        return blobs

    @property
    def _payload_bytes(self) -> int:
        if self.encoding == "fp8":
            return _num_groups(self.layout.shape) * 4 + self.layout.numel
        return self.layout.num_bytes

    @property
    def _header_template(self) -> bytes:
        """MAGIC | u32 length | JSON header with @HASH@ / @CRC@ placeholders, padded so that the
        payload starts at a multiple of 16 bytes. A CRC is written as 10 characters (spaces before
        the digits are JSON whitespace), so every header of this codec has the same length."""
        header = {
            "layout": self.layout.name, "shape": list(self.layout.shape), "dtype": self.layout.dtype,
            "model": self.model_fingerprint, "hash": "@HASH@", "encoding": self.encoding,
            "crc32": 0, "nbytes": self._payload_bytes,
        }
        text = json.dumps(header, separators=(",", ":")).replace('"crc32":0', '"crc32":@CRC@')
        hlen = len(text) - len("@HASH@@CRC@") + 2 * _HASH_BYTES + _CRC_CHARS
        pad = -(8 + hlen) % 16
        return MAGIC + struct.pack("<I", hlen + pad) + text.encode() + b" " * pad

    def decode(self, block_hash: bytes, blob: bytes) -> torch.Tensor:
        """The block tensor (layout shape and dtype, CPU); raises BlobError if anything mismatches."""
        if len(blob) < 8 or blob[:4] != MAGIC:
            raise BlobError("not a KV block blob (bad magic)")
        (hlen,) = struct.unpack_from("<I", blob, 4)
        try:
            header = json.loads(blob[8:8 + hlen])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BlobError(f"unreadable blob header: {e}") from None
        if not isinstance(header, dict):
            raise BlobError("unreadable blob header: not an object")
        expect = {"layout": self.layout.name, "shape": list(self.layout.shape),
                  "dtype": self.layout.dtype, "model": self.model_fingerprint,
                  "hash": block_hash.hex()}
        for field, want in expect.items():
            if header.get(field) != want:
                raise BlobError(f"blob {field} is {header.get(field)!r}, expected {want!r}")
        payload = memoryview(blob)[8 + hlen:]
        if header.get("nbytes") != len(payload) or header.get("crc32") != zlib.crc32(payload):
            raise BlobError("blob payload checksum mismatch (corrupt or truncated)")
        encoding = header.get("encoding")
        if encoding == "raw":
            return _tensor(payload, self.layout.torch_dtype, self.layout.shape)
        if encoding == "fp8":
            groups = _num_groups(self.layout.shape)
            if len(payload) != groups * 4 + self.layout.numel:
                raise BlobError("fp8 blob has the wrong payload size for its layout")
            scales = _tensor(payload[:groups * 4], torch.float32, (groups,))
            q = _tensor(payload[groups * 4:], _FP8, self.layout.shape)
            return _fp8_dequantize(scales, q).to(self.layout.torch_dtype)
        raise BlobError(f"unknown blob encoding {encoding!r}")


def _num_groups(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[:-2]:
        n *= d
    return n


def _fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [*lead, a, b] -> (scales float32 [prod(lead)], q fp8 x.shape)."""
    g = x.reshape(_num_groups(tuple(x.shape)), -1)
    # A zero group gets scale 1 so that dequantising gives exact zeros rather than NaN.
    scales = g.abs().amax(dim=1).div(_FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    scales = torch.where(g.abs().amax(dim=1) > 0, scales, torch.ones_like(scales))
    q = (g / scales[:, None]).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
    return scales.contiguous(), q.reshape(x.shape).contiguous()


def _fp8_dequantize(scales: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    g = q.reshape(scales.shape[0], -1).to(torch.float32) * scales[:, None]
    return g.reshape(q.shape)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(buf: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    # bytearray: torch.frombuffer wants a writable buffer; the copy is the one we hand the engine.
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).view(dtype).reshape(shape)
