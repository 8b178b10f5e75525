"""Python API: LLM.generate / chat / stream, and greedy generation against Hugging Face."""

import pytest
import torch
from checkpoints import random_weights, tiny_args, write_hf
from engine_util import ByteTokenizer, one_thread, tiny_model

from llamaserve.engine.request import SamplingParams
from llamaserve.llm import LLM

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def small():
    return LLM(tiny_model(), tokenizer=ByteTokenizer(), max_users=4, max_seq_len=128, prefill_chunk=16)


def test_greedy_generate_equals_hugging_face_generate(tmp_path):
    from transformers import LlamaForCausalLM

    args = tiny_args("llama3")  # GQA, Llama 3 vocabulary and tokenizer
    hf_dir = write_hf(tmp_path / "hf", args, random_weights(args, seed=11))
    llm = LLM(str(hf_dir), max_users=4, max_seq_len=256, progress=False)
    prompts = ["The quick brown fox", "Über café 東京 🎉 and more"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))

    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    for text, out in zip(prompts, outs):
        assert out.prompt_token_ids == llm.tokenizer.encode(text, bos=True)
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                eos_token_id=None, pad_token_id=0,
            )
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()
        assert out.finish_reason == "length"
        assert out.text == llm.tokenizer.decode(out.token_ids)


def test_outputs_come_back_in_order_with_per_prompt_params(small):
    prompts = [[1, 2, 3], [4, 5], [6] * 20, [7, 8, 9, 10], [11], [12, 13]]  # more than 4 slots
    params = [SamplingParams(max_tokens=n + 1, temperature=0, ignore_eos=True) for n in range(len(prompts))]
    outs = small.generate(prompts, params)
    assert [o.index for o in outs] == list(range(len(prompts)))
    for n, (p, o) in enumerate(zip(prompts, outs)):
        assert o.prompt_token_ids == p
        assert len(o.token_ids) == n + 1
        assert o.usage == {"prompt_tokens": len(p), "completion_tokens": n + 1, "total_tokens": len(p) + n + 1}
        assert o.first_token_s is not None and len(o.token_times_s) == n + 1
        # Same answer as that prompt run on its own.
        assert small.generate([p], params[n])[0].token_ids == o.token_ids


def test_more_prompts_than_the_queue_holds():
    llm = LLM(tiny_model(), tokenizer=ByteTokenizer(), max_users=2, max_queued=3, max_seq_len=64)
    outs = llm.generate([[i + 1] for i in range(12)], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [2] * 12


def test_text_chat_and_system_prompts(small):
    tok = small.tokenizer
    out = small.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert out.prompt_token_ids == tok.encode("hi", bos=True)
    dialog = [{"role": "user", "content": "hello"}]
    chat = small.chat(["hello"], SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert chat.prompt_token_ids == tok.encode_chat(dialog)
    assert small.generate([dialog], SamplingParams(max_tokens=2))[0].prompt_token_ids == tok.encode_chat(dialog)
    sys_out = small.chat("hello", SamplingParams(max_tokens=2), system="be brief")[0]
    assert sys_out.prompt_token_ids == tok.encode_chat([{"role": "system", "content": "be brief"}] + dialog)


def test_seeded_sampling_is_reproducible_through_the_api(small):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    a = small.generate([[1, 2, 3]], p)[0].token_ids
    b = small.generate([[9, 9], [1, 2, 3], [4]], p)[1].token_ids
    assert a == b


def test_stream_yields_deltas_that_add_up(small):
    p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = list(small.stream([1, 2, 3], p))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    ids = [t for o in outs for t in o.new_token_ids]
    assert ids == small.generate([[1, 2, 3]], p)[0].token_ids
    assert "".join(o.text_delta for o in outs) == small.tokenizer.decode(ids)


def test_bad_input_is_reported_clearly(small):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        small.generate([[1]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="needs a checkpoint to split"):
        LLM(tiny_model(), tokenizer=ByteTokenizer(), tensor_parallel=2)
    with pytest.raises(ValueError, match="max_tokens"):
        small.generate([[1]], SamplingParams(max_tokens=0))
    assert not small.engine.has_unfinished()
