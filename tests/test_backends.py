"""Every backend this machine has, held to the torch reference (in the manner of llama.cpp's
test-backend-ops): every dtype, grouped-query attention, biases, a sliding window, head sizes off
the vector width, dynamic NTK past the trained length; prompts in chunks, batches of sequences at
different positions that join and leave, caches that grow, single-sequence steps.

The scenario feeds fixed tokens (not the model's own choices), so that every backend sees the same
inputs and near-ties cannot make runs diverge; each backend's logits must equal the torch
backend's run of the same scenario on the same loaded weights. The torch backend itself is held to
one pass over each whole sequence (its incremental and batched runs must not differ from it).
The GPU backend runs on a GPU when there is one, else its step runs unrecorded with its Triton
kernels in Triton's interpreter.
"""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import dataclass, field

import pytest
import torch

from helpers import logits_close, needs_gpu, save_checkpoint, tiny_llama
from flm import llm
from flm.backends import Backend, CpuStepBackend, CudaGraphBackend, choose_backend
from flm.backends.cuda_graph import GraphedBatch
from flm.convert import ConvertOptions, convert
from flm.errors import FlmError
from flm.kernels import triton_linear
from flm.kernels.native import kernel_build
from flm.kv_cache import kv_dtype

GPU = torch.cuda.is_available()
# no kernels are expected here (a CPU without AVX2, or FLM_KERNELS=reference); where they are
# expected but do not build, the cpu-step cases fail rather than skip
NO_KERNELS = isinstance(kernel_build(), str)
DTYPES = ["float32", "float16", "bfloat16", "int8", "int4", "int4g"]

# model variants: transformers config overrides and a sliding window set after loading
VARIANTS = {
    "gqa": ({}, None),  # 4 query heads over 2 KV heads, head size 16
    "biases": ({"attention_bias": True, "mlp_bias": True, "num_key_value_heads": 4}, None),
    "window": ({}, 5),
    "head-24": ({"num_attention_heads": 8, "head_dim": 24}, None),  # 8 and 16 lanes do not divide 24
    "dynamic-ntk": ({"max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, None),
}
WINDOW = 128  # past every variant's trained window (dynamic NTK's 16 x 2 included)
# (variant, weight dtype, KV cache dtype)
CASES = ([("gqa", d, "float32") for d in DTYPES] + [("gqa", "float32", kv) for kv in ("float16", "bfloat16", "int8")]
         + [(v, d, "float32") for v in VARIANTS if v != "gqa" for d in ("float32", "int4g")]
         + [("window", "int4g", "int8"), ("head-24", "float16", "float16"), ("dynamic-ntk", "float32", "bfloat16")])


def _backend_params() -> list:
    needs_native = pytest.mark.skipif(NO_KERNELS, reason="no SIMD kernels for this CPU (no AVX2/AVX-512)")
    needs_triton = pytest.mark.skipif(not triton_linear.available(), reason="Triton is not installed")
    return [pytest.param("torch"), pytest.param("torch/reference-linears"),
            pytest.param("cpu-step", marks=needs_native), pytest.param("cuda-graph", marks=needs_triton)]


def _conformance_params() -> list:
    """(variant, dtype, KV dtype, backend) for every case; the torch backends are held to one
    pass over each whole sequence, which dynamic NTK past the trained length has no equivalent
    of (its angles depend on the length at each step), so that pair is not a case."""
    return [pytest.param(variant, dtype, kv, *kind.values, marks=kind.marks,
                         id=f"{variant}-{dtype}-kv{kv}-{kind.values[0]}")
            for variant, dtype, kv in CASES for kind in _backend_params()
            if not (variant == "dynamic-ntk" and kind.values[0].startswith("torch"))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One .flm per (variant, dtype) of CASES."""
    out = tmp_path_factory.mktemp("backends")
    made = {}
    for variant, dtype, _ in CASES:
        hf = out / f"{variant}-hf"
        if not hf.exists():
            save_checkpoint(tiny_llama(seed=3, **VARIANTS[variant][0]), hf)
        if (variant, dtype) not in made:
            made[variant, dtype] = out / f"{variant}-{dtype}.flm"
            convert(hf, made[variant, dtype], ConvertOptions(dtype=dtype, group_size=32, template="base",
                                                             progress=False))
    return made


def _load(path, variant: str, kind: str, kv: str = "float32"):
    """(the backend under test, the torch backend on the same weights), both with `kv` caches."""
    device = "cuda" if kind == "cuda-graph" and GPU else "cpu"
    model = llm.model(path, reference=kind == "torch/reference-linears", device=device).model
    model.cfg.sliding_window = VARIANTS[variant][1]
    reference = Backend(model, WINDOW, kv_dtype(kv))
    if kind == "cpu-step":
        return CpuStepBackend(model, WINDOW, kv_dtype(kv)), reference
    if kind == "cuda-graph":
        return CudaGraphBackend(model, WINDOW, kv_dtype(kv), record=GPU), reference
    return reference, reference


@dataclass
class Run:
    """Per sequence: every token it was given and the logits after each position that were asked for."""

    tokens: list[list[int]] = field(default_factory=list)
    logits: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def add(self, seq: int, tokens: list[int], rows: torch.Tensor) -> None:
        """rows [len(tokens), vocab]: the logits after each of `tokens`."""
        start = len(self.tokens[seq])
        self.tokens[seq] += tokens
        for i, row in enumerate(rows):
            self.logits[seq][start + i] = row.float().cpu()


def _ids(seed: int, n: int) -> list[int]:
    return [(7919 * (seed + 1) * (i + 3)) % 31000 + 3 for i in range(n)]


def scenario(backend: Backend) -> Run:
    """Prompts of 3, 40 (in chunks of 23 and 17) and 7 tokens in caches of 8 slots; three batched
    steps; the second sequence leaves and a fresh one (5 tokens) joins in front; three more
    batched steps; then the first sequence alone for three steps."""
    run = Run()
    caches = []

    def start(prompt: list[int], chunks: list[int]) -> int:
        caches.append(backend.new_cache(96, initial=8))
        run.tokens.append([])
        run.logits.append({})
        seq, at = len(caches) - 1, 0
        for size in chunks:
            part = prompt[at:at + size]
            run.add(seq, part, backend.prefill(part, caches[seq], all_logits=True))
            at += size
        return seq

    live = [start(_ids(0, 3), [3]), start(_ids(1, 40), [23, 17]), start(_ids(2, 7), [7])]
    for step in range(6):
        if step == 3:
            live = [start(_ids(3, 5), [5]), live[0], live[2]]
        tokens = [_ids(10 + step, len(live))[i] for i in range(len(live))]
        logits = backend.step(tokens, [caches[s] for s in live])
        for row, (s, token) in enumerate(zip(live, tokens)):
            run.add(s, [token], logits[row:row + 1])
    for step in range(3):
        token = _ids(20 + step, 1)[0]
        run.add(0, [token], backend.step([token], [caches[0]]))
    assert caches[0].capacity > 8 and caches[1].capacity >= 40  # the caches grew
    return run


# Of the logits' range, by KV cache dtype: a last-bit difference in a key or value (another order
# of the same sums) can move it across a rounding boundary of the cache, one step of its grid
KV_TOLERANCE = {"float32": 2e-5, "float16": 1e-4, "bfloat16": 1e-3, "int8": 1e-3}


def _tolerance(dtype: str, kv: str = "float32") -> float:
    """Of the logits' range. int4 linears round their input to a 16-bit grid per row: a last-bit
    difference upstream can move a value across a rounding boundary, one grid step."""
    return max(1e-4 if dtype.startswith("int4") else 2e-5, KV_TOLERANCE[kv])


def _assert_runs_equal(got: Run, want: Run, dtype: str, kv: str) -> None:
    assert got.tokens == want.tokens
    for seq, rows in enumerate(want.logits):
        assert rows.keys() == got.logits[seq].keys()
        for position, row in rows.items():
            mine = got.logits[seq][position]
            assert logits_close(mine, row, _tolerance(dtype, kv)), (seq, position)
            top2 = row.topk(2).values
            if float(top2[0] - top2[1]) > 2 * _tolerance(dtype, kv) * float(row.max() - row.min()):
                assert int(mine.argmax()) == int(row.argmax()), (seq, position)


@pytest.fixture(autouse=True)
def _float32_prompts(monkeypatch):
    """Prompts multiply in float32 (not bf16 on AVX512-BF16 CPUs), as decode steps do, so that a
    chunk of a prompt and a step agree to rounding; test_prefill_bf16 covers the bf16 prompts."""
    monkeypatch.setenv("FLM_PREFILL", "float32")


@pytest.mark.parametrize("variant,dtype,kv,kind", _conformance_params())
def test_backend_equals_reference(files, variant, dtype, kv, kind):
    backend, reference = _load(files[variant, dtype], variant, kind, kv)
    run = scenario(backend)
    if backend is not reference:
        _assert_runs_equal(run, scenario(reference), dtype, kv)
        return
    # the reference's incremental, batched run against one pass over each whole sequence
    for seq, tokens in enumerate(run.tokens):
        whole = reference.score(tokens)
        for position, row in run.logits[seq].items():
            assert logits_close(row, whole[position], _tolerance(dtype, kv)), (seq, position)


def test_choose_backend_takes_the_fastest_that_runs(files, monkeypatch):
    model = llm.model(files["gqa", "float16"]).model
    expected = Backend if NO_KERNELS else CpuStepBackend
    assert type(choose_backend(model)) is expected
    monkeypatch.setenv("FLM_BACKEND", "torch")
    assert type(choose_backend(model)) is Backend
    monkeypatch.setenv("FLM_BACKEND", "cuda-graph")
    with pytest.raises(FlmError, match="does not run on cpu"):
        choose_backend(model)


def test_reference_linears_fall_back_to_torch_unless_asked(files, monkeypatch):
    """A model whose linears are not on the SIMD kernels cannot take the C++ step: auto falls
    back to torch, an explicit FLM_BACKEND=cpu-step says why."""
    model = llm.model(files["gqa", "float16"], reference=True).model
    assert type(choose_backend(model)) is Backend
    monkeypatch.setenv("FLM_BACKEND", "cpu-step")
    with pytest.raises(FlmError, match="cpu-step: .*not on the SIMD kernels|cpu-step: the SIMD kernels"):
        choose_backend(model)


@pytest.mark.parametrize("kind", _backend_params())
def test_bad_token_ids_are_refused_and_leave_the_cache_as_it_was(files, kind):
    backend, _ = _load(files["gqa", "float16"], "gqa", kind)
    cache = backend.new_cache(32)
    backend.prefill(_ids(0, 4), cache)
    for bad in ([backend.model.cfg.vocab_size], [-1]):
        with pytest.raises(ValueError, match="token id outside"):
            backend.step(bad, [cache])
        with pytest.raises(ValueError, match="token id outside"):
            backend.prefill(bad + [5], cache)
    assert cache.length == 4
    with pytest.raises(ValueError, match="1 tokens for 2 caches"):
        backend.step([5], [cache, cache])


@pytest.mark.skipif(NO_KERNELS, reason="no SIMD kernels for this CPU (no AVX2/AVX-512)")
def test_two_threads_share_one_cpu_step(files):
    """The C++ step releases the GIL and keeps scratch buffers: concurrent callers must not mix."""
    backend, _ = _load(files["gqa", "float16"], "gqa", "cpu-step")

    def decode(seed: int) -> torch.Tensor:
        cache = backend.new_cache(64)
        out = [backend.prefill(_ids(seed, 9), cache)]
        for token in _ids(seed + 50, 12):
            out.append(backend.step([token], [cache])[0])
        return torch.stack(out)

    alone = [decode(s) for s in range(4)]
    together: dict[int, torch.Tensor] = {}
    threads = [threading.Thread(target=lambda s=s: together.__setitem__(s, decode(s))) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(4):
        assert torch.equal(alone[s], together[s])


@pytest.mark.skipif(not triton_linear.available(), reason="Triton is not installed")
def test_a_dropped_graph_goes_without_the_cycle_collector(files):
    """A graphed step that its backend lets go of must be freed at once: left to the cycle
    collector, it could be freed in the middle of another graph's capture, which that
    invalidates (cuda_graph._record)."""
    backend, _ = _load(files["gqa", "float32"], "gqa", "cuda-graph")
    cache = backend.new_cache(16)
    made = GraphedBatch(backend.model, [cache], backend.model.rotary.tables(16, backend.model.device), record=False)
    gone = weakref.ref(made)
    gc.disable()
    try:
        del made
        assert gone() is None
    finally:
        gc.enable()


@needs_gpu
def test_a_batch_size_is_recorded_once_and_replayed_for_other_caches(files):
    backend, _ = _load(files["gqa", "float16"], "gqa", "cuda-graph")
    scenario(backend)
    recorded = backend.graphs[3]
    assert recorded.graph is not None
    scenario(backend)  # other caches, grown at other steps: the same recording replays
    assert backend.graphs[3] is recorded


@pytest.mark.skipif(NO_KERNELS, reason="no SIMD kernels for this CPU (no AVX2/AVX-512)")
def test_cpu_step_runs_dynamic_ntk_past_the_trained_length_itself(files, monkeypatch):
    """Each sequence's angles (they depend on its length) go into the C++ step as rows of their
    own: no step falls back to the reference forward."""
    backend, _ = _load(files["dynamic-ntk", "float32"], "dynamic-ntk", "cpu-step")
    monkeypatch.setattr(Backend, "_step", lambda *a: pytest.fail("a step fell back to the reference forward"))
    run = scenario(backend)
    assert max(len(t) for t in run.tokens) > 2 * backend.model.cfg.max_position_embeddings
