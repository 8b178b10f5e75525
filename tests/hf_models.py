"""Test helpers: tiny Llama-architecture checkpoints written by the installed `transformers`
itself (config.json in its own dialect, safetensors, a byte-level BPE tokenizer.json and its
tokenizer_config.json), and transformers' greedy ids on them: the reference our loader must match.

    d = save_transformers_model(tmp / "m", LlamaConfig(**small(rope_parameters=...)), tokenizer_dir=tok_dir)
    ids = hf_greedy(d, prompt_ids, 24)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world! How are you today? I am fine, thank you.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "user assistant system: please answer the question in one sentence.",
    "café naïve 東京 🙂 numbers 0123456789 and symbols <>[]{}()",
]


def small(**overrides) -> dict:
    """Keyword arguments of a 2-layer GQA model with a vocabulary that fits the BPE tokenizer."""
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, bos_token_id=None,
                eos_token_id=None)
    base.update(overrides)
    return base


def byte_bpe_tokenizer(vocab_size: int = 310):
    """A GPT-2-style byte-level BPE (ByteLevel pre-tokenizer and decoder), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def write_tokenizer_dir(directory: Path, chat_template: str | None = CHATML, eos: str = "<|im_end|>",
                        bos: str | None = None, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    byte_bpe_tokenizer().save(str(directory / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": bos,
           "pad_token": "<|endoftext|>", "model_max_length": 256}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg.update(extra or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.15) -> None:
    """Weights far from transformers' tiny init, so greedy ids depend on every part of the model;
    norms random around 1 so a mixed-up norm shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else std * noise)


def save_transformers_model(directory: Path, config, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """save_pretrained of a random model for `config` (a transformers config object)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize_(model, seed)
    model.save_pretrained(directory)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(directory) / f.name)
    return Path(directory)


def hf_greedy(directory: Path, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation (full forward each step: no cache to get wrong)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):]
