"""A row's decode logits must not depend on the rest of the batch (engine determinism rests on it)."""

import pytest
import torch

from llamaserve.config import ModelArgs
from llamaserve.model.kv_cache import KVCache, plan_attention
from llamaserve.model.llama import Attention, Transformer
from llamaserve.model.parallel import SINGLE
from llamaserve.weights.builtin import random_state_dict

ROWS = 2  # the engine pads CPU decode batches to at least this many rows


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_torch_decode_attention_row_depends_only_on_the_row(threads):
    """The torch decode path (no kernels, or dtypes they do not take) attends each row on its own:
    torch's CPU attention splits its work by batch size and thread count."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=256, multiple_of=32)
    attn = Attention(args, SINGLE)
    gen = torch.Generator().manual_seed(0)
    for w in (attn.wq, attn.wk, attn.wv, attn.wo):
        w.weight.data = torch.randn(w.weight.shape, generator=gen) * 0.05
    cache = KVCache(1, 24, 2, 1024, 32, torch.float32, "cpu")  # slot s owns blocks 1 + 64 s ..
    for pool in (cache.keys[0], cache.values[0]):
        pool.copy_(torch.randn(pool.shape, generator=gen))
    lengths = [int(n) for n in torch.randint(1, 1000, (24,), generator=gen)]
    target, x = 7, torch.randn(1, 1, 256, generator=gen)
    rotation_table = torch.polar(torch.ones(1024, 16), torch.arange(1024)[:, None] * attn_freqs(args))

    def decode(slots):
        xs = torch.randn(len(slots), 1, 256, generator=gen)
        xs[slots.index(target)] = x[0]
        positions = torch.tensor([[lengths[s]] for s in slots])
        k, v = cache.keys[0].clone(), cache.values[0].clone()
        out = attn(xs, rotation_table[positions][:, :, None], positions, k, v,
                   plan_attention(positions, torch.tensor(slots), cache))
        return out[slots.index(target)]

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reference = decode([target, 8])  # decode calls have 2 rows or more (the runner pads)
        for slots in ([6, 7], [7, 8, 9], list(range(0, 8)), list(range(0, 24)), [20, 7, 3], [1, 7, 23, 2, 5, 11, 0, 4]):
            assert torch.equal(decode(slots), reference), slots
    finally:
        torch.set_num_threads(previous)


def attn_freqs(args):
    from llamaserve.model.llama import rope_frequencies

    return rope_frequencies(args)


def _model(packed: bool, kernels: bool = True):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32)
    model = Transformer(args)
    model.load_state_dict(random_state_dict(args, seed=3, std=0.1), strict=False)
    if packed:
        assert model.pack_weights()
    if not kernels:
        model.decode_kernels_fit = lambda: False  # the torch decode path (LLAMASERVE_KERNELS=0, bf16)
    return model


both_layouts = pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])


@pytest.mark.parametrize("packed,kernels", [(True, True), (False, True), (True, False)],
                         ids=["packed", "unpacked", "torch-decode"])
def test_decode_row_is_bitwise_identical_whatever_the_batch(packed, kernels):
    model = _model(packed, kernels)
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
    from llamaserve.model.cpu_linear import PACKED_ROW_STABLE_MAX, PACKED_ROW_STABLE_MIN, Linear

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
    """Unpacked weights (int8 layers dequantise to them; bf16): the same row bits from 2 rows up."""
    from llamaserve.model.cpu_linear import CPU_ROW_STABLE_MIN, PACKED_ROW_STABLE_MAX, Linear

    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        for in_features, out_features in ((768, 2048), (2048, 768), (768, 256)):
            layer = Linear(in_features, out_features, bias=False)
            layer.weight.data = (torch.randn(out_features, in_features, generator=gen) * 0.02).to(dtype)
            x = torch.randn(PACKED_ROW_STABLE_MAX, 1, in_features, generator=gen).to(dtype)
            full = layer(x)
            for rows in [*range(CPU_ROW_STABLE_MIN, 66), 127, 128, 129, PACKED_ROW_STABLE_MAX - 1]:
                assert torch.equal(layer(x[:rows]), full[:rows]), (dtype, in_features, out_features, rows)
            other = torch.randn(7, 1, in_features, generator=gen).to(dtype)
            other[4] = x[0]
            assert torch.equal(layer(other)[4], full[0])
            torch.testing.assert_close(full[:, 0], torch.nn.functional.linear(x[:, 0], layer.weight),
                                       rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_int8_linear_rows_are_bitwise_identical_across_the_row_stable_range():
    from llamaserve.model.cpu_linear import CPU_ROW_STABLE_MIN
    from llamaserve.weights.quant import QuantLinear

    gen = torch.Generator().manual_seed(13)
    layer = QuantLinear(768, 2048)
    layer.weight.copy_(torch.randint(-127, 128, (2048, 768), generator=gen, dtype=torch.int8))
    layer.scale.copy_(torch.rand(2048, generator=gen) * 1e-3)
    x = torch.randn(130, 1, 768, generator=gen)
    full = layer(x)
    for rows in [*range(CPU_ROW_STABLE_MIN, 66), 129, 130]:
        assert torch.equal(layer(x[:rows]), full[:rows]), rows
