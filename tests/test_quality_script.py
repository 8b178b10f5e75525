"""benchmarks/quality.py's llama.cpp side: the KL-divergence base file it writes for
`llama-perplexity --kl-divergence` (read back here the way tools/perplexity/perplexity.cpp reads
it), the positions both sides score, and the parsing of llama-perplexity's summary."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import llama_cpp_kld  # noqa: E402
import quality  # noqa: E402


def read_base(data: bytes):
    """perplexity.cpp's kl_divergence(): header, tokens, then per scored position the
    dequantised log-probabilities scale * q + min_log_prob."""
    assert data[:8] == b"_logits_"
    n_ctx = int(np.frombuffer(data, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(x) for x in np.frombuffer(data, "<i4", 2, 12))
    tokens = np.frombuffer(data, "<i4", n_ctx * n_chunk, 20)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    per_chunk = n_ctx - 1 - n_ctx // 2
    rows = np.frombuffer(data, "<u2", offset=20 + 4 * n_ctx * n_chunk).reshape(n_chunk * per_chunk, nv)
    head = rows[:, :4].copy().view("<f4")
    log_probs = head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]
    return n_ctx, n_vocab, tokens.reshape(n_chunk, n_ctx), log_probs


@pytest.mark.parametrize("n_vocab", [49, 50])
def test_base_file_holds_the_windows_and_their_second_half_log_probs(n_vocab):
    torch.manual_seed(0)
    windows = [torch.randint(0, n_vocab, (16,)) for _ in range(3)]
    logits = [torch.randn(16, n_vocab) * 4 for _ in windows]
    logits[1][5, 7] = 40.0  # one position whose tail lies more than 16 below its top
    f = io.BytesIO()
    llama_cpp_kld.write_header(f, windows, n_vocab)
    for lg in logits:
        llama_cpp_kld.write_window(f, lg)
    n_ctx, vocab, tokens, log_probs = read_base(f.getvalue())
    assert (n_ctx, vocab) == (16, n_vocab)
    assert np.array_equal(tokens, torch.stack(windows).numpy())
    # llama.cpp scores positions 8..14 of a 16-token window (each predicting the next token).
    expected = torch.cat([torch.log_softmax(lg[8:15].double(), -1) for lg in logits]).numpy()
    assert log_probs.shape == expected.shape
    near = expected > expected.max(-1, keepdims=True) - 16  # lower ones are stored as the floor
    step = (log_probs.max(-1) - log_probs.min(-1))[:, None] / 65535
    assert (np.abs(log_probs - expected)[near] <= (step / 2 + 1e-5).repeat(n_vocab, 1)[near]).all()
    assert (log_probs[~near] <= -16 + expected.max(-1, keepdims=True).repeat(n_vocab, 1)[~near] + 1e-4).all()


def test_windows_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="same length"):
        llama_cpp_kld.write_header(io.BytesIO(), [torch.zeros(8, dtype=torch.long), torch.zeros(6, dtype=torch.long)], 4)


def test_second_half_scores_the_positions_llama_cpp_scores_with_kl_from_the_reference():
    torch.manual_seed(1)
    tokens = torch.randint(0, 30, (10,))
    ref, other = torch.randn(10, 30), torch.randn(10, 30)
    half = quality.SecondHalf(["ref", "other"])
    half.add({"ref": ref, "other": other}, ref, tokens)
    assert half.count == 4  # positions 5..8 predict tokens 6..9
    kl = torch.nn.functional.kl_div(torch.log_softmax(other[5:9].double(), -1),
                                    torch.log_softmax(ref[5:9].double(), -1), log_target=True, reduction="sum")
    assert half.kld["other"] == pytest.approx(float(kl))
    assert half.kld["ref"] == pytest.approx(0.0, abs=1e-12)
    nll = torch.nn.functional.cross_entropy(other[5:9].double(), tokens[6:10], reduction="sum")
    assert half.nll["other"] == pytest.approx(float(nll))
    assert half.agree["ref"] == 4
    assert half.agree["other"] == int((other[5:9].argmax(-1) == ref[5:9].argmax(-1)).sum())


SUMMARY = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  11.710198 ±   0.412345
Mean PPL(base)                :  11.633391 ±   0.409876
Cor(ln(PPL(Q)), ln(PPL(base))):  99.12%
====== KL divergence statistics ======
Mean    KLD:   0.003643 ±   0.000210
====== Token probability statistics ======
RMS Δp    :  1.234 ± 0.056 %
Same top p: 97.375 ±  0.578 %
"""


def test_llama_perplexity_summary_is_parsed():
    assert llama_cpp_kld.parse(SUMMARY) == {"ppl": 11.710198, "ppl_base": 11.633391, "kld": 0.003643, "top1": 0.97375}


def test_a_summary_without_kl_divergence_says_what_is_missing():
    with pytest.raises(RuntimeError, match="'kld'"):
        llama_cpp_kld.parse(SUMMARY.replace("Mean    KLD", "Mean KL"))


def test_source_dir_is_found_above_the_build(tmp_path):
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    (tmp_path / "build" / "bin").mkdir(parents=True)
    assert llama_cpp_kld.source_dir(tmp_path / "build" / "bin") == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="convert_hf_to_gguf.py"):
        llama_cpp_kld.source_dir(tmp_path.parent / "elsewhere" / "bin")
