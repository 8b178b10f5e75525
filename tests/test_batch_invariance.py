"""A row's decode logits must not depend on the rest of the batch (engine determinism rests on it)."""

import pytest
import torch
import torch.nn.functional as F

from llamaserve.config import ModelArgs
from llamaserve.model.llama import Transformer
from llamaserve.weights.builtin import random_state_dict

ROWS = 2  # the engine pads CPU decode batches to at least this many rows


def test_attention_ignores_masked_tail_batch_and_strides():
    from llamaserve.model.kv_cache import KV_BUCKET

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 12, 1, 64, generator=gen)
    keys = torch.randn(1, 4, 1024, 64, generator=gen)
    values = torch.randn(1, 4, 1024, 64, generator=gen)
    for pos in (0, 5, 15, 16, 127, 128, 300, 600):
        def attend(kv_len, batch, contiguous):
            k = keys[:, :, :kv_len].expand(batch, -1, -1, -1)
            v = values[:, :, :kv_len].expand(batch, -1, -1, -1)
            if contiguous:
                k, v = k.contiguous(), v.contiguous()
            mask = (torch.arange(kv_len) <= pos).view(1, 1, 1, kv_len).expand(batch, 1, 1, kv_len)
            return F.scaled_dot_product_attention(q.expand(batch, -1, -1, -1), k, v, attn_mask=mask, enable_gqa=True)[0]

        shortest = (pos // KV_BUCKET + 1) * KV_BUCKET
        reference = attend(shortest, 1, True)
        for kv_len in (shortest + KV_BUCKET, shortest + 7 * KV_BUCKET, 1024):
            for batch in (1, 17):
                for contiguous in (True, False):
                    assert torch.equal(attend(kv_len, batch, contiguous), reference), (pos, kv_len, batch, contiguous)


def _model(packed: bool):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3, std=0.1), strict=False)
    if packed:
        assert model.pack_weights()
    return model


both_layouts = pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])


@both_layouts
def test_decode_row_is_bitwise_identical_whatever_the_batch(packed):
    model = _model(packed)
    cache = model.new_cache(40, 1024)
    gen = torch.Generator().manual_seed(1)
    # Fill 40 slots with prompts of different lengths.
    lengths = [int(x) for x in torch.randint(3, 700, (40,), generator=gen)]
    for slot, n in enumerate(lengths):
        prompt = torch.randint(0, 256, (1, n), generator=gen)
        model(prompt, torch.tensor([0]), torch.tensor([slot]), cache)
    target_slot, token = 7, torch.tensor([[42]])

    def decode(slots):
        tokens = torch.randint(0, 256, (len(slots), 1), generator=gen)
        row = slots.index(target_slot)
        tokens[row] = token
        positions = torch.tensor([lengths[s] for s in slots])
        saved = [(k[target_slot].clone(), v[target_slot].clone()) for k, v in zip(cache.keys, cache.values)]
        logits = model(tokens, positions, torch.tensor(slots), cache)[row]
        for (k, v), layer_k, layer_v in zip(saved, cache.keys, cache.values):  # undo the write
            layer_k[target_slot], layer_v[target_slot] = k, v
        return logits

    reference = decode([6, 7])  # consecutive slots: read as a view
    assert torch.equal(decode(list(range(7, 7 + ROWS))), reference)
    assert torch.equal(decode([7, 30]), reference)
    assert torch.equal(decode(list(range(0, 16))), reference)
    assert torch.equal(decode(list(range(0, 40))), reference)
    gathered = [30, 7, 2, 39, 11, 5, 20, 21, 22, 1, 0, 33, 34, 35, 36, 37]  # not consecutive: gathered copy
    assert torch.equal(decode(gathered), reference)
    assert torch.equal(decode(gathered + [8, 9, 10, 12, 13]), reference)


@both_layouts
def test_head_rows_are_bitwise_identical_for_any_decode_batch(packed):
    model = _model(packed)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 1, 64, generator=gen)
    reference = model._head(hidden[:ROWS])[0]
    for rows in (3, 17, 32, 33, 40):
        assert torch.equal(model._head(hidden[:rows])[0], reference), rows
    moved = torch.cat([hidden[1:9], hidden[:1], hidden[9:16]])
    assert torch.equal(model._head(moved)[8], reference)
    # The fast path computes the same projection as the layer itself.
    torch.testing.assert_close(reference[0], model.output(hidden[:1])[0, 0], rtol=1e-5, atol=1e-5)


def test_packed_linear_rows_are_bitwise_identical_across_the_row_stable_range():
    from llamaserve.model.llama import PACKED_ROW_STABLE_MAX, PACKED_ROW_STABLE_MIN, Linear

    gen = torch.Generator().manual_seed(11)
    # The benchmark model's shapes (fused q/k/v and w1/w3, a 128k-vocabulary head) and a tiny one.
    for in_features, out_features in ((768, 1280), (768, 4096), (2048, 768), (768, 768), (768, 128256), (64, 352)):
        layer = Linear(in_features, out_features, bias=False)
        weight = torch.randn(out_features, in_features, generator=gen) * 0.02
        layer.weight.data = weight
        assert layer.pack() and layer.weight.is_meta
        x = torch.randn(PACKED_ROW_STABLE_MAX, 1, in_features, generator=gen)
        full = layer(x)
        step = 1 if out_features < 100_000 else 23  # the head is slow: a sample of row counts
        for rows in [*range(PACKED_ROW_STABLE_MIN, PACKED_ROW_STABLE_MAX, step), PACKED_ROW_STABLE_MAX]:
            assert torch.equal(layer(x[:rows]), full[:rows]), (in_features, out_features, rows)
        other = torch.randn(7, 1, in_features, generator=gen)
        other[4] = x[0]
        assert torch.equal(layer(other)[4], full[0])
        # Strided input (the head reads the last position of a prefill) gives the same rows.
        strided = torch.randn(3, 5, in_features, generator=gen)
        strided[:, -1] = x[:3, 0]
        assert torch.equal(layer(strided[:, -1:]), full[:3])
        torch.testing.assert_close(full[:, 0], x[:, 0] @ weight.t(), rtol=1e-5, atol=1e-5)


def test_linear_rows_are_bitwise_identical_across_the_row_stable_range():
    from llamaserve.model.llama import CPU_ROW_STABLE_MAX, CPU_ROW_STABLE_MIN, Linear

    gen = torch.Generator().manual_seed(9)
    for in_features, out_features in ((768, 2048), (2048, 768), (768, 256)):
        layer = Linear(in_features, out_features, bias=False)
        layer.weight.data = torch.randn(out_features, in_features, generator=gen) * 0.02
        x = torch.randn(CPU_ROW_STABLE_MAX, 1, in_features, generator=gen)
        reference = layer(x[:CPU_ROW_STABLE_MIN])[0]
        for rows in range(CPU_ROW_STABLE_MIN, CPU_ROW_STABLE_MAX + 1):
            assert torch.equal(layer(x[:rows])[0], reference), (in_features, out_features, rows)
        other = torch.randn(7, 1, in_features, generator=gen)
        other[4] = x[0]
        assert torch.equal(layer(other)[4], reference)
        torch.testing.assert_close(reference, torch.nn.functional.linear(x[:1], layer.weight)[0], rtol=1e-5, atol=1e-5)


def test_int8_linear_rows_are_bitwise_identical_across_the_row_stable_range():
    from llamaserve.model.llama import CPU_ROW_STABLE_MAX, CPU_ROW_STABLE_MIN
    from llamaserve.weights.quant import QuantLinear

    gen = torch.Generator().manual_seed(13)
    layer = QuantLinear(768, 2048)
    layer.weight.copy_(torch.randint(-127, 128, (2048, 768), generator=gen, dtype=torch.int8))
    layer.scale.copy_(torch.rand(2048, generator=gen) * 1e-3)
    x = torch.randn(CPU_ROW_STABLE_MAX, 1, 768, generator=gen)
    full = layer(x)
    for rows in range(CPU_ROW_STABLE_MIN, CPU_ROW_STABLE_MAX):
        assert torch.equal(layer(x[:rows]), full[:rows]), rows
