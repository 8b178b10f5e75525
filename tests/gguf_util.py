"""Test helpers: tiny random Llama models written as llama.cpp GGUF files with the `gguf`
package's writer, and the two kinds of vocabulary llama.cpp's Llama files carry, trained here
on a few sentences (byte-level BPE with `tokenizers`, sentencepiece BPE with `sentencepiece`).

    args = gguf_args()
    sd = random_weights(args)                  # from checkpoints.py (Meta layout)
    write_gguf(path, args, sd, "Q4_K", bpe_vocab())

Quantised types the package can encode are encoded with `gguf.quants.quantize`; Q4_K, which it
only decodes, with `quantize_q4_k` below (a plain min/scale encoder of llama.cpp's block layout).
Whatever the encoder, loading goes through the package's dequantizer.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from llamaserve.config import ModelArgs

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Large language models predict the next token from the previous ones.",
    "Numbers like 12345 and 2026 appear in text, and so do symbols: #, $, %.",
    "café, naïve, 東京, 🎉 — unicode text must survive a round trip.",
] * 4
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def gguf_args(vocab_size: int, tied: bool = False, **overrides) -> ModelArgs:
    """Rows a multiple of 256, as K-quant blocks need; GQA; a Llama 3 RoPE base; the norm eps
    a float32 can hold exactly (GGUF stores it as one)."""
    base = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, explicit_hidden_dim=512,
                norm_eps=float(np.float32(1e-5)), rope_theta=500000.0, tie_word_embeddings=tied)
    base.update(overrides)
    return ModelArgs(**base)


def bpe_vocab(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), size: int = 400) -> dict:
    """A byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") with ChatML control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get) + list(specials)
    import json

    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    types = [NORMAL] * (len(tokens) - len(specials)) + [CONTROL] * len(specials)
    return {"model": "gpt2", "pre": "llama-bpe", "tokens": tokens, "types": types, "merges": merges,
            "bos": tokens.index(specials[0]), "eos": tokens.index(specials[2]), "add_bos": False,
            "chat_template": CHATML}


def spm_vocab(size: int = 400) -> dict:
    """A sentencepiece BPE vocabulary with byte fallback (tokenizer.ggml.model "llama"), as
    llama.cpp's converter writes Llama 2's: pieces, scores, types; no merges."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2, add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    ids = range(sp.get_piece_size())
    tokens = [sp.id_to_piece(i) for i in ids]
    types = [UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else BYTE if sp.is_byte(i) else NORMAL
             for i in ids]
    return {"model": "llama", "tokens": tokens, "scores": [sp.get_score(i) for i in ids], "types": types, "bos": tokens.index("<s>"), "eos": tokens.index("</s>"),
            "unk": tokens.index("<unk>"), "add_bos": True}


# ---- Q4_K encoding ---------------------------------------------------------------------------


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 (n, k*256) -> Q4_K bytes (n, k*144): per 256-value block an f16 scale and min, eight
    6-bit sub-block scales and mins (packed as llama.cpp packs them), 4-bit values."""
    blocks = rows.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(blocks.min(axis=2), 0.0)  # (n, 8): sub-block minimum, never above 0
    span = (blocks.max(axis=2) - lo) / 15.0
    d = np.maximum(span.max(axis=1), 1e-8) / 63.0
    dmin = np.maximum((-lo).max(axis=1), 1e-8) / 63.0
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(span / d[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    scale = (d[:, None] * sc)[:, :, None]
    q = np.clip(np.rint((blocks + (dmin[:, None] * mn)[:, :, None]) / scale), 0, 15).astype(np.uint8)
    packed = np.zeros((blocks.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2),
                          dmin.astype(np.float16).view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return out.reshape(rows.shape[0], -1)


def encode(values: np.ndarray, qtype: str):
    import gguf

    t = gguf.GGMLQuantizationType[qtype]
    if qtype == "F32":
        return values.astype(np.float32), None
    if qtype == "F16":
        return values.astype(np.float16), None
    if qtype == "Q4_K":
        return quantize_q4_k(values), t
    return gguf.quants.quantize(values.astype(np.float32), t), t


# ---- writing ---------------------------------------------------------------------------------

_LAYER = {"attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
          "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
          "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}
_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}


def gguf_name(meta: str) -> str:
    if meta in _GLOBAL:
        return _GLOBAL[meta]
    _, layer, rest = meta.split(".", 2)
    return f"blk.{layer}.{_LAYER[rest.removesuffix('.weight')]}.weight"


def write_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor], qtype: str, vocab: dict,
               arch: str = "llama", extra=None, rope_freqs: np.ndarray | None = None) -> Path:
    """A GGUF file as llama.cpp's converter lays it out: q/k in Meta's (interleaved) layout,
    norms in F32, every matrix in `qtype`. `extra(writer)` may add or override anything."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if "unk" in vocab:
        w.add_unk_token_id(vocab["unk"])
    w.add_add_bos_token(vocab["add_bos"])
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])
    if extra is not None:
        extra(w)
    for name, t in sd.items():
        values = t.float().numpy()
        if t.dim() == 1:
            data, raw = values.astype(np.float32), None
        else:
            data, raw = encode(values, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(sd: dict[str, torch.Tensor], qtype: str) -> dict[str, torch.Tensor]:
    """The weights a loader should get back from `write_gguf(..., qtype)` (the package's decoder)."""
    import gguf

    out = {}
    for name, t in sd.items():
        if t.dim() == 1:
            out[name] = t.float()
            continue
        data, raw = encode(t.float().numpy(), qtype)
        values = gguf.quants.dequantize(data, raw) if raw is not None else data.astype(np.float32)
        out[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(t.shape)
    return out


def rms_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(float(((a.float() - b.float()) ** 2).mean()))
