"""config.json in every dialect: models saved by the installed transformers (5.x writes
`rope_parameters`) and a hand-written 4.x layout give the same greedy ids through
`llamaserve generate` as transformers; unsupported fields are errors naming the field; absent
fields take transformers' own defaults."""

from __future__ import annotations

import json

import pytest
from engine_util import one_thread
from hf_models import hf_greedy, save_transformers_model, small, write_tokenizer_dir

from llamaserve.cli import main
from llamaserve.config import ConfigError
from llamaserve.config_hf import DEFAULTS, args_from_hf_config

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
STEPS = 24
PROMPT = "The quick brown fox asks: how are you today?"
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def _generate_json(capsys, directory, *extra):
    code = main(["generate", "--model", str(directory), "--prompt", PROMPT, "--max-tokens", str(STEPS),
                 "--ignore-eos", "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**small(**kw))


# A small rope_theta makes every position's rotation differ a lot, so a wrong base shows at once.
DIALECTS = {
    "t5-rope-parameters-default": lambda: _llama(rope_parameters={"rope_type": "default", "rope_theta": 50.0}),
    "t5-rope-parameters-llama3": lambda: _llama(rope_parameters={**LLAMA3_ROPE, "rope_theta": 300.0}),
    "explicit-head-dim": lambda: _llama(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 80.0}),
    "tied-embeddings": lambda: _llama(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 70.0}),
    "mistral-no-window": lambda: __import__("transformers").MistralConfig(
        **small(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 60.0})),
}


@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_transformers_saved_model_greedy_ids_equal_transformers(tmp_path, capsys, tok_dir, dialect):
    directory = save_transformers_model(tmp_path / "m", DIALECTS[dialect](), seed=3, tokenizer_dir=tok_dir)
    saved = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # the transformers-5 layout
    data = _generate_json(capsys, directory)
    assert len(data["token_ids"]) == STEPS
    assert data["token_ids"] == hf_greedy(directory, data["prompt_token_ids"], STEPS)


def _hand_written_4x(directory, tok_dir):
    """The layout transformers 4.x wrote (top-level rope_theta, rope_scaling with `type`), with
    optional fields left out so that transformers' defaults apply (rms_norm_eps 1e-6, ...)."""
    directory = save_transformers_model(directory, _llama(), seed=5, tokenizer_dir=tok_dir)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 320, "max_position_embeddings": 256, "rope_theta": 200.0,
        "rope_scaling": {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                         "original_max_position_embeddings": 24},
        "torch_dtype": "float32", "transformers_version": "4.44.0",
    }
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def test_hand_written_4x_config_greedy_ids_equal_transformers(tmp_path, capsys, tok_dir):
    directory = _hand_written_4x(tmp_path / "m", tok_dir)
    data = _generate_json(capsys, directory)
    assert data["token_ids"] == hf_greedy(directory, data["prompt_token_ids"], STEPS)


def test_rope_theta_inside_rope_parameters_is_used():
    """The defect: transformers 5 configs silently got rope_theta 10000."""
    cfg = {**small(), "rope_parameters": {"rope_type": "default", "rope_theta": 1234.5}}
    assert args_from_hf_config(cfg).rope_theta == 1234.5
    cfg = {**small(), "rope_theta": 99.0, "rope_parameters": {"rope_type": "llama3", **LLAMA3_ROPE}}
    args = args_from_hf_config(cfg)
    assert args.rope_theta == 99.0 and args.use_scaled_rope and args.rope_original_max_positions == 16


def _transformers_view(config_cls, cfg: dict) -> dict:
    c = config_cls.from_dict(cfg)
    rope = c.rope_parameters
    return {
        "dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "hidden_dim": c.intermediate_size,
        "head_dim": c.head_dim, "norm_eps": c.rms_norm_eps, "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": c.tie_word_embeddings, "max_positions": c.max_position_embeddings,
        "use_scaled_rope": rope["rope_type"] == "llama3",
        "rope_original_max_positions": rope.get("original_max_position_embeddings", 8192),
    }


def _our_view(cfg: dict) -> dict:
    a = args_from_hf_config(cfg)
    return {
        "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size, "hidden_dim": a.hidden_dim, "head_dim": a.head_dim, "norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta, "tie_word_embeddings": a.tie_word_embeddings, "max_positions": a.max_positions,
        "use_scaled_rope": a.use_scaled_rope, "rope_original_max_positions": a.rope_original_max_positions,
    }


@pytest.mark.parametrize("cfg", [
    {"model_type": "llama"},
    {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2},
    {"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
    {"model_type": "llama", "rope_theta": 5e5, "num_key_value_heads": 8, "max_position_embeddings": 100},
    {"model_type": "mistral", "sliding_window": None},
], ids=["empty", "sizes-only", "llama3-without-original-context", "4x-theta", "mistral"])
def test_absent_fields_take_transformers_defaults(cfg):
    from transformers import LlamaConfig, MistralConfig

    config_cls = MistralConfig if cfg.get("model_type") == "mistral" else LlamaConfig
    assert _our_view(cfg) == _transformers_view(config_cls, json.loads(json.dumps(cfg)))


def test_default_table_is_transformers_own():
    from transformers import LlamaConfig, MistralConfig

    for kind, config_cls in (("llama", LlamaConfig), ("mistral", MistralConfig)):
        ref = config_cls()
        for key, value in DEFAULTS[kind].items():
            if key == "rope_theta":
                assert ref.rope_parameters["rope_theta"] == value
            elif key == "head_dim":
                assert ref.head_dim == ref.hidden_size // ref.num_attention_heads
            elif key == "num_key_value_heads" and value is None:
                assert ref.num_key_value_heads == ref.num_attention_heads
            else:
                assert getattr(ref, key) == value, (kind, key)


UNSUPPORTED = [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters.rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     "rope_parameters.high_freq_factor is required"),
    ({"attention_bias": True}, "attention_bias: true"),
    ({"mlp_bias": True}, "mlp_bias: true"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "architectures 'Qwen2ForCausalLM'"),
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"model_type": "mistral", "sliding_window": 4096, "max_position_embeddings": 32768}, "sliding_window 4096"),
    ({"model_type": "mistral", "max_position_embeddings": 8192}, "sliding_window 4096 (transformers' default when absent)"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config (gptq"),
]


@pytest.mark.parametrize("extra, message", UNSUPPORTED, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(UNSUPPORTED)])
def test_unsupported_fields_are_errors_naming_the_field(extra, message):
    with pytest.raises(ConfigError) as exc:
        args_from_hf_config({**small(), **extra}, source="m/config.json")
    text = str(exc.value)
    assert text.startswith("m/config.json: ") and message in text and "\n" not in text


def test_mistral_window_at_least_the_context_is_accepted():
    args = args_from_hf_config({**small(), "model_type": "mistral", "sliding_window": 256})
    assert args.max_positions == 256


def test_unsupported_field_is_reported_by_generate(tmp_path, capsys, tok_dir):
    directory = save_transformers_model(tmp_path / "m", _llama(), tokenizer_dir=tok_dir)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (directory / "config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--model", str(directory), "--prompt", "hi", "--max-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 1 and "rope_parameters.rope_type 'longrope' is not supported" in err
    assert "Traceback" not in err


def test_max_position_embeddings_is_the_default_context_limit(tmp_path, tok_dir):
    from llamaserve.engine.request import SamplingParams
    from llamaserve.llm import LLM

    directory = save_transformers_model(tmp_path / "m", _llama(max_position_embeddings=48), tokenizer_dir=tok_dir)
    for asked, used in ((None, 48), (32, 32), (100, 48)):
        kwargs = {} if asked is None else {"max_seq_len": asked}
        with LLM(str(directory), max_users=1, progress=False, **kwargs) as llm:
            assert llm.engine.config.max_seq_len == used
            if asked is None:
                with pytest.raises(ValueError, match="context limit is 48"):
                    llm.generate([list(range(60))], SamplingParams(max_tokens=2))
