"""KV block blobs: exact round trips, every mismatch detected, fp8's accuracy measured."""
import pytest
import torch

from services.prefix_cache.blob import BlobError, BlockCodec, KVLayout
from services.prefix_cache.hashing import block_hashes

LAYOUT = KVLayout("LKBHD", (2, 2, 16, 2, 32), "bfloat16")   # layers, K/V, slots, kv heads, head dim
H = block_hashes(list(range(32)), 16, salt="tenant-a")


def block(dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32", "float16"])
def test_raw_round_trip_is_exact(dtype_name):
    layout = KVLayout("LKBHD", LAYOUT.shape, dtype_name)
    codec = BlockCodec(layout, "model-a")
    x = block(layout.torch_dtype)
    blob = codec.encode(H[0], x)
    assert len(blob) > layout.num_bytes       # header + payload
    y = codec.decode(H[0], blob)
    assert y.dtype == x.dtype and torch.equal(x, y)


def test_corrupt_payload_byte_is_detected():
    codec = BlockCodec(LAYOUT, "model-a")
    blob = bytearray(codec.encode(H[0], block()))
    blob[-7] ^= 0x01
    with pytest.raises(BlobError, match="checksum"):
        codec.decode(H[0], bytes(blob))


def test_truncated_and_garbage_blobs_are_detected():
    codec = BlockCodec(LAYOUT, "model-a")
    blob = codec.encode(H[0], block())
    with pytest.raises(BlobError, match="checksum"):
        codec.decode(H[0], blob[:-100])
    with pytest.raises(BlobError, match="magic"):
        codec.decode(H[0], b"not a blob at all")
    with pytest.raises(BlobError, match="header"):
        codec.decode(H[0], blob[:4] + blob[4:8] + b"\xff" * 40 + blob[48:])


@pytest.mark.parametrize("other", [
    dict(model_fingerprint="model-b"),
    dict(layout=KVLayout("KLBHD", LAYOUT.shape, "bfloat16")),
    dict(layout=KVLayout("LKBHD", LAYOUT.shape, "float16")),
])
def test_blob_for_another_model_or_layout_is_rejected(other):
    blob = BlockCodec(LAYOUT, "model-a").encode(H[0], block())
    reader = BlockCodec(**{"layout": LAYOUT, "model_fingerprint": "model-a", **other})
    with pytest.raises(BlobError, match="expected"):
        reader.decode(H[0], blob)


def test_blob_under_another_hash_is_rejected():
    codec = BlockCodec(LAYOUT, "model-a")
    with pytest.raises(BlobError, match="hash"):
        codec.decode(H[1], codec.encode(H[0], block()))


def test_encode_rejects_a_block_of_the_wrong_shape():
    with pytest.raises(ValueError, match="does not match layout"):
        BlockCodec(LAYOUT, "m").encode(H[0], torch.zeros(3, 3))


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="dtype"):
        KVLayout("x", (1, 2), "int8")
    with pytest.raises(ValueError, match="encoding"):
        BlockCodec(LAYOUT, "m", encoding="zstd")


def test_fp8_halves_bf16_and_error_stays_within_e4m3_bounds():
    """Measures fp8's accuracy on random KV (normal, with a few outliers as real KV has)."""
    raw, fp8 = BlockCodec(LAYOUT, "m"), BlockCodec(LAYOUT, "m", encoding="fp8")
    max_abs, max_rel_to_amax, sum_rel, n = 0.0, 0.0, 0.0, 0
    for seed in range(8):
        x = block(torch.float32, seed)
        x.view(-1)[:: 97] *= 8.0                               # outliers stretch the scales
        x = x.to(torch.bfloat16)
        y = fp8.decode(H[0], fp8.encode(H[0], x)).float()
        xf = x.float()
        err = (y - xf).abs()
        amax = xf.reshape(-1, 2 * 32).abs().amax(dim=1)        # one scale per (layer, K/V, slot)
        # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative; subnormals (step 2^-9): 2^-10 of the
        # scale; plus 2^-8 for rounding the result back to bf16.
        scale = (amax / 448.0).repeat_interleave(64).reshape(xf.shape)
        bound = (torch.maximum(xf.abs() * 2 ** -4, scale * 2 ** -10) + xf.abs() * 2 ** -8) * 1.001
        assert bool((err <= bound).all()), float((err - bound).max())
        max_abs = max(max_abs, float(err.max()))
        max_rel_to_amax = max(max_rel_to_amax, float((err.reshape(-1, 64).amax(1) / amax).max()))
        nz = xf.abs() > 1e-3
        sum_rel += float((err[nz] / xf.abs()[nz]).sum())
        n += int(nz.sum())
    mean_rel = sum_rel / n
    print(f"fp8 e4m3 vs bf16 KV: max_abs={max_abs:.4f} max_err/group_amax={max_rel_to_amax:.4f} "
          f"mean_rel={mean_rel:.4f}")
    assert max_rel_to_amax <= 2 ** -4 and mean_rel < 0.04
    assert len(fp8.encode(H[0], x)) < 0.6 * len(raw.encode(H[0], x))


def test_fp8_keeps_zero_blocks_exact():
    codec = BlockCodec(LAYOUT, "m", encoding="fp8")
    z = torch.zeros(LAYOUT.shape, dtype=torch.bfloat16)
    assert torch.equal(codec.decode(H[0], codec.encode(H[0], z)), z)


@pytest.mark.parametrize("encoding", ["raw", "fp8"])
def test_batch_encoding_matches_one_by_one_from_a_layer_major_copy(encoding):
    codec = BlockCodec(LAYOUT, "model-a", encoding)
    hashes = block_hashes(list(range(16 * 5)), 16, salt="t")
    blocks = torch.stack([block(seed=i) for i in range(5)])          # [n, L, 2, slots, heads, dim]
    layer_major = blocks.permute(1, 2, 0, 3, 4, 5).contiguous()      # what KVTier gathers per step
    blobs = codec.encode_batch(hashes, layer_major.permute(2, 0, 1, 3, 4, 5))
    assert [bytes(b) for b in blobs] == [codec.encode(h, x) for h, x in zip(hashes, blocks)]
    for h, b, x in zip(hashes, blobs, blocks):
        y = codec.decode(h, bytes(b))
        assert torch.equal(x, y) if encoding == "raw" else torch.allclose(x.float(), y.float(), rtol=0.07, atol=1e-3)
    header_len = int.from_bytes(bytes(blobs[0][4:8]), "little")
    assert (8 + header_len) % 16 == 0                                 # payloads stay aligned
    with pytest.raises(ValueError, match="do not match"):
        codec.encode_batch(hashes[:2], blocks)
