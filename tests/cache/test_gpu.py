"""GPU-only checks of the caches whose data path the CPU cannot exercise (pinned memory,
side streams, the Triton paged-attention kernel, CUDA-graph decode)."""

import pytest
import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.cache.sparse import SparseConfig, SparseKVCache
from kvdrive.cache.streaming import HostStreamingKVCache
from kvdrive.models.decoder import DecoderLM
from kvdrive.models.registry import from_hf_config

pytestmark = pytest.mark.gpu


def _model(dtype=torch.float32):
    from transformers import AutoConfig

    cfg = from_hf_config(
        AutoConfig.for_model(
            "llama",
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=4096,
        )
    )
    torch.manual_seed(0)
    return DecoderLM(cfg).to("cuda", dtype).eval()


def _run(model, cache, prompts, steps):
    for i, p in enumerate(prompts):
        cache.add(i, 1200)
        b = cache.plan([i], len(p))
        model(torch.tensor([p], device="cuda"), cache, b)
        cache.commit(b)
    out = []
    for t in range(steps):
        b = cache.plan(list(range(len(prompts))), 1)
        out.append(model(torch.full((len(prompts), 1), 5 + t, device="cuda"), cache, b))
        cache.commit(b)
    return torch.stack(out, 1)


@pytest.mark.parametrize("overlap", [True, False])
def test_host_streaming_equals_gpu_cache(overlap):
    model = _model()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (700, 333)]
    dev = torch.device("cuda")
    ref = _run(model, ContiguousKVCache(model.config, 2, 1200, dev, torch.float32), prompts, 16)
    got = _run(model, HostStreamingKVCache(model.config, 2, 1200, dev, torch.float32, overlap=overlap), prompts, 16)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_sparse_triton_full_budget_equals_gpu_cache():
    model = _model(torch.bfloat16)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (900, 517, 64)]
    dev = torch.device("cuda")
    ref = _run(model, ContiguousKVCache(model.config, 3, 1200, dev, torch.bfloat16), prompts, 12).float()
    got = _run(
        model, SparseKVCache(model.config, 3, 1200, dev, torch.bfloat16, SparseConfig(budget=100_000)), prompts, 12
    ).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 2e-2  # bf16 operands, different summation order
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("lengths, new", [((400, 260, 600), None), ((250, 100, 500), 24)])
def test_cuda_graph_decode_matches_eager(lengths, new):
    """Graphed and eager decode give the same tokens; the second case crosses the graph's
    span (256, then 512) mid-decode, so it is captured again over more keys."""
    from kvdrive.engine import generation
    from kvdrive.engine.sampling import SamplingParams

    model = _model()
    outs = []
    for graphs in (True, False):
        reqs = [
            generation.Request(
                i,
                torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(i)).tolist(),
                SamplingParams(max_tokens=new or n // 20, temperature=0, ignore_eos=True),
                new or n // 20,
            )
            for i, n in enumerate(lengths)
        ]
        cache = ContiguousKVCache(model.config, 3, 700, torch.device("cuda"), torch.float32)
        list(generation.run(model, cache, reqs, (), None, cuda_graphs=graphs))
        outs.append([r.output_ids for r in reqs])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("start", [0, 1536])
def test_prefill_chunk_runs_the_flash_kernel_and_matches_fp32(start):
    """A bf16 prefill chunk (GQA 32/8, D 128) attends in SDPA's flash kernel with no mask, and
    equals the fp32 masked reference within bf16 rounding (inputs and output rounded to 8 bits
    of mantissa: relative error ~1e-2)."""
    from torch.profiler import ProfilerActivity, profile

    from kvdrive.cache.base import LayerSpec
    from kvdrive.cache.contiguous import attention_mask, chunk_attention, sdpa

    t, spec = 512, LayerSpec(window=None, scale=128**-0.5)
    q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 8, start + t, 128, device="cuda", dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = chunk_attention(q, k, v, start, spec)
        torch.cuda.synchronize()
    kernels = [e.key.lower() for e in prof.key_averages()]
    assert any("flash" in name for name in kernels), kernels
    mask = attention_mask(torch.tensor([start], device="cuda"), t, start + t, None)
    want = sdpa(q.float(), k.float(), v.float(), mask, spec.scale, None)
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 1e-2


def test_each_graph_capture_is_reported_with_its_time():
    """The first capture and the one a span crossing (256 -> 512 positions) makes both reach
    ``on_capture`` with their wall time: what the engine's capture counters add up."""
    from factories import decode_steps, random_prompts, tiny_model

    from kvdrive.engine.cuda_graph import GraphedDecodeStep

    model = tiny_model().to("cuda")
    cache = ContiguousKVCache(model.config, 1, 700, torch.device("cuda"), torch.float32)
    decode_steps(model, cache, random_prompts((250,), seed=1), 0)
    seen = []
    ids = torch.full((1, 1), 7, device="cuda")
    graph = GraphedDecodeStep(model, cache, [0], ids, on_capture=seen.append)
    for _ in range(10):  # lengths 250 -> 260: the span grows once, at 257 positions
        graph(ids)
        graph.commit()
    assert len(seen) == 2 and all(s > 0 for s in seen) and graph.span == 512


def test_a_paged_graph_is_captured_once_as_its_sequence_grows():
    """The paged cache's decode reads each sequence's own pages over the table's whole width:
    growing past 256 and 512 positions captures nothing again, and the tokens equal eager decode."""
    from factories import decode_steps, random_prompts, tiny_model

    from kvdrive.cache.paged import PagedKVCache
    from kvdrive.engine.cuda_graph import GraphedDecodeStep

    model = tiny_model().to("cuda")
    dev = torch.device("cuda")
    graphed, eager = (PagedKVCache(model.config, 1, 700, dev, torch.float32) for _ in range(2))
    for cache in (graphed, eager):
        decode_steps(model, cache, random_prompts((250,), seed=1), 0)
    seen = []
    ids = torch.full((1, 1), 7, device="cuda")
    graph = GraphedDecodeStep(model, graphed, [0], ids, on_capture=seen.append)
    for _ in range(300):  # lengths 250 -> 550: past 256 and 512 positions
        got = graph(ids).clone()
        graph.commit()
        batch = eager.plan([0], 1)
        want = model(ids, eager, batch)
        eager.commit(batch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # (1, V) each
    assert len(seen) == 1 and graph.span is None


def test_the_paged_engine_keeps_one_graph_per_padded_batch_size():
    """Requests that finish at different steps shrink the batch 3 -> 2 -> 1, then a new one
    joins (2, then 1 again): the graphs of sizes 3, 2 and 1 are each captured once and replayed
    after, and the tokens equal eager decode's."""
    from kvdrive.cache.paged import PagedKVCache
    from kvdrive.engine.core import Engine
    from kvdrive.engine.generation import Request
    from kvdrive.engine.sampling import SamplingParams

    model = _model()
    outs, captures = [], []
    for graphs in (True, False):
        cache = PagedKVCache(model.config, 3, 700, torch.device("cuda"), torch.float32)
        engine = Engine(model, cache, (), None, cuda_graphs=graphs)
        reqs = [
            Request(
                i,
                torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(i)).tolist(),
                SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
                m,
            )
            for i, (n, m) in enumerate([(300, 8), (120, 16), (260, 24), (90, 12)])
        ]
        for r in reqs[:3]:
            engine.add_request(r)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
            if steps == 20:  # the batch is down to one sequence: a fourth joins it
                engine.add_request(reqs[3])
        outs.append([r.output_ids for r in reqs])
        captures.append(engine.counters.graph_captures)
    assert outs[0] == outs[1]
    assert captures == [3, 0]


def test_a_failed_padded_capture_falls_back_to_one_graph_per_batch(monkeypatch):
    from kvdrive.cache.paged import PagedKVCache
    from kvdrive.engine import cuda_graph
    from kvdrive.engine.core import Engine
    from kvdrive.engine.generation import Request
    from kvdrive.engine.sampling import SamplingParams

    def refuse(self, size):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph.PaddedDecodeGraphs, "_capture", refuse)
    model = _model()
    cache = PagedKVCache(model.config, 2, 400, torch.device("cuda"), torch.float32)
    engine = Engine(model, cache, (), None)
    req = Request(0, list(range(50)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), 6)
    engine.add_request(req)
    with pytest.warns(UserWarning, match="one CUDA graph per batch"):
        while engine.has_unfinished():
            engine.step()
    assert len(req.output_ids) == 6 and not engine.padded_graphs and engine.counters.graph_captures == 1
