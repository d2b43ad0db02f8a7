"""Prefix caching by page aliasing: TTFT and throughput with caching on and off, the cost of mapping a cached page,
and prefix-aware routing over HTTP.

    python benchmarks/bench_prefix.py --kv-cache-layout token_major \\
        --system-tokens 512 --num-requests 12 --num-conversations 4 --turns 3       # CPU, SmolLM2, both modes
    python benchmarks/bench_prefix.py --mode engine --model dummy:llama-3-8b --device cuda   # H100 (no Ray there)

Workloads (random token ids from the ordinary-text range, greedy, ``ignore_eos``):
  shared prompt: ``--num-requests`` requests, each one of ``--num-system-prompts`` system prompts of
      ``--system-tokens`` tokens followed by its own question of ``--question-tokens``, ``--output-tokens`` out.
  multi-turn: ``--num-conversations`` conversations of ``--turns`` turns. Turn 1 is a system prompt and a question;
      each next turn resends the history (the previous turn's prompt and answer) and a new question, once the
      previous answer is complete. In engine mode the answer is the tokens the engine generated; over HTTP, where
      completions come back as text, a stand-in of as many tokens.
  Requests (conversations) arrive as a Poisson process at ``--request-rate`` per second, or all at once (``inf``,
  the default: throughput is then the engine's own, and TTFT is the wait for the prefill ahead of a request).

Engine mode: each workload on two engines built alike but for ``enable_prefix_caching``, one after the other in
this process. TTFT p50 / p99 (``RequestOutput.first_token_time - arrival_time``), output tok/s, the hit rate
(cached prompt tokens over prompt tokens looked up, the engine's counters), and on / off ratios beside the
issue's targets (TTFT p50 >= 4x lower, throughput >= 1.5x higher). Then, on the caching engine's own cache, the
cost of ``allocate`` per page: a cached prefix aliased into a new slot (its physical pages mapped at a second
virtual address) against fresh pages.

Serving mode: a local Ray cluster, the app over HTTP with ``--num-replicas`` replicas, once per router (prefix-
and page-aware, page-aware only, Serve's power of two), and once with one replica. Hit rate from the replicas'
counters, TTFT from streamed completions; the multi-replica hit rate over the single replica's (target >= 0.8).

Writes ``results/prefix_<cpu|h100|h200|gpu>.json`` (``--name``), with the machine, commit and settings.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, write_result  # noqa: E402
from engine.block_hashes import block_hashes  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tokenizer import load_tokenizer  # noqa: E402
from engine.weights import resolve_model  # noqa: E402

TARGET_TTFT_RATIO = 4.0  # TTFT p50 off / on
TARGET_THROUGHPUT_RATIO = 1.5  # output tok/s on / off
TARGET_HIT_RATE_RATIO = 0.8  # hit rate of the multi-replica run / one replica's


# ---- workloads ----------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """A session: its first prompt, then one new question per later turn (a one-turn conversation is a request)."""

    first_prompt: list[int]
    questions: list[list[int]]
    output_tokens: int
    answers_seed: int  # where the HTTP client's stand-in answers come from


def make_workloads(args: argparse.Namespace, vocab_size: int) -> dict[str, list[Conversation]]:
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        # Clear of the special tokens at both ends of the vocabulary.
        return [rng.randrange(100, vocab_size - 100) for _ in range(n)]

    systems = [ids(args.system_tokens) for _ in range(args.num_system_prompts)]
    shared = [
        Conversation(systems[i % len(systems)] + ids(args.question_tokens), [], args.output_tokens, i)
        for i in range(args.num_requests)
    ]
    multi_turn = [
        Conversation(
            systems[i % len(systems)] + ids(args.question_tokens),
            [ids(args.question_tokens) for _ in range(args.turns - 1)],
            args.output_tokens,
            10_000 + i,
        )
        for i in range(args.num_conversations)
    ]
    return {"shared_prompt": shared, "multi_turn": multi_turn}


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of ``num`` conversations arrives (Poisson at ``rate``, or all at 0)."""
    if rate == float("inf"):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)
    return list(np.cumsum(gaps) - gaps[0])


def percentile_ms(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p) * 1000.0) if values else None


# ---- engine mode --------------------------------------------------------------------------------------------------


@dataclass
class _Session:
    conversation: Conversation
    turn: int = 0
    prompt: list[int] = field(default_factory=list)


def run_engine_workload(engine: LLMEngine, conversations: list[Conversation], rate: float, seed: int) -> dict:
    """Drives ``engine`` (stepping it here) through the conversations; TTFT, throughput, hit rate."""
    before = engine.stats()
    offsets = arrival_offsets(len(conversations), rate, seed)
    arrivals = sorted(zip(offsets, range(len(conversations))))
    sessions: dict[str, _Session] = {}
    request_ids = itertools.count()
    ttft_s, num_cached, num_prompt, num_output = [], 0, 0, 0

    def submit(session: _Session, prompt: list[int]) -> None:
        request_id = f"bench-{next(request_ids)}"
        session.prompt = prompt
        sessions[request_id] = session
        params = SamplingParams(temperature=0.0, max_tokens=session.conversation.output_tokens, ignore_eos=True)
        engine.add_request(request_id, prompt, params)

    start = time.time()
    while arrivals or engine.has_unfinished():
        while arrivals and arrivals[0][0] <= time.time() - start:
            _, index = arrivals.pop(0)
            conversation = conversations[index]
            submit(_Session(conversation), conversation.first_prompt)
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[0][0] - (time.time() - start)))
            continue
        for out in engine.step():
            if not out.finished:
                continue
            if out.error is not None:
                raise out.error
            session = sessions.pop(out.request_id)
            ttft_s.append(out.first_token_time - out.arrival_time)
            num_cached += out.num_cached_tokens
            num_prompt += out.num_prompt_tokens
            num_output += out.num_output_tokens
            questions = session.conversation.questions
            if session.turn < len(questions):
                history = session.prompt + list(out.token_ids)
                session.turn += 1
                submit(session, history + questions[session.turn - 1])
    elapsed_s = time.time() - start
    after = engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return {
        "num_requests": len(ttft_s),
        "elapsed_s": elapsed_s,
        "prompt_tokens": num_prompt,
        "output_tokens": num_output,
        "output_tok_s": num_output / elapsed_s,
        "p50_ttft_ms": percentile_ms(ttft_s, 50),
        "p99_ttft_ms": percentile_ms(ttft_s, 99),
        "mean_ttft_ms": statistics.mean(ttft_s) * 1000.0,
        "cached_prompt_tokens": num_cached,
        "hit_rate": hits / queries if queries else 0.0,
        "num_preemptions": after.num_preemptions - before.num_preemptions,
    }


def engine_config(args: argparse.Namespace, enable_prefix_caching: bool) -> EngineConfig:
    values = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "max_batch_size": args.max_batch_size,
        "max_seq_len": args.max_seq_len,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": enable_prefix_caching,
    }
    if args.kv_cache_memory_bytes is not None:
        values["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.kv_cache_layout is not None:
        values["kv_cache_layout"] = args.kv_cache_layout
    return EngineConfig.from_dict(values)


def measure_mapping_cost(engine: LLMEngine, num_tokens: int, repeats: int) -> dict:
    """``allocate`` of ``num_tokens + 1`` tokens on the engine's idle cache, per page mapped: fresh pages (nothing
    cached, every page taken from the pool and mapped) against a cached prefix of ``num_tokens`` tokens (its pages
    mapped at the new slot's addresses too; one fresh page per buffer for the last token)."""
    cache = engine.kv_cache
    block = cache.block_tokens
    num_tokens = num_tokens // block * block
    keys = block_hashes(list(range(num_tokens)), block, seed=0)
    pages = cache.pages_for_tokens(num_tokens + 1)
    shared_pages = cache.pages_for_tokens(num_tokens)
    slots = min(repeats, cache.config.max_batch_size - 1, cache.stats().total_pages // pages - 1)
    if slots < 1:
        return {"error": f"the pool holds no two requests of {num_tokens} tokens"}

    def timed_allocations(prefix: list[int], count: int) -> tuple[list[float], list[int]]:
        times, taken = [], []
        for _ in range(count):
            t = time.perf_counter()
            taken.append(cache.allocate(num_tokens + 1, prefix=prefix))
            times.append(time.perf_counter() - t)
        return times, taken

    cache.wait_idle()
    cache.reclaim()  # nothing mapped, nothing cached: every page below comes from the pool
    fresh, taken = timed_allocations([], slots)
    for slot in taken:
        cache.free(slot)
    cache.reclaim()
    _, (owner,) = timed_allocations([], 1)
    cache.register(owner, keys)  # the first slot's blocks, cached and held while the others map them
    aliased, taken = timed_allocations(keys, slots)
    for slot in [owner, *taken]:
        cache.free(slot)
    cache.reclaim()
    fresh_per_page_s = statistics.median(fresh) / pages
    own_pages = pages - shared_pages
    aliased_per_page_s = (statistics.median(aliased) - own_pages * fresh_per_page_s) / shared_pages
    return {
        "num_tokens": num_tokens,
        "pages_per_request": pages,
        "shared_pages": shared_pages,
        "allocations": slots,
        "fresh_allocate_ms": statistics.median(fresh) * 1e3,
        "aliased_allocate_ms": statistics.median(aliased) * 1e3,
        "fresh_us_per_page": fresh_per_page_s * 1e6,
        "aliased_us_per_shared_page": aliased_per_page_s * 1e6,
    }


def run_engine_mode(args: argparse.Namespace, workloads: dict[str, list[Conversation]]) -> dict:
    result: dict = {}
    for caching in (False, True):
        engine = LLMEngine(engine_config(args, caching))
        try:
            if caching:
                stats = engine.stats()
                result["cache"] = {
                    "num_total_pages": stats.num_total_pages,
                    "page_size_bytes": stats.page_size_bytes,
                    "block_tokens": engine.kv_cache.block_tokens,
                    "layout": engine.kv_cache.config.kv_cache_layout,
                }
            # A request as long as the workload's, sharing nothing with it: kernels compiled, buffers grown.
            warmup = [Conversation([1000 + i for i in range(args.system_tokens + args.question_tokens)], [], 4, 0)]
            run_engine_workload(engine, warmup, float("inf"), args.seed)
            for name, conversations in workloads.items():
                engine.kv_cache.wait_idle()
                engine.kv_cache.reclaim()  # each run starts with nothing cached, nothing mapped
                figures = run_engine_workload(engine, conversations, args.request_rate, args.seed)
                result.setdefault(name, {})["on" if caching else "off"] = figures
                print(
                    f"{name:14s} caching {'on ' if caching else 'off'}: TTFT p50 {figures['p50_ttft_ms']:9.1f} ms, "
                    f"p99 {figures['p99_ttft_ms']:9.1f} ms, {figures['output_tok_s']:8.1f} output tok/s, "
                    f"hit rate {figures['hit_rate']:.3f} ({figures['elapsed_s']:.1f} s)",
                    flush=True,
                )
            if caching:
                result["mapping_cost"] = measure_mapping_cost(engine, args.system_tokens, repeats=8)
        finally:
            engine.shutdown()
            del engine
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for name in workloads:
        on, off = result[name]["on"], result[name]["off"]
        result[name]["ttft_p50_off_over_on"] = off["p50_ttft_ms"] / on["p50_ttft_ms"]
        result[name]["ttft_p99_off_over_on"] = off["p99_ttft_ms"] / on["p99_ttft_ms"]
        result[name]["output_tok_s_on_over_off"] = on["output_tok_s"] / off["output_tok_s"]
        print(
            f"{name:14s} on vs off: TTFT p50 {result[name]['ttft_p50_off_over_on']:.2f}x lower "
            f"(target >= {TARGET_TTFT_RATIO}), p99 {result[name]['ttft_p99_off_over_on']:.2f}x lower, "
            f"output tok/s {result[name]['output_tok_s_on_over_off']:.2f}x (target >= {TARGET_THROUGHPUT_RATIO})"
        )
    cost = result["mapping_cost"]
    if "error" not in cost:
        print(
            f"allocate of {cost['num_tokens']} + 1 tokens: fresh pages {cost['fresh_us_per_page']:.2f} us/page, "
            f"a cached prefix aliased {cost['aliased_us_per_shared_page']:.2f} us per shared page "
            f"({cost['fresh_allocate_ms']:.2f} vs {cost['aliased_allocate_ms']:.2f} ms a request)"
        )
    return result


# ---- serving mode -------------------------------------------------------------------------------------------------

ROUTERS = {  # name -> the app's engine settings
    "prefix_and_page_aware": {"router": "page_aware", "prefix_affinity": True},
    "page_aware": {"router": "page_aware", "prefix_affinity": False},
    "power_of_two": {"router": "power_of_two"},
}


def serving_app_args(args: argparse.Namespace, num_replicas: int, router: dict) -> dict:
    engine_kwargs = {
        "max_batch_size": args.max_batch_size,
        "max_seq_len": args.max_seq_len,
        "max_num_batched_tokens": args.max_num_batched_tokens,
    }
    if args.kv_cache_memory_bytes is not None:
        engine_kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.kv_cache_layout is not None:
        engine_kwargs["kv_cache_layout"] = args.kv_cache_layout
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "engine_kwargs": engine_kwargs,
        "engine": {
            "num_replicas": num_replicas,
            "num_cpus": 0,
            "max_ongoing_requests": args.max_batch_size,
            "max_queued_requests": 1000,
            "routing_stats_period_s": 0.5,
            **router,
        },
        "ingress": {"num_cpus": 0, "max_queued_requests": 1000},
    }


def replica_counters(num_replicas: int) -> dict[str, dict]:
    """Every engine replica's stats (handle calls land on random replicas: poll until all are seen)."""
    from deployments.app import ENGINE_DEPLOYMENT_NAME
    from deployments.serve_mode import sync_handle

    handle = sync_handle(ENGINE_DEPLOYMENT_NAME, "bench")
    seen: dict[str, dict] = {}
    for _ in range(200):
        stats = handle.engine_stats.remote().result(timeout_s=60)
        seen[stats["replica"]] = stats
        if len(seen) == num_replicas:
            break
    return seen


async def drive_http(base_url: str, model: str, conversations: list[Conversation], rate: float, seed: int):
    """Each conversation turn by turn over streamed completions; all results and the duration."""
    import httpx

    from benchmarks.bench_serving import RequestSpec, send_one

    offsets = arrival_offsets(len(conversations), rate, seed)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def converse(conversation: Conversation, offset: float) -> list:
            await asyncio.sleep(offset)
            answers = random.Random(conversation.answers_seed)
            prompt, results = conversation.first_prompt, []
            for turn in range(len(conversation.questions) + 1):
                spec = RequestSpec(prompt, conversation.output_tokens, f"turn{turn + 1}")
                results.append(await send_one(client, base_url, model, spec))
                if turn < len(conversation.questions):
                    answer = [answers.randrange(1000, 30000) for _ in range(conversation.output_tokens)]
                    prompt = prompt + answer + conversation.questions[turn]
            return results

        start = time.perf_counter()
        per_conversation = await asyncio.gather(*(converse(c, o) for c, o in zip(conversations, offsets)))
        return [r for results in per_conversation for r in results], time.perf_counter() - start


def run_serving_mode(args: argparse.Namespace, workloads: dict[str, list[Conversation]]) -> dict:
    from ray import serve

    from benchmarks.bench_serving import deploy, start_local_ray, summarize

    runs = [(name, args.num_replicas, router) for name, router in ROUTERS.items()]
    runs.append(("one_replica", 1, ROUTERS["prefix_and_page_aware"]))
    start_local_ray(args.metrics_port)
    result: dict = {"app_args": {}, "runs": {}}
    try:
        for run_name, num_replicas, router in runs:
            app_args = serving_app_args(args, num_replicas, router)
            result["app_args"][run_name] = app_args
            base = deploy(app_args, args.http_port)
            warmup = [Conversation([1000 + i for i in range(16)], [], 2, 0)] * (2 * num_replicas)
            asyncio.run(drive_http(base, args.model, warmup, 50.0, 0))
            for name, conversations in workloads.items():
                before = replica_counters(num_replicas)
                results, duration = asyncio.run(
                    drive_http(base, args.model, conversations, args.request_rate, args.seed)
                )
                time.sleep(1.0)
                after = replica_counters(num_replicas)
                summary = summarize(results, duration)
                hits = sum(after[r]["prefix_cache_hits"] - before[r]["prefix_cache_hits"] for r in after)
                queries = sum(after[r]["prefix_cache_queries"] - before[r]["prefix_cache_queries"] for r in after)
                figures = {
                    "hit_rate": hits / queries if queries else 0.0,
                    "p50_ttft_ms": summary["p50_ttft_ms"],
                    "p99_ttft_ms": summary["p99_ttft_ms"],
                    "output_tok_s": summary["output_throughput_tok_s"],
                    "num_completed": summary["num_completed"],
                    "num_failed": summary["num_failed"],
                    "duration_s": duration,
                    "requests_by_replica": {
                        r: sum(k.values()) for r, k in summary["requests_by_replica_and_kind"].items()
                    },
                    "num_preemptions": sum(after[r]["num_preemptions"] - before[r]["num_preemptions"] for r in after),
                }
                result["runs"].setdefault(name, {})[run_name] = figures
                print(
                    f"{name:14s} {run_name:22s}: hit rate {figures['hit_rate']:.3f}, TTFT p50 "
                    f"{figures['p50_ttft_ms']:8.1f} ms p99 {figures['p99_ttft_ms']:8.1f} ms, "
                    f"{figures['output_tok_s']:6.1f} output tok/s, by replica {figures['requests_by_replica']}",
                    flush=True,
                )
            serve.delete("bench")
            time.sleep(2.0)
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()
    for name, by_run in result["runs"].items():
        single = by_run["one_replica"]["hit_rate"]
        ratios = {r: (by_run[r]["hit_rate"] / single if single else None) for r in ROUTERS}
        by_run["hit_rate_over_one_replica"] = ratios
        shown = ", ".join(f"{r} {v:.2f}" for r, v in ratios.items() if v is not None)
        print(f"{name:14s} hit rate over one replica's: {shown} (target >= {TARGET_HIT_RATE_RATIO})")
    return result


# ---- main ---------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["engine", "serving", "both"], default="both")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--system-tokens", type=int, default=2048)
    p.add_argument("--num-system-prompts", type=int, default=1)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=200, help="shared-prompt workload")
    p.add_argument("--num-conversations", type=int, default=64, help="multi-turn workload")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="per second; inf: all at once")
    p.add_argument("--max-batch-size", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 8192 on cuda, 512 on cpu")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="default: the engine's")
    p.add_argument("--kv-cache-layout", default=None, help="default: the engine's (token_major on cuda)")
    p.add_argument("--num-replicas", type=int, default=2, help="serving mode")
    p.add_argument("--http-port", type=int, default=8012)
    p.add_argument("--metrics-port", type=int, default=8092)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results/<name>.json; default prefix_<cpu|h100|h200|gpu>")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the device's defaults filled in."""
    args = build_parser().parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    args.max_batch_size = args.max_batch_size or (256 if on_gpu else 8)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (8192 if on_gpu else 512)
    return args


def main() -> None:
    args = parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    record = {
        "benchmark": "bench_prefix",
        "machine": machine_info(args.device),
        "settings": {k: (str(v) if v == float("inf") else v) for k, v in vars(args).items()},
    }
    # The same requests in both modes: token ids within the tokenizer's vocabulary (dummy models use SmolLM2's).
    workloads = make_workloads(args, len(load_tokenizer(resolve_model(args.model))))
    if args.mode in ("engine", "both"):
        record["engine"] = run_engine_mode(args, workloads)
    if args.mode in ("serving", "both"):
        record["serving"] = run_serving_mode(args, workloads)
    gpu = record["machine"].get("gpu") or ""
    card = next((c for c in ("H100", "H200") if c in gpu), "gpu") if on_gpu else "cpu"
    name = args.name or f"prefix_{card.lower()}"
    print(f"wrote {write_result(name, record)}")


if __name__ == "__main__":
    main()
