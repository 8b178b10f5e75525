"""Our model against Hugging Face `LlamaForCausalLM` on identical random weights.

Both sides load the same safetensors directory: HF directly, ours through `load_model`, so the
q/k un-permutation of the HF layout is part of what is tested.
"""

from __future__ import annotations

import pytest
import torch

from checkpoints import random_weights, tiny_args, write_hf
from llamaserve.weights import load_model

TOL = 1e-4
DECODE_STEPS = 16
BATCH_TOL = 1e-5

CASES = {
    "llama2-untied": dict(kind="llama2", tied=False, n_files=1),
    "llama2-tied": dict(kind="llama2", tied=True, n_files=1),
    "llama3-gqa-untied": dict(kind="llama3", tied=False, n_files=2),
    "llama3-gqa-tied": dict(kind="llama3", tied=True, n_files=1),
    "llama31-scaled-rope-untied": dict(kind="llama31", tied=False, n_files=3),
}


def _hf_model(directory, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="eager")
    return model.eval()


def logits_beside_hf(ours, hf, prompt, slot, steps=DECODE_STEPS):
    """Pairs of (our, HF) float32 logits: the prompt's at every position, then one pair per decode
    step, both sides fed our greedy token. `prompt` [1, T] and `slot` [1] on the models' device."""
    import inspect

    from transformers import DynamicCache

    # transformers renamed `past_key_values` to `cache` (5.24 has `cache`, 5.17 the old name);
    # a wrong name is swallowed by **kwargs and HF would decode without its cache.
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    device = prompt.device
    cache = ours.new_cache(n_slots=4, max_seq_len=64)
    logits = ours(prompt, torch.tensor([0], device=device), slot, cache, all_logits=True)
    hf_kwargs = {cache_kw: DynamicCache(), "use_cache": True}
    with torch.no_grad():
        out = hf(input_ids=prompt, **hf_kwargs)
    yield logits, out.logits.float()
    pos = prompt.shape[1]
    token = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(steps):
        step_logits = ours(token, torch.tensor([pos], device=device), slot, cache)
        with torch.no_grad():
            out = hf(input_ids=token, **hf_kwargs)
        yield step_logits, out.logits[:, -1].float()
        token = step_logits.argmax(-1, keepdim=True)
        pos += 1


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_match_hf(tmp_path, case, packed):
    spec = CASES[case]
    args = tiny_args(spec["kind"], tied=spec["tied"])
    sd = random_weights(args, seed=7)
    directory = write_hf(tmp_path / "hf", args, sd, n_files=spec["n_files"])

    ours = load_model(directory, progress=False)
    assert ours.format == "hf" and ours.args.to_hf_config() == args.to_hf_config()
    if packed:  # what the engine runs on CPU
        assert ours.model.pack_weights()
        assert not ours.model.tok_embeddings.weight.is_meta
    hf = _hf_model(directory)
    if spec["tied"]:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab_size, (1, 9), generator=gen)
    slot = torch.tensor([2])  # not slot 0, so a slot mix-up shows
    pairs = logits_beside_hf(ours.model, hf, prompt, slot)
    logits, hf_logits = next(pairs)
    torch.testing.assert_close(logits, hf_logits, atol=TOL, rtol=0)
    for step, (step_logits, hf_step) in enumerate(pairs):
        diff = (step_logits - hf_step).abs().max().item()
        assert diff <= TOL, f"{case}: decode step {step} (position {prompt.shape[1] + step}) differs from HF by {diff}"


def test_batched_decode_at_different_positions_equals_decoding_alone(tmp_path):
    """Rows in one decode call never influence each other, whatever their positions and slots."""
    args = tiny_args("llama3", small_vocab=True)
    lm = load_model(write_hf(tmp_path / "hf", args, random_weights(args, seed=3)), progress=False)
    model = lm.model
    gen = torch.Generator().manual_seed(5)
    # Prompt lengths put the users in different key buckets.
    lengths, slots = [5, 37, 131], [0, 3, 5]
    prompts = [torch.randint(0, args.vocab_size, (1, n), generator=gen) for n in lengths]

    def prefilled():
        cache = model.new_cache(n_slots=6, max_seq_len=256)
        firsts = []
        for p, s in zip(prompts, slots):
            firsts.append(model(p, torch.tensor([0]), torch.tensor([s]), cache).argmax(-1))
        return cache, torch.cat(firsts)

    together_cache, tokens = prefilled()
    alone_cache, _ = prefilled()
    positions = torch.tensor(lengths)
    for step in range(4):
        batched = model(tokens[:, None], positions, torch.tensor(slots), together_cache)
        for row in range(len(slots)):
            alone = model(
                tokens[row : row + 1, None], positions[row : row + 1], torch.tensor(slots[row : row + 1]), alone_cache
            )
            # Not bit-exact: BLAS picks different kernels for 1 row and for several rows, which
            # reorders float sums (measured max diff ~5e-7). Cross-row leaks would be far larger.
            diff = (batched[row] - alone[0]).abs().max().item()
            assert diff <= BATCH_TOL, f"step {step}, row {row} (slot {slots[row]}): max diff {diff}"
        tokens = batched.argmax(-1)
        positions = positions + 1
