"""Instruction sets for AlpacaEval-style runs: `demo-alpaca` (in-process) and `eval` (over HTTP).

AlpacaEval's instructions from the `datasets` cache when present (never downloaded), else the
set shipped with the package.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path


def read_json_list(flag: str, path: str, what: str) -> list:
    """The non-empty JSON list in the file a flag names; bad files get a one-line ValueError."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{flag} {path}: cannot read a JSON list of {what} ({exc})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{flag} {path}: expected a non-empty JSON list of {what}")
    return data


def shipped_instructions() -> list[str]:
    text = resources.files("llamaserve").joinpath("data/alpaca_instructions.json").read_text(encoding="utf-8")
    return json.loads(text)


def alpaca_eval_instructions() -> list[str] | None:
    """The AlpacaEval instructions if `datasets` is installed and has them cached; never downloads."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    try:
        import datasets  # noqa: PLC0415 - optional

        ds = datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval", split="eval")
        out = [str(row["instruction"]) for row in ds]
        return out or None
    except Exception:  # noqa: BLE001 - not installed, not cached, or a loader change: use the shipped set
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_instructions(path: str | None) -> tuple[list[str], str]:
    if path is not None:
        data = read_json_list("--instructions", path, "strings")
        if not all(isinstance(s, str) and s for s in data):
            raise ValueError(f"--instructions {path}: expected a non-empty JSON list of non-empty strings")
        return data, path
    found = alpaca_eval_instructions()
    if found:
        return found, "AlpacaEval (datasets cache)"
    return shipped_instructions(), "the instruction set shipped with llamaserve (AlpacaEval not cached)"
