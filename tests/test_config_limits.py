"""Config files are read with a bound and every field is checked before anything is sized from
it (issue 15 D8/D9): a FIFO, /dev/zero or a huge file is refused without hanging, a 1e9-layer
config is refused before any allocation, and bad types or ranges are one line naming the field."""

from __future__ import annotations

import json
import os
import threading

import pytest
from checkpoints import random_weights, tiny_args, write_hf, write_meta
from hf_models import write_tokenizer_dir

from llamaserve.cli import main
from llamaserve.config import MAX_CONFIG_BYTES, ConfigError, ModelArgs, read_json
from llamaserve.tokenizer import load_tokenizer
from llamaserve.weights import WeightsError, open_checkpoint


def _finishes(fn, timeout=20.0):
    """fn's exception (or None), failing the test if fn blocks (a FIFO would block forever)."""
    result: list = []

    def run():
        try:
            fn()
            result.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    return result[0]


@pytest.fixture
def meta_dir(tmp_path):
    args = tiny_args("llama3", small_vocab=True)
    return write_meta(tmp_path / "meta", args, random_weights(args))


@pytest.fixture
def hf_dir(tmp_path):
    args = tiny_args("llama3", small_vocab=True)
    return write_hf(tmp_path / "hf", args, random_weights(args))


def test_fifo_config_is_refused_without_blocking(meta_dir, hf_dir):
    for d, name in ((meta_dir, "params.json"), (hf_dir, "config.json")):
        (d / name).unlink()
        os.mkfifo(d / name)
        err = _finishes(lambda: open_checkpoint(d))
        assert isinstance(err, WeightsError) and "not a regular file (a FIFO)" in str(err), err


def test_dev_zero_symlink_is_refused(meta_dir):
    (meta_dir / "params.json").unlink()
    (meta_dir / "params.json").symlink_to("/dev/zero")
    err = _finishes(lambda: open_checkpoint(meta_dir))
    assert isinstance(err, WeightsError) and "character device" in str(err)


def test_oversized_config_is_refused_before_reading(hf_dir):
    with open(hf_dir / "config.json", "r+b") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(WeightsError, match="too large"):
        open_checkpoint(hf_dir)


@pytest.mark.parametrize("text, fragment", [
    ('{"a": ' + "1" * 5000 + "}", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ("\xff\xfe", "not UTF-8"),
    ("[1, 2]", "expected a JSON object"),
])
def test_hostile_json_is_one_line(tmp_path, text, fragment):
    p = tmp_path / "config.json"
    p.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ConfigError) as exc:
        read_json(p)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("edit, fragment", [
    ({"n_layers": 1e9}, "n_layers must be an integer, got 1000000000.0"),
    ({"n_layers": 10**9}, "n_layers must be between 1 and 1024, got 1000000000"),
    ({"multiple_of": 0}, "multiple_of must be between 1 and"),
    ({"dim": 64.0}, "dim must be an integer, got 64.0"),
    ({"dim": "64"}, "dim must be an integer, got '64' (str)"),
    ({"vocab_size": "512"}, "vocab_size must be an integer"),
    ({"norm_eps": -1}, "norm_eps must be a finite number above 0"),
    ({"rope_theta": "big"}, "rope_theta must be a number"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope must be true or false"),
    ({"ffn_dim_multiplier": float("inf")}, "ffn_dim_multiplier must be a finite number"),
])
def test_meta_params_fields_are_checked(meta_dir, edit, fragment):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, **edit}))
    with pytest.raises(WeightsError) as exc:
        open_checkpoint(meta_dir)
    text = str(exc.value)
    assert text.startswith(str(meta_dir / "params.json")) and fragment in text and "\n" not in text


@pytest.mark.parametrize("edit, fragment", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers must be between 1 and 1024"),
    ({"hidden_size": "64"}, "hidden_size must be an integer, got '64' (str)"),
    ({"hidden_size": 64.0}, "hidden_size must be an integer, got 64.0"),
    ({"intermediate_size": 0}, "intermediate_size must be between 1 and"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer, got True"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ({"max_position_embeddings": -5}, "max_position_embeddings must be between 1 and"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}}, "rope_parameters.rope_theta must be a number"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object"),
    ({"num_key_value_heads": 3}, "n_heads 4 is not a multiple of n_kv_heads 3"),
])
def test_hf_config_fields_are_checked(hf_dir, edit, fragment):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(WeightsError) as exc:
        open_checkpoint(hf_dir)
    text = str(exc.value)
    assert text.startswith(str(hf_dir / "config.json")) and fragment in text and "\n" not in text


def test_generate_reports_a_bad_field_in_one_line(meta_dir, capsys):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "multiple_of": 0}))
    code = main(["generate", "--model", str(meta_dir), "--prompt", "hi", "--max-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "multiple_of must be between 1" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_model_args_check_every_field_directly():
    with pytest.raises(ConfigError, match="n_layers must be between 1 and 1024"):
        ModelArgs(n_layers=5000)
    with pytest.raises(ConfigError, match="explicit_head_dim must be between 2 and 1024"):
        ModelArgs(explicit_head_dim=4096)


def test_tokenizer_side_files_are_bounded_too(tmp_path):
    d = write_tokenizer_dir(tmp_path / "tok")
    saved = (d / "tokenizer_config.json").read_text()
    (d / "tokenizer_config.json").unlink()
    os.mkfifo(d / "tokenizer_config.json")
    err = _finishes(lambda: load_tokenizer(d))
    assert isinstance(err, ValueError) and "not a regular file" in str(err)
    os.unlink(d / "tokenizer_config.json")
    (d / "tokenizer_config.json").write_text(saved)
    os.mkfifo(d / "chat_template.jinja")
    err = _finishes(lambda: load_tokenizer(d))
    assert isinstance(err, ValueError) and "chat_template.jinja: not a regular file" in str(err)
    os.unlink(d / "chat_template.jinja")
    (d / "tokenizer.json").rename(d / "real.json")
    os.mkfifo(d / "tokenizer.json")
    err = _finishes(lambda: load_tokenizer(d / "tokenizer.json"))
    assert isinstance(err, ValueError) and "not a regular file" in str(err)


def test_layer_count_is_held_against_the_tensors(meta_dir):
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "n_layers": 1024}))
    with pytest.raises(WeightsError, match="says n_layers=1024 but the checkpoint .* holds layers 0-1"):
        open_checkpoint(meta_dir)
