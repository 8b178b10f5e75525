"""The stop-string matcher (engine/stops.py): the same answers as scanning every stop string
(earliest match, text held back while it may still become a stop), at a cost per generated
character that does not grow with the number of stop strings."""

from __future__ import annotations

import random

import pytest

from llamaserve.engine.request import FinishReason, SamplingParams
from llamaserve.engine.stops import StopChecker, StopMatcher


class CharDetokenizer:
    """Token id i is the character chr(i): the tests pick the text directly."""

    def push(self, token_id: int) -> str:
        return chr(token_id)


def naive(text_chunks: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """The old matcher: every stop string scanned after every chunk."""
    text, sent, out = "", 0, []
    for chunk in text_chunks:
        text += chunk
        hits = [i for i in (text.find(s, sent) for s in stops) if i >= 0]
        if hits:
            out.append(text[sent:min(hits)])
            return out, True
        keep = 0
        unsent = text[sent:]
        for s in stops:
            for n in range(min(len(s) - 1, len(unsent)), keep, -1):
                if unsent.endswith(s[:n]):
                    keep = n
                    break
        out.append(text[sent:len(text) - keep])
        sent = max(sent, len(text) - keep)
    return out, False


def run_checker(text: str, stops: list[str]) -> tuple[list[str], bool]:
    params = SamplingParams(max_tokens=10_000, stop=stops, ignore_eos=True)
    checker = StopChecker(CharDetokenizer(), params, [], prompt_len=1, max_seq_len=100_000)
    out = []
    for ch in text:
        delta, reason = checker.append(ord(ch))
        out.append(delta)
        if reason is not None:
            assert reason == FinishReason.STOP
            return out, True
    return out, False


@pytest.mark.parametrize("seed", range(300))
def test_matches_the_scan_of_every_stop_string(seed):
    rng = random.Random(seed)
    alphabet = "abc" if seed % 2 else "ab"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
    text = "".join(rng.choice(alphabet + "xy") for _ in range(rng.randint(0, 40)))
    assert run_checker(text, stops) == naive(list(text), stops), (stops, text)


def test_earliest_start_wins_over_earliest_end():
    # Both end in the same token: the one that starts first decides where the text ends.
    assert run_checker("xabcd", ["abcd", "bcd"]) == (["x", "", "", "", ""], True)
    # "bc" is complete one token before "abcd" could be: it stops the text there, as the scan did.
    assert run_checker("xabcd", ["abcd", "bc"]) == (["x", "", "", "a"], True) == naive(list("xabcd"), ["abcd", "bc"])


class CountingList(list):
    reads = 0

    def __getitem__(self, i):
        CountingList.reads += 1
        return super().__getitem__(i)


def test_work_per_character_does_not_grow_with_the_number_of_stop_strings():
    """Issue 15, D7: 100,000 stop strings made every token of every user slow. Failure-link hops
    are what Aho-Corasick pays per character: at most two per character on average, whether there
    are 10 stop strings or 20,000."""
    rng = random.Random(0)
    text = "".join(rng.choice("abcde ") for _ in range(5000))
    hops = {}
    for count in (10, 20_000):
        stops = ["".join(rng.choice("abcde") for _ in range(12)) + "!" for _ in range(count)]
        matcher = StopMatcher(stops)
        matcher._fail = CountingList(matcher._fail)
        CountingList.reads = 0
        for end in range(1, len(text) + 1):
            assert matcher.feed(text[:end], 0) is None
        hops[count] = CountingList.reads
    assert hops[20_000] <= 2 * len(text)
    assert hops[10] <= 2 * len(text)
