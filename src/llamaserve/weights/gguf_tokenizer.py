"""The tokenizer a GGUF file describes, written as Hugging Face files: `tokenizer.json` (built
with the `tokenizers` library), `tokenizer_config.json` (bos/eos, `add_bos_token`, the chat
template) and `generation_config.json` (every end-of-turn id), so the model directory's own
tokenizer path (tokenizer/hf.py) serves it.

Two vocabularies are in llama.cpp's Llama files:
- `tokenizer.ggml.model = "llama"`: sentencepiece BPE (Llama 2, TinyLlama, Mistral): pieces with
  scores, "\u2581" for spaces, byte fallback. No merges are stored; a pair of pieces merges when the
  joined piece is in the vocabulary, higher-scored pieces first, as sentencepiece does.
- `"gpt2"`: byte-level BPE (Llama 3, SmolLM): pieces and merges as in a tokenizer.json; how text
  is split before BPE is named by `tokenizer.ggml.pre`. A split we do not know is refused
  rather than guessed: a different split silently gives different tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from llamaserve.weights.errors import WeightsError

_SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Llama 3's split (its tokenizer.json's Split pattern, and llama.cpp's LLAMA3 pre-tokenizer).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges). Llama 3 takes a whole word that is in the
# vocabulary as one token before trying merges (`ignore_merges`), as its tokenizer.json says.
_LLAMA3 = (lambda: pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
]), True)
_GPT2 = (lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False)
# SmolLM: every digit on its own, then GPT-2's split (its tokenizer.json; llama.cpp's SMOLLM).
_SMOLLM = (lambda: pre_tokenizers.Sequence([
    pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
]), False)
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "smaug-bpe": _LLAMA3,
                  "default": _GPT2, "gpt-2": _GPT2, "gpt2": _GPT2, "smollm": _SMOLLM}


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two pieces of the vocabulary, best joined piece first."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(tok) < 2:
            continue
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(tokens, scores, types, unk: str | None, add_space_prefix: bool) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True,
                     byte_fallback=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE,
                                                 prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _bpe_tokenizer(path: Path, tokens, merges, pre: str | None) -> Tokenizer:
    if pre not in PRE_TOKENIZERS:
        raise WeightsError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                           f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    make_pre, ignore_merges = PRE_TOKENIZERS[pre]
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise WeightsError(f"{path}: tokenizer.ggml.merges entry {m!r} is not two pieces")
        pairs.append((left, right))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = make_pre()
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(gf) -> tuple[Tokenizer, dict[str, Any], dict[str, Any]]:
    """(tokenizer, tokenizer_config.json, generation_config.json) for an opened GGUFFile."""
    path, g = gf.path, gf.get
    kind = g("tokenizer.ggml.model")
    tokens = g("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise WeightsError(f"{path}: holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    types = g("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise WeightsError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    unk_id = g("tokenizer.ggml.unknown_token_id")
    if kind == "llama":
        scores = g("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = tokens[unk_id] if unk_id is not None else next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
        tok = _spm_tokenizer(tokens, scores, types, unk, bool(g("tokenizer.ggml.add_space_prefix", True)))
        default_add_bos = True  # llama.cpp adds BOS to a sentencepiece vocabulary that does not say
    elif kind == "gpt2":
        tok = _bpe_tokenizer(path, tokens, g("tokenizer.ggml.merges") or [], g("tokenizer.ggml.pre"))
        default_add_bos = False
    else:
        raise WeightsError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'llama' and 'gpt2')")
    # Control tokens stay whole and never come from text; user-defined ones stay whole too.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token_id(key: str) -> int:
        i = g(f"tokenizer.ggml.{key}")
        if i is None:
            raise WeightsError(f"{path}: metadata key tokenizer.ggml.{key} is missing")
        if not 0 <= int(i) < len(tokens):
            raise WeightsError(f"{path}: tokenizer.ggml.{key} {i} is outside the vocabulary of {len(tokens)}")
        return int(i)

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    bos, eos = tokens[bos_id], tokens[eos_id]
    add_bos = bool(g("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(g("tokenizer.ggml.add_eos_token", False))
    # What transformers' tokenizer.json says too: BOS (and EOS) around every encoded text.
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos and eos != bos else [])
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)
    tok_config: dict[str, Any] = {"bos_token": bos, "eos_token": eos, "add_bos_token": add_bos,
                                  "add_eos_token": add_eos, "model_max_length": int(g("llama.context_length") or 0)}
    if unk_id is not None:
        tok_config["unk_token"] = tokens[int(unk_id)]
    template = g("tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    # Every id the file names as ending a turn stops generation (Llama 3's <|eot_id|>, <|eom_id|>).
    stops = [eos_id] + [int(g(f"tokenizer.ggml.{k}")) for k in ("eot_token_id", "eom_token_id")
                        if g(f"tokenizer.ggml.{k}") is not None and int(g(f"tokenizer.ggml.{k}")) != eos_id]
    gen_config = {"bos_token_id": bos_id, "eos_token_id": stops if len(stops) > 1 else eos_id}
    return tok, tok_config, gen_config


def write_tokenizer(gf, directory: Path) -> None:
    tok, tok_config, gen_config = build_tokenizer(gf)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    (directory / "generation_config.json").write_text(json.dumps(gen_config, indent=1))
