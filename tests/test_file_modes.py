"""`repack` output and converted-weight cache entries get the permissions of the user's umask
(0755/0644 under the usual 022), not tempfile's private 0700/0600, so another user (a
container's non-root user) can read what one user built."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from checkpoints import random_weights, tiny_args, write_meta
from llamaserve.cli import main as cli_main
from llamaserve.weights.cache import load_model_cached

ARGS = tiny_args("llama3", small_vocab=True)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def _expect(root: Path, mask: int) -> None:
    modes = _modes(root)
    for name, mode in modes.items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)} under umask {oct(mask)}"


def test_repack_output_follows_the_umask(tmp_path, umask):
    src, out = tmp_path / "meta", tmp_path / "repacked"
    write_meta(src, ARGS, random_weights(ARGS), n_shards=2)
    assert cli_main(["repack", str(src), str(out), "2", "--no-progress"]) == 0
    assert any(out.glob("layers_*.pth"))
    _expect(out, umask)


def test_weight_cache_entries_follow_the_umask(tmp_path, umask):
    src, root = tmp_path / "meta", tmp_path / "cache"
    write_meta(src, ARGS, random_weights(ARGS), n_shards=1)
    load_model_cached(src, cache_root=root, progress=False)
    entries = [p for p in (root / "llamaserve_weights").iterdir() if p.is_dir()]
    assert len(entries) == 1 and any(entries[0].iterdir())
    _expect(root, umask)
