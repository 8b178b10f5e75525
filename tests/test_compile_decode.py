"""The device decode step (Transformer.decode_step: what CUDA runs eagerly and captures as a CUDA
graph) reads nothing back to the host: torch.compile(fullgraph=True) takes it whole on CPU, one
graph for every step, and it gives the eager step's tokens. The CPU forward path, which reads
positions on the host, is the negative control. The captured-step machinery
(model/cuda_graphs.py) runs here on its static buffers, compiled, inside the engine; on a GPU
tests/test_cuda.py checks the captured graph itself."""

from __future__ import annotations

import functools

import pytest
import torch
from engine_util import make_engine, one_thread, run_to_completion, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

from llamaserve.engine import runner
from llamaserve.model import cuda_graphs
from llamaserve.engine.request import SamplingParams

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)

PROMPT_LENGTHS = (3, 17, 9, 40)  # rows at different positions, across the 16-key blocks
STEPS = 6
MAX_SEQ_LEN = 64
# ||a - b|| / ||b|| of a step's logits where the two sides round differently: fp32 rounding
# only; bf16 rounds every intermediate in each side's own order (as tests/test_cuda.py's HF bound).
REL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _prefilled(model):
    """A cache holding one prompt per slot, and each row's first decode token."""
    cache = model.new_cache(len(PROMPT_LENGTHS), MAX_SEQ_LEN)
    gen = torch.Generator().manual_seed(3)
    first = []
    for slot, n in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(0, 256, (1, n), generator=gen)
        first.append(int(model(prompt, torch.tensor([0]), torch.tensor([slot]), cache).argmax()))
    return cache, torch.tensor(first).view(-1, 1)


def greedy(model, step) -> tuple[list[list[int]], list[torch.Tensor]]:
    """STEPS greedy tokens per row through `step(tokens, positions, slots, cache)`, and each step's logits."""
    cache, tokens = _prefilled(model)
    positions = torch.tensor(PROMPT_LENGTHS)
    slots = torch.arange(len(PROMPT_LENGTHS))
    out, all_logits = [], []
    for _ in range(STEPS):
        # Inputs made outside inference mode, as a runner's are (torch.compile guards inference
        # tensors apart).
        with torch.inference_mode():
            logits = step(tokens, positions, slots, cache)
        all_logits.append(logits.clone())
        out.append(logits.argmax(-1).tolist())
        tokens = torch.tensor(out[-1]).view(-1, 1)
        positions = positions + 1
    return out, all_logits


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def device_step(fn):
    return lambda tokens, positions, slots, cache: fn(tokens, positions, slots, cache.tables.on_device(),
                                                      cache.keys, cache.values)


@pytest.fixture(scope="module")
def models():
    """Unpacked tiny models on the plain torch path (no CPU decode kernels), as a CUDA device runs."""
    made = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model().to(dtype)
        model.decode_kernels_fit = lambda: False  # LLAMASERVE_KERNELS=0
        made[dtype] = model
    return made


@dtypes
def test_decode_step_compiles_whole_and_gives_the_eager_bits(models, dtype):
    model = models[dtype]
    counter = CompileCounterWithBackend("aot_eager")  # traced and functionalised, run by eager kernels
    compiled = torch.compile(model.decode_step, fullgraph=True, backend=counter)
    tokens, logits = greedy(model, device_step(compiled))
    eager_tokens, eager_logits = greedy(model, device_step(model.decode_step))
    # One graph for every step: positions move, shapes do not, so nothing recompiles.
    assert counter.frame_count == 1 and counter.op_count > 50
    assert tokens == eager_tokens
    for step, (a, b) in enumerate(zip(logits, eager_logits)):
        assert torch.equal(a, b), step
    # The device step means what the CPU forward path means (batched attention over the whole
    # table instead of per-row calls over the row's keys): the same greedy tokens.
    forward_tokens, forward_logits = greedy(model, lambda t, p, s, cache: model(t, p, s, cache))
    assert tokens == forward_tokens
    for a, b in zip(logits, forward_logits):
        assert rel_error(a, b) <= REL_TOLERANCE[dtype]


def test_decode_step_with_an_fp8_cache_compiles_whole_and_gives_the_eager_bits():
    """--kv-cache-dtype fp8 (a GPU's option): the saturating conversion into the cache and back
    stays inside the one graph."""
    from llamaserve.model.kv_cache import apply_kv_cache_dtype

    model = tiny_model().to(torch.bfloat16)
    model.decode_kernels_fit = lambda: False
    apply_kv_cache_dtype(model, "fp8")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.decode_step, fullgraph=True, backend=counter)
    tokens, logits = greedy(model, device_step(compiled))
    eager_tokens, eager_logits = greedy(model, device_step(model.decode_step))
    assert counter.frame_count == 1
    assert model.new_cache(1, 16).keys[0].dtype == torch.float8_e4m3fn
    assert tokens == eager_tokens and all(torch.equal(a, b) for a, b in zip(logits, eager_logits))


def test_decode_step_compiled_by_inductor_gives_the_eager_tokens(models):
    """Inductor generates its own kernels (fused, with their own rounding: tokens, not bits). bf16:
    the fp32 CPU linear layers call oneDNN ops inductor only lowers for frozen weights."""
    model = models[torch.bfloat16]
    compiled = torch.compile(model.decode_step, fullgraph=True, backend="inductor")
    tokens, logits = greedy(model, device_step(compiled))
    eager_tokens, eager_logits = greedy(model, device_step(model.decode_step))
    assert tokens == eager_tokens
    for a, b in zip(logits, eager_logits):
        assert rel_error(a, b) <= REL_TOLERANCE[torch.bfloat16]


def test_negative_control_the_cpu_forward_path_breaks_the_graph(models):
    """The CPU decode path reads positions on the host (the cache-length check, per-row
    attention): fullgraph refuses it, so the test above would catch such a read in decode_step."""
    model = models[torch.float32]
    compiled = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    cache, tokens = _prefilled(model)
    # A data-dependent branch (int(positions.max()) against the cache length) at the first read.
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError), match="data-dependent|tolist|item"):
        compiled(tokens, torch.tensor(PROMPT_LENGTHS), torch.arange(len(PROMPT_LENGTHS)), cache)


def test_captured_decode_checks_its_row_count(models):
    model = models[torch.float32]
    captured = cuda_graphs.CapturedDecode(model, model.new_cache(2, MAX_SEQ_LEN), rows=3)
    with pytest.raises(ValueError, match="takes 3 rows, got 2"):
        captured(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_graphs_apply_only_to_one_cuda_process_of_fixed_shape(models, monkeypatch):
    model = models[torch.float32]
    assert not cuda_graphs.graphs_apply(model, fixed_shape=True)  # a CPU model
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    assert cuda_graphs.graphs_apply(model, fixed_shape=True)
    assert not cuda_graphs.graphs_apply(model, fixed_shape=False)
    monkeypatch.setenv(cuda_graphs.ENV, "0")
    assert not cuda_graphs.graphs_apply(model, fixed_shape=True)


def use_static_step(monkeypatch) -> list[int]:
    """Engines made from now on decode as on CUDA (every slot, the whole cache: one shape) through
    CapturedDecode compiled with fullgraph; returns the list its calls' row counts go into."""
    calls = []

    class Counted(cuda_graphs.CapturedDecode):
        def __call__(self, *args):
            calls.append(self.rows)
            return super().__call__(*args)

    monkeypatch.setattr(runner, "reads_whole_cache", lambda device: True)
    monkeypatch.setattr(runner, "graphs_apply", lambda model, fixed_shape: fixed_shape)
    monkeypatch.setattr(runner, "captured_decode", functools.partial(Counted, compile_backend="aot_eager"))
    return calls


def test_engine_on_the_compiled_static_step_gives_identical_tokens_alone_and_in_a_crowd(monkeypatch):
    from test_engine import test_requests_give_identical_tokens_alone_and_in_a_changing_crowd as crowd

    calls = use_static_step(monkeypatch)
    crowd(tiny_model())
    assert calls and set(calls) == {33}  # 32 slots + the last-position row


def test_engine_on_the_compiled_static_step_gives_the_plain_engines_greedy_tokens(monkeypatch):
    """The static buffers carry each step's tokens, positions and slots (a step that kept its
    padding rows would be alone-vs-crowd identical too: identical garbage)."""
    def greedy_run():
        engine = make_engine(tiny_model(), max_users=4)
        for i, n in enumerate((5, 30, 18)):
            engine.add_request(f"r{i}", list(range(7 * i, 7 * i + n)), SamplingParams(max_tokens=12, temperature=0,
                                                                                     ignore_eos=True))
        return {rid: r["token_ids"] for rid, r in run_to_completion(engine).items()}

    plain = greedy_run()
    calls = use_static_step(monkeypatch)
    assert greedy_run() == plain and len(calls) >= 11


def test_device_plan_reads_each_rows_whole_table_in_one_gather():
    from llamaserve.model.kv_cache import plan_attention, plan_on_device

    model = tiny_model()
    cache = model.new_cache(3, MAX_SEQ_LEN)
    gen = torch.Generator().manual_seed(4)
    for pool in cache.keys:
        pool.copy_(torch.randn(pool.shape, generator=gen))
    positions, slots = torch.tensor([[5], [40], [0]]), torch.tensor([2, 0, 1])
    device_plan = plan_on_device(positions, slots, cache.tables.on_device(), cache.block_size)
    # The host plan of a row at the cache's last position reads as far: the same keys, the same mask.
    host_plan = plan_attention(torch.tensor([[5], [40], [MAX_SEQ_LEN - 1]]), slots, cache)
    assert device_plan.kv_len == host_plan.kv_len == MAX_SEQ_LEN
    keys = device_plan.gather(cache.keys[0])
    assert torch.equal(keys, host_plan.gather(cache.keys[0]))
    assert keys.shape == (3, cache.keys[0].shape[1], MAX_SEQ_LEN, cache.keys[0].shape[3])
    assert keys.stride(-1) == 1 and not keys.is_contiguous()  # a view of the one gathered copy
    assert torch.equal(device_plan.mask[:2], host_plan.mask[:2])
    assert device_plan.mask[2].sum() == 1  # position 0 sees one key


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass


def test_captured_step_with_cuda_faked_warms_up_on_padding_rows_then_replays_real_ones(monkeypatch):
    """CapturedDecode's CUDA path with torch.cuda faked on CPU (a replay reruns the step into the
    static logits, as a graph replays into its recorded output): warm-up and capture write only
    the null block, each step's inputs reach the replay, and the caller gets the eager step's
    bits in a tensor of its own."""
    import contextlib

    model = tiny_model()
    model.decode_kernels_fit = lambda: False
    cache, first = _prefilled(model)
    twin, _ = _prefilled(model)
    captured = cuda_graphs.CapturedDecode(model, cache, rows=len(PROMPT_LENGTHS) + 1)
    captured.on_cuda = True
    events = []

    class Graph:
        def replay(self):
            events.append("replay")
            captured.logits.copy_(captured._run())

    @contextlib.contextmanager
    def graph(g):
        # Warm-up has run by now: it may have written the null block (0), nothing else.
        events.append("capture")
        assert all(torch.equal(a[1:], b[1:]) for a, b in zip(cache.keys + cache.values, twin.keys + twin.values))
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    def capture_then_logits():
        cuda_graphs.CapturedDecode.capture(captured)
        captured.logits = torch.empty_like(captured.logits)  # the static output, rewritten by each replay
    monkeypatch.setattr(captured, "capture", capture_then_logits)

    padding = cache.tables.padding_slot
    tokens, positions = first.view(-1).tolist(), list(PROMPT_LENGTHS)
    for step in range(3):
        row_tokens = torch.tensor(tokens + [0]).view(-1, 1)
        row_positions = torch.tensor(positions + [MAX_SEQ_LEN - 1])
        row_slots = torch.tensor(list(range(len(tokens))) + [padding])
        got = captured(row_tokens, row_positions, row_slots)
        with torch.inference_mode():
            want = model.decode_step(row_tokens, row_positions, row_slots, twin.tables.on_device(), twin.keys,
                                     twin.values)
        # The padding row reads the null block, which warm-up wrote too: its logits are dropped.
        assert torch.equal(got[:-1], want[:-1]), step
        assert got.data_ptr() != captured.logits.data_ptr()
        tokens, positions = got[:-1].argmax(-1).tolist(), [p + 1 for p in positions]
    assert events == ["capture", "replay", "replay", "replay"]
