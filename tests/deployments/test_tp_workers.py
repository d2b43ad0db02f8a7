"""Tensor parallelism on CPU (gloo) through real Ray actors: TP=2 gives TP=1's greedy tokens, every rank's
KV cache holds the same pages, a dead worker fails the replica cleanly, and a Serve app with
``tensor_parallel_size: 2`` answers HTTP chat requests. One local Ray cluster for the module."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"

import httpx  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from deployments.tp_workers import make_executor_factory  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.distributed import free_port  # noqa: E402
from engine.errors import EngineDeadError  # noqa: E402
from engine.executor import WorkerDeadError  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.weights.resolve import DUMMY_TOKENIZER_DIR  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

# Llama-shaped, head counts divisible by 2. head_dim 128 with 4 KV heads makes tokens big (2 KiB per layer's K
# at TP=1, 1 KiB per rank at TP=2), so 64 KiB pages hold 32 / 64 tokens and a small pool forces preemption.
TINY_LLAMA = dict(
    vocab_size=49152,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
# 20 pages of 64 KiB = 5 per layer's K and V: at TP=2 two requests past 64 tokens don't fit together.
CACHE = dict(max_batch_size=4, max_seq_len=256, kv_cache_memory_bytes=20 << 16, max_num_batched_tokens=128)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny Llama saved by transformers (loaded through our safetensors loader), with SmolLM2's
    tokenizer and chat template so that the Serve app can serve it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-tp")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
    with torch.no_grad():  # spread the logits: greedy choices far from ties, robust to reduction order
        model.lm_head.weight.normal_(0.0, 0.2)
    model.save_pretrained(path)
    for f in DUMMY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, path / f.name)
    return path


def _pythonpath() -> str:
    """The project first, then what this process was given (packages installed beside the image's Python)."""
    return os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(
        address="local",
        num_cpus=4,  # logical: the Serve TP replica's placement group takes 2 one-CPU bundles
        # On a GPU machine Ray hands out the first GPU only: this process (rank 0 of the GPU test) takes the second.
        num_gpus=1 if torch.cuda.device_count() >= 2 else 0,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": _pythonpath(), "RAY_AUTH_MODE": "disabled"}},
        logging_level="WARNING",
    )
    yield
    serve.shutdown()
    ray.shutdown()


def _config(checkpoint: Path, tp: int) -> EngineConfig:
    return EngineConfig.from_dict({"model": str(checkpoint), "device": "cpu", "tensor_parallel_size": tp, **CACHE})


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (40, 13, 57, 25, 33)]


def _run_to_completion(engine: LLMEngine, prompts, max_tokens: int, on_step=None) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.token_ids)
        if on_step is not None:
            on_step(engine)
    return tokens


def _assert_ranks_agree(engine: LLMEngine) -> int:
    states = engine.executor.rank_cache_states()
    assert len(states) == 2
    rank0, rank1 = states
    assert rank0["num_kv_heads"] == rank1["num_kv_heads"] == TINY_LLAMA["num_key_value_heads"] // 2
    for field in ("total_pages", "free_pages", "mapped_pages", "reclaimable_pages", "num_active_slots"):
        assert getattr(rank0["stats"], field) == getattr(rank1["stats"], field), field
    assert rank0["slot_page_ids"] == rank1["slot_page_ids"]
    return len(rank0["slot_page_ids"])


def test_tp2_matches_tp1_greedy_with_preemption(ray_cluster, checkpoint):
    prompts, max_tokens = _prompts(), 40
    ref_engine = LLMEngine(_config(checkpoint, 1))
    try:
        expected = _run_to_completion(ref_engine, prompts, max_tokens)
    finally:
        ref_engine.shutdown()

    engine = LLMEngine(_config(checkpoint, 2), executor_factory=make_executor_factory())
    try:
        assert engine.executor.tp_size == 2
        assert engine.async_scheduling  # the workers get the previous step's samples by a broadcast
        assert engine.kv_cache.config.num_kv_heads == 2  # each rank holds half the KV heads
        checked_with_active = []

        def check(e: LLMEngine) -> None:
            if e.num_steps % 15 == 0:
                checked_with_active.append(_assert_ranks_agree(e))

        got = _run_to_completion(engine, prompts, max_tokens, on_step=check)
        assert got == expected
        assert engine.scheduler.num_preemptions > 0, "the pool should be small enough to preempt"
        assert any(checked_with_active), "page ids were never compared while slots were active"
        _assert_ranks_agree(engine)
        per_rank = engine.executor.cache_stats()
        assert engine.stats().num_free_pages == min(s.free_pages for s in per_rank)
        engine.shutdown()
        # A healthy engine's workers leave after a STOP (their devices idle, the group left together), not killed.
        assert ray.get(engine.executor.workers._loop_refs, timeout=30) == [None]
        assert engine.executor.workers.failure(0.0) is None  # a stop as asked is no failure
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_tp2_on_two_gpus_keeps_the_ranks_in_step_under_preemption(ray_cluster, tmp_path):
    """The GPU path of asynchronous tensor-parallel steps: NCCL, the previous step's samples broadcast to the worker
    (float32: eager attention, no CUDA graphs; the test below has them), and replayed unmaps that wait for the
    worker's own forwards, under a pool small enough to preempt; no rank ever waits for its device on the host (a
    page unmapped under a running kernel would fault)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    import json

    from engine.tp_channel import checked_stats

    config = dict(TINY_LLAMA, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=16)
    config.update(num_key_value_heads=16, head_dim=64, max_position_embeddings=4096, model_type="llama")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    # float32, 8 KV heads x 64 per rank: 2 KiB a token in each of 8 buffers, 1024 tokens a 2 MiB page. 3 pages a
    # buffer: three requests of ~1200 tokens do not fit together.
    engine = LLMEngine(
        EngineConfig.from_dict(
            {
                "model": f"dummy:{path}",
                "device": "cuda:1",
                "dtype": "float32",
                "tensor_parallel_size": 2,
                "max_batch_size": 8,
                "max_seq_len": 2048,
                "kv_cache_memory_bytes": 24 << 21,
                "max_num_batched_tokens": 1024,
            }
        ),
        executor_factory=make_executor_factory(),
    )
    try:
        assert engine.async_scheduling
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, 32000, (n,), generator=g).tolist() for n in (500, 620, 480, 700, 530, 560)]
        agreed = []

        def check(e: LLMEngine) -> None:
            if e.num_steps % 50 == 0:
                rank0, rank1 = e.executor.rank_cache_states()
                assert checked_stats(rank0["stats"]) == checked_stats(rank1["stats"])
                assert rank0["slot_page_ids"] == rank1["slot_page_ids"]
                agreed.append(len(rank0["slot_page_ids"]))

        got = _run_to_completion(engine, prompts, 700, on_step=check)
        assert sorted(got) == [f"r{i}" for i in range(len(prompts))]
        assert all(len(tokens) == 700 for tokens in got.values())
        assert engine.scheduler.num_preemptions > 0, "the pool should be small enough to preempt"
        assert any(agreed), "the ranks were never compared while slots were active"
        engine.executor.check_health()
        engine.shutdown()
        # Both ranks left the NCCL group by themselves after the STOP (not killed).
        assert ray.get(engine.executor.workers._loop_refs, timeout=30) == [None]
        assert engine.executor.workers.failure(0.0) is None
    finally:
        engine.shutdown()


@pytest.mark.gpu
def test_a_tp2_engine_with_cuda_graphs_shuts_down_healthy_or_with_a_dead_worker(ray_cluster, checkpoint):
    """The decode CUDA graphs hold NCCL's communicator (each captured an all-reduce), and both leaving the group and
    aborting it wait until no graph does. A healthy engine's ranks leave by themselves after a STOP; an engine whose
    worker was killed while it replayed graphs aborts the group (from the death watch, then in the shutdown) and
    still shuts down."""
    import concurrent.futures

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    config = {"model": str(checkpoint), "device": "cuda:1", "dtype": "bfloat16", "tensor_parallel_size": 2}
    config.update(CACHE, kv_cache_memory_bytes=16 << 21)  # 2 MiB pages on CUDA
    params = SamplingParams(temperature=0.0, max_tokens=150, ignore_eos=True)

    def start() -> LLMEngine:
        engine = LLMEngine(EngineConfig.from_dict(config), executor_factory=make_executor_factory())
        assert engine.runner.graph_runner is not None, "the test needs the decode graphs"
        for i, prompt in enumerate(_prompts()[:3]):
            engine.add_request(f"r{i}", prompt, params)
        for _ in range(20):  # decode steps replayed from the graphs, with their all-reduces
            engine.step()
        return engine

    def shuts_down(engine: LLMEngine) -> bool:
        """Whether ``engine.shutdown()`` returned within 90 s (an exception in it is raised here)."""
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            pool.submit(engine.shutdown).result(timeout=90)
            return True
        except concurrent.futures.TimeoutError:
            return False
        finally:
            pool.shutdown(wait=False)

    engine = start()
    try:
        assert shuts_down(engine), "a healthy TP engine's shutdown hung"
        assert ray.get(engine.executor.workers._loop_refs, timeout=30) == [None]  # left by itself, not killed
        assert engine.executor.workers.failure(0.0) is None
    finally:
        engine.shutdown()

    engine = start()
    try:
        (worker,) = engine.executor.workers.actors
        ray.kill(worker)
        killed_at = time.time()
        with pytest.raises((WorkerDeadError, EngineDeadError)):
            while time.time() < killed_at + 60:
                engine.step()
        # Not the step channel's 120 s timeout: a send to the dead worker gives up once the death watch fires.
        assert time.time() - killed_at < 20, f"the engine failed {time.time() - killed_at:.0f} s after the kill"
        assert shuts_down(engine), "the shutdown of a TP engine with a dead worker hung"
    finally:
        engine.shutdown()


def test_a_rank_whose_cache_diverges_fails_the_engine_by_name(ray_cluster, checkpoint):
    from engine.tp_channel import STEP, checked_stats

    engine = LLMEngine(_config(checkpoint, 2), executor_factory=make_executor_factory())
    try:
        _run_to_completion(engine, _prompts()[:2], 4)
        executor = engine.executor
        wrong = list(checked_stats(engine.kv_cache.stats()))
        wrong[1] += 1  # free_pages
        executor._channel.send((STEP, [], tuple(wrong), [], None))  # what a rank that missed an operation sees
        deadline = time.time() + 20
        while True:
            try:
                executor.check_health()
            except WorkerDeadError as exc:
                assert "rank 1's KV cache diverged from rank 0's" in str(exc) and "free_pages" in str(exc)
                break
            assert time.time() < deadline, "the diverged rank was never reported"
            time.sleep(0.1)
        engine.add_request("after", [5, 6, 7], SamplingParams(max_tokens=2))
        with pytest.raises(WorkerDeadError):
            engine.step()
    finally:
        engine.shutdown()


def test_killed_worker_fails_requests_and_health_check(ray_cluster, checkpoint):
    from deployments.engine_deployment import EngineDeployment
    from deployments.routing_hint import RoutingHint

    deployment = EngineDeployment(
        {"model": str(checkpoint), "device": "cpu", "tensor_parallel_size": 2, **CACHE}, "tiny"
    )

    async def generate(request_id: str) -> list:
        return [
            c
            async for item in deployment.generate(
                RoutingHint(5, 4), [5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=4), request_id
            )
            for c in item
        ]

    try:
        chunks = asyncio.run(generate("ok"))
        assert chunks[-1].finished and chunks[-1].error is None
        deployment.check_health()
        assert deployment.record_routing_stats()["num_free_pages"] > 0

        # Tensor parallelism keeps the core in the replica's process, where the worker actors are driven from.
        (worker,) = deployment._engine._core.engine.executor.workers.actors
        ray.kill(worker)
        deadline = time.time() + 20
        while True:  # the death watch notices without any request
            try:
                deployment.check_health()
            except (WorkerDeadError, EngineDeadError) as exc:
                assert "tensor-parallel worker died" in str(exc)
                break
            assert time.time() < deadline, "check_health never noticed the dead worker"
            time.sleep(0.1)

        chunks = asyncio.run(generate("after-kill"))
        assert chunks[-1].status_code == 503 and chunks[-1].error["type"] == "engine_dead"
        with pytest.raises((EngineDeadError, WorkerDeadError)):
            deployment.check_health()
    finally:
        deployment._engine.shutdown()


def test_a_worker_death_ends_the_streams_while_rank_0_is_stuck_in_its_step(ray_cluster, checkpoint):
    """On a GPU, rank 0's step waits on its device for all-reduces that a dead rank never joins (and aborting them
    waits for the step's CUDA graphs): the step need not return. Ray's death notice must end the requests in flight
    anyway, with the in-band engine_dead error, not when Serve kills the replica. Rank 0's step is held here."""
    import threading

    from deployments.engine_deployment import EngineDeployment
    from deployments.routing_hint import RoutingHint

    deployment = EngineDeployment(
        {"model": str(checkpoint), "device": "cpu", "tensor_parallel_size": 2, **CACHE}, "tiny"
    )
    executor = deployment._engine._core.engine.executor
    hold, release = threading.Event(), threading.Event()
    run = executor.runner.run

    def run_or_hang(*args, **kwargs):
        if hold.is_set():
            release.wait(60)
        return run(*args, **kwargs)

    executor.runner.run = run_or_hang
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def stream_through_the_kill() -> tuple[list, float]:
        chunks, killed_at = [], None
        async for item in deployment.generate(RoutingHint(5, 200), [5, 6, 7, 8, 9], params, "in-flight"):
            chunks += item
            if killed_at is None:
                hold.set()  # the next step hangs, as on a device waiting for a dead peer
                (worker,) = executor.workers.actors
                ray.kill(worker)
                killed_at = time.time()
        return chunks, time.time() - killed_at

    try:
        chunks, ended_after_s = asyncio.run(stream_through_the_kill())
        assert chunks[-1].status_code == 503 and chunks[-1].error["type"] == "engine_dead", chunks[-1]
        assert ended_after_s < 15, f"the stream ended {ended_after_s:.1f} s after the kill"
        assert not release.is_set()  # rank 0's step was still stuck when the stream ended
        with pytest.raises((EngineDeadError, WorkerDeadError)):
            deployment.check_health()
    finally:
        release.set()
        deployment._engine.shutdown()


def test_serve_app_with_tp2_answers_chat(ray_cluster, checkpoint):
    from deployments.app import build_app

    http_port = free_port("127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    args = {
        "model": str(checkpoint),
        "served_model_name": "tiny",
        "device": "cpu",
        "tensor_parallel_size": 2,
        "engine_kwargs": CACHE,
        "engine": {"num_replicas": 1, "num_cpus": 0, "health_check_period_s": 1.0},
        "ingress": {"num_cpus": 0},
    }
    serve.run(build_app(args), name="tp", route_prefix="/")
    base = f"http://127.0.0.1:{http_port}"
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "temperature": 0}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8

    # Kill the replica's rank-1 worker: requests fail cleanly, Serve replaces the replica, service resumes.
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-tp-rank1")]
    assert len(names) == 1, names
    namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == names[0])
    ray.kill(ray.get_actor(names[0], namespace=namespace))
    statuses = []
    deadline = time.time() + 90
    while time.time() < deadline:
        r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        statuses.append(r.status_code)
        if r.status_code == 200 and len(statuses) > 1:
            break
        assert r.status_code in (200, 500, 502, 503), r.text
        time.sleep(0.5)
    assert 503 in statuses and statuses[-1] == 200, statuses  # failed cleanly, then a new replica served
    serve.delete("tp")
