"""benchmarks/cuda_targets.py: issue 14's target table from a cuda_checks.sh run's logs (the
figures a GPU session reports), on logs in the scripts' own formats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_targets.py"

DECODE_8B = """bench llamaserve {1: 230.0, 32: 4100.0}
llama3-8b, bfloat16 on cuda (NVIDIA H200), llamaserve max_seq_len 264, greedy; memory read bandwidth (torch sum): 4000.0 GB/s; medians of 1 runs
| users | system | decode tok/s/user | decode tok/s | ratio to llamaserve | llamaserve bandwidth use |
|---|---|---|---|---|---|
| 1 | llamaserve | 230.0 | 230.0 | 1.00 | 3480.0 GB/s = 87% |
| 1 | transformers (compiled) | 136.0 | 136.0 | 0.59 |  |
| 32 | llamaserve | 128.1 | 4100.0 | 1.00 | 1900.0 GB/s = 47% |
| 32 | transformers (compiled) | 94.6 | 3028.0 | 0.74 |  |
"""
EAGER = DECODE_8B.replace("| 1 | llamaserve | 230.0 | 230.0 |", "| 1 | llamaserve | 46.0 | 46.0 |")
FP8_70B = """llama3-70b FP8 on NVIDIA H200: 70553.7M parameters, 70.55 GB of weights, built on the device in 40.1 s; 61.0 GiB free of 139.8 after the weights: 88 users x 2048 bfloat16 tokens (320 KiB a token)
| users | tok/s/user | tok/s | step ms | weight read GB/s | CUDA graph | cache length |
|---|---|---|---|---|---|---|
| 1 | 27.5 | 27.5 | 36.4 | 1900 | yes | 2048 |
| 32 | 18.2 | 582.4 | 54.9 | 1260 | yes | 2048 |
"""


def run(tmp_path: Path, logs: dict[str, str]) -> dict[str, tuple[str, str]]:
    for step, text in logs.items():
        (tmp_path / f"{step}.log").write_text(text)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True).stdout
    rows = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ") and "target |" not in line]
    return {cells[0].strip(): (cells[1].strip(), cells[2].strip()) for cells in rows}


def test_each_target_row_is_read_from_its_steps_log_and_judged(tmp_path):
    rows = run(tmp_path, {"decode-8b": DECODE_8B, "decode-8b-eager": EAGER, "fp8-70b": FP8_70B})
    assert rows["8B bf16, 1 user >= 80% of the read bandwidth"] == ("230.0 tok/s, 87% of the bandwidth", "**met**")
    assert rows["8B bf16, 32 users >= 1.3x transformers' compiled generate"] == ("4100 vs 3028 tok/s = 1.35x", "**met**")
    assert rows["70B FP8, 32 users >= 20 tok/s per user (step < 50 ms)"] == ("18.2 tok/s per user, step 54.9 ms", "**missed**")
    assert rows["70B FP8, 1 user >= 25 tok/s"] == ("27.5 tok/s per user, step 36.4 ms", "**met**")
    assert rows["70B FP8 weights + >= 32 users x 2k bf16 tokens fit one GPU"] == ("88 users x 2048 tokens", "**met**")
    assert rows["CUDA graph gain, 8B bf16, 1 user(s) (no target)"] == ("230.0 vs eager 46.0 tok/s = 5.00x", "measured")


def test_missing_steps_are_not_measured_and_a_dry_run_is_no_measurement(tmp_path):
    rows = run(tmp_path, {"decode-8b": DECODE_8B})
    assert rows["70B FP8, 1 user >= 25 tok/s"] == ("-", "not measured")
    dry = run(tmp_path, {"decode-8b": DECODE_8B.replace("on cuda (NVIDIA H200)", "on cpu (2 threads)")})
    assert {result for _, result in dry.values()} == {"dry run"}
