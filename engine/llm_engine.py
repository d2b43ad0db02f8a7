"""The synchronous engine loop: requests in, one batched forward per step, outputs out."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence

import torch

from engine.batch import to_device
from engine.block_hashes import prefix_seed
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import InvalidRequestError, PromptTooLongError
from engine.executor import ExecutorFactory
from engine.outputs import EngineStats, RequestOutput
from engine.prefix_summary import PrefixSummary, summarize_prefixes
from engine.request import Request, RequestStatus
from engine.sampler import SampledTokens, Sampler, SamplerOutput
from engine.sampling_params import SamplingDefaults, SamplingParams
from engine.scheduler import LaunchedStep, Scheduler, SchedulerOutput
from engine.structured_output import Grammar, GrammarCompiler

logger = logging.getLogger(__name__)

# How old the prefix summary in stats() may get while requests run: it costs a pass over the prefix registry
# (milliseconds with tens of thousands of cached blocks), too much for every step; the router reads it every 0.5 s.
PREFIX_SUMMARY_PERIOD_S = 0.2


class LLMEngine:
    """Continuous-batching generation over the vAttention KV cache. Not thread-safe: one caller
    thread drives ``add_request`` / ``step`` / ``abort`` (``engine.engine_core.EngineCore``'s loop, under
    ``AsyncLLMEngine``).

    Attributes:
        tokenizer: the model's Hugging Face tokenizer (chat template included).
        max_model_len: most tokens (prompt + output) one request may hold by the model and cache shape.
        max_request_tokens: the same, also bounded by the whole KV page pool: a longer request could never run.
        kv_cache: the runner's ``kvcache.KVCache`` (rank 0's, recording its operations, under tensor parallelism).
        executor: where forwards run (``LocalExecutor``, or a tensor-parallel ``TPExecutor``).
        sampling_defaults: the model's recommended sampling (its ``generation_config.json``): what a request without
            ``params`` gets, and what a caller building ``params`` may start from (``sampling_defaults.params(...)``).
        async_scheduling: whether steps are launched before the previous step's tokens reach the host
            (``SchedulerConfig.async_scheduling`` where the executor allows it); may be switched between steps.
    """

    def __init__(self, config: EngineConfig | None = None, executor_factory: ExecutorFactory | None = None) -> None:
        """``executor_factory(config) -> Executor`` runs the forwards; default: this process's device
        (``tensor_parallel_size`` 1). Tensor parallelism needs one (``deployments.tp_workers``)."""
        from engine.executor import LocalExecutor
        from engine.tokenizer import load_tokenizer
        from engine.weights import read_generation_config

        self.config = config if config is not None else EngineConfig()
        self.executor = (executor_factory or LocalExecutor)(self.config)
        self.runner = self.executor.runner
        self.kv_cache = self.executor.kv_cache
        self.tokenizer = load_tokenizer(self.runner.resolved)
        self.device = torch.device(self.config.model.resolved_device())
        self.max_model_len = min(self.kv_cache.config.max_seq_len, self.runner.max_model_len)
        # Taken now, while no request holds pages.
        self.max_request_tokens = min(self.max_model_len, self.kv_cache.max_request_tokens)
        self.eos_token_ids = frozenset(self.runner.eos_token_ids)
        self.sampling_defaults = SamplingDefaults.from_generation_config(read_generation_config(self.runner.resolved))
        self.vocab_size = int(self.runner.hf_config.vocab_size)
        self.scheduler = Scheduler(self.config.scheduler, self.kv_cache, self._prefix_seed())
        self.sampler = Sampler(self.device, seed=self.config.sampler_seed)
        self.requests: dict[str, list[Request]] = {}  # the caller's id -> its sequences (params.n of them)
        self._grammar_compiler: GrammarCompiler | None = None  # made by the first request with a JSON schema
        self._grammar_lock = threading.Lock()
        self._pending_outputs: list[RequestOutput] = []  # aborts, delivered by the next step()
        self._request_counter = itertools.count()
        self.num_steps = 0
        self.async_scheduling = self.config.scheduler.async_scheduling and self.executor.supports_device_inputs
        self._in_flight: LaunchedStep | None = None  # launched, tokens not processed yet
        self._prefix_summary: tuple[float, PrefixSummary] | None = None  # (taken at, monotonic s; the summary)

    # ---- requests ---------------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        grammars: list[Grammar | None] | None = None,
    ) -> None:
        """Queue a request. A text prompt is tokenized with the tokenizer's special tokens (BOS where the
        model uses one); pass token ids to control tokenization (e.g. an applied chat template). ``grammars``: the
        request's ``compile_grammars(params)``, compiled beforehand (else compiled here).

        With ``params.n`` > 1 the prompt is tokenized and checked once, then queued as ``n`` sequences in a row
        (with prefix caching, those admitted after the first has computed the prompt's full blocks reuse them).

        Raises:
            InvalidRequestError: duplicate id, empty or malformed prompt, bad sampling parameter, invalid JSON schema.
            PromptTooLongError: prompt + max_tokens beyond ``max_model_len``, or more KV pages than the
                whole pool holds, i.e. a request that could never run.
        """
        params = params if params is not None else self.sampling_defaults.params()
        prompt_token_ids, max_tokens = self.check_request(request_id, prompt, params)
        if grammars is None:
            grammars = self.compile_grammars(params)
        elif len(grammars) != params.n:
            raise ValueError(f"grammars must hold one entry per sequence ({params.n}), got {len(grammars)}")

        arrival_time = arrival_time if arrival_time is not None else time.time()
        requests = []
        for index, grammar in enumerate(grammars):
            generator = None
            if params.seed is not None:
                # Sample i draws from seed + i: the n samples differ, and each repeats.
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed + index)
            requests.append(
                Request(
                    request_id=request_id,
                    prompt_token_ids=prompt_token_ids,
                    params=params,
                    max_tokens=max_tokens,
                    eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
                    detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, stop=params.stop),
                    index=index,
                    generator=generator,
                    grammar=grammar,
                    arrival_time=arrival_time,
                )
            )
        self.requests[request_id] = requests
        for request in requests:
            self.scheduler.add(request)

    def check_request(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams
    ) -> tuple[list[int], int]:
        """What ``add_request`` checks before it compiles grammars and queues: ``(prompt_token_ids, max_tokens)``.

        Raises:
            InvalidRequestError / PromptTooLongError: as ``add_request`` (all but an invalid JSON schema).
        """
        params.validate()
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError("request_id must be a non-empty string", "request_id")
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        prompt_token_ids = self._tokenize(prompt)
        return prompt_token_ids, self._check_fits(len(prompt_token_ids), params)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its slot (the cache keeps the slot's rows until the steps in flight that touch
        them are done). Its final output (finish_reason "abort") comes out of the next ``step()``. Returns False
        when the id is unknown or already finished. Every unfinished sequence of the request is aborted."""
        unfinished = [r for r in self.requests.get(request_id, ()) if not r.is_finished]
        for request in unfinished:
            self._finish_with_output(request, RequestStatus.FINISHED_ABORTED)
        return bool(unfinished)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending_outputs) or self._in_flight is not None

    # ---- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one iteration and return the outputs of every request that progressed or finished.

        The pipeline, with the scheduler owning every request's state:

        1. ``scheduler.schedule()``: the plan (grows slots, preempts);
        2. launch: the forward (placeholder inputs read on the device from the step in flight), then the sampling
           of the rows that complete their known tokens; nothing waits for the device;
        3. ``scheduler.on_launched()``: the step's fence over its slots, progress, placeholders, and the page
           mapping for the next step while the device works;
        4. ``scheduler.update_from_output()`` of the step launched before: wait for it, append tokens, stop;
           then the outputs.

        With asynchronous scheduling step 4 handles the previous step, so an output lags its step by one call and
        the device never waits for the host's bookkeeping; otherwise each step's tokens are handled in the same call.
        A step is finished first when the next one needs its tokens on the host (penalties, grammars), or when nothing
        can be scheduled before it lands (e.g. every free slot is still in it).
        """
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and not self._can_overlap():
            outputs += self._finish(self._take_in_flight())
        plan = self.scheduler.schedule()
        if plan.is_empty and self._in_flight is not None:
            outputs += self._finish(self._take_in_flight())
            plan = self.scheduler.schedule()
        if plan.is_empty and self.scheduler.num_waiting:
            # Free slots may still be held by device work recorded outside this loop: wait for it once.
            self.kv_cache.wait_idle()
            plan = self.scheduler.schedule()
        previous = self._in_flight
        # If the launch raises, the step before stays in flight (its tokens are not lost).
        self._in_flight = self._launch(plan, previous) if not plan.is_empty else None
        if previous is not None:
            outputs += self._finish(previous)
        if self._in_flight is not None and not self.async_scheduling:
            outputs += self._finish(self._take_in_flight())
        outputs += self._pending_outputs
        self._pending_outputs = []
        return outputs

    def _can_overlap(self) -> bool:
        """Whether the next step may be launched before the last one's tokens are on the host: penalties and
        grammars need each running request's whole output there."""
        return self.async_scheduling and not any(r.params.needs_output_on_host for r in self.scheduler.running)

    def _take_in_flight(self) -> LaunchedStep | None:
        launched, self._in_flight = self._in_flight, None
        return launched

    def _launch(self, plan: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        """Launch ``plan``'s forward and the sampling of its completed prompts; nothing waits for the device."""
        self.num_steps += 1
        prev_rows = previous.placeholder_rows(plan) if previous is not None else None
        # [N, vocab]; asynchronous on GPU, decode steps replayed from a CUDA graph there.
        logits = self.executor.run(plan.chunks, previous.sampled.token_ids if prev_rows else None, prev_rows)
        rows = plan.sampling_rows
        requests = [plan.scheduled[i].request for i in rows]
        sampled = None
        if rows:
            if len(rows) != len(plan.scheduled):
                logits = logits[to_device(rows, torch.int64, logits.device)]
            requests, sampled = self._sample(logits, requests)
        return self.scheduler.on_launched(plan, requests, sampled)

    def _finish(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for ``launched``; the outputs of the requests its tokens reached."""
        outputs = []
        for request in self.scheduler.update_from_output(launched):
            if request.is_finished:
                self._forget(request)
            outputs.append(self._make_output(request))
        return outputs

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[Request], SampledTokens]:
        """``(requests, samples)``: one token per row, on the device. If the batched sampler raises, each row is
        sampled alone (waiting for it), and the requests whose row still fails are finished with their error
        and left out."""

        def sample(rows, batch):
            return self.sampler.sample(
                rows,
                [r.params for r in batch],
                [r.output_token_ids for r in batch],
                [r.generator for r in batch],
                [r.grammar for r in batch],
            )

        try:
            return requests, sample(logits, requests)
        except Exception:
            logger.exception("batched sampling failed; sampling the %d rows one by one", len(requests))
        kept, token_ids, logprobs = [], [], []
        for i, request in enumerate(requests):
            try:
                one = sample(logits[i : i + 1], [request]).result()
            except Exception as exc:
                logger.exception("request %s failed while sampling its token", request.request_id)
                request.error = exc
                self._finish_with_output(request, RequestStatus.FINISHED_ABORTED)
                continue
            kept.append(request)
            token_ids.append(one.token_ids[0])
            logprobs.append(one.logprobs[0])
        return kept, SampledTokens.from_host(SamplerOutput(token_ids, logprobs), logits.device)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Offline batch generation: run every prompt to completion; outputs are ordered like
        ``prompts`` and hold the whole completion (``new_*`` fields = everything). A prompt whose
        params have ``n`` > 1 gives its ``n`` outputs in a row, by ``index``.

        It drives ``step()`` itself: outputs of requests added separately with ``add_request`` are
        consumed and dropped meanwhile, so don't mix the two styles on one engine."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise InvalidRequestError("prompts must be a list of prompts (strings or token id lists)", "prompt")
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.sampling_defaults.params()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} sampling params for {len(prompts)} prompts", "params")
        batch_id = next(self._request_counter)
        ids = [f"generate-{batch_id}-{i}" for i in range(len(prompts))]
        added = []
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                self.add_request(request_id, prompt, p)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.abort(request_id)
            self.step()  # deliver (and drop) the abort outputs
            raise
        # One key per sequence: (request id, index), in the order of the results.
        keys = [(request_id, index) for request_id, p in zip(ids, params) for index in range(p.n)]
        wants_logprobs = {request_id: p.logprobs is not None for request_id, p in zip(ids, params)}
        logprobs: dict[tuple[str, int], list[dict]] = {key: [] for key in keys}
        final: dict[tuple[str, int], RequestOutput] = {}
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(keys), desc="generate", unit="seq")
        while len(final) < len(keys):
            if not self.has_unfinished():
                raise RuntimeError("engine stopped before every request finished")
            for out in self.step():
                key = (out.request_id, out.index)
                if key not in logprobs:
                    continue
                logprobs[key].extend(out.new_logprobs or [])
                if out.finished:
                    final[key] = out
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        results = []
        for key in keys:
            out = final[key]
            if out.error is not None:
                raise out.error
            out.new_token_ids = list(out.token_ids)
            out.new_text = out.text
            out.new_logprobs = logprobs[key] if wants_logprobs[key[0]] else None
            results.append(out)
        return results

    def stats(self) -> EngineStats:
        # Under tensor parallelism the replica is as full as its tightest rank.
        cache = min(self.executor.cache_stats(), key=lambda s: s.free_pages + s.reclaimable_pages)
        return EngineStats(
            num_total_pages=cache.total_pages,
            num_free_pages=cache.free_pages,
            num_mapped_pages=cache.mapped_pages,
            num_reclaimable_pages=cache.reclaimable_pages,
            tokens_per_page=cache.tokens_per_page,
            page_size_bytes=cache.page_size_bytes,
            pages_per_token_block=cache.num_buffers,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=cache.usage,
            num_preemptions=self.scheduler.num_preemptions,
            num_preempted_pages=self.scheduler.num_preempted_pages,
            num_free_slots=cache.num_free_slots,
            max_batch_size=cache.max_batch_size,
            prefix_cache_queries=self.scheduler.prefix_queries,
            prefix_cache_hits=self.scheduler.prefix_hits,
            num_cached_blocks=self.kv_cache.num_cached_blocks,
            prefix_summary=self._summarize_prefixes(),
        )

    def shutdown(self) -> None:
        """Abort everything and release the KV cache's memory, once the device is done with it."""
        for request_id in list(self.requests):
            self.abort(request_id)
        self._pending_outputs = []
        self._in_flight = None
        self.executor.close()  # the cache waits for the device before it lets go of the memory

    # ---- internals --------------------------------------------------------------------------------------------

    def _prefix_seed(self) -> int | None:
        """What every cached block's key chains from: all that changes the KV besides the tokens."""
        if not self.config.cache.enable_prefix_caching:
            return None
        model = self.config.model
        return prefix_seed(model.model, model.seed, self.runner.dtype, model.tensor_parallel_size)

    def _summarize_prefixes(self) -> PrefixSummary | None:
        """The cache's prefix summary, retaken at most every ``PREFIX_SUMMARY_PERIOD_S`` while requests run, and
        whenever none does (the last stats before the engine idles must show what it cached)."""
        seed = self.scheduler.prefix_seed
        if seed is None:
            return None
        now_s = time.monotonic()
        if (
            self._prefix_summary is None
            or now_s - self._prefix_summary[0] >= PREFIX_SUMMARY_PERIOD_S
            or not self.has_unfinished()
        ):
            max_blocks = self.kv_cache.config.max_seq_len // self.kv_cache.block_tokens
            self._prefix_summary = (now_s, summarize_prefixes(self.kv_cache, seed, max_blocks))
        return self._prefix_summary[1]

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", "prompt")
            return list(self.tokenizer.encode(prompt))
        try:
            token_ids = [int(t) for t in prompt]
            valid = all(t == orig and not isinstance(orig, bool) for t, orig in zip(token_ids, prompt))
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")
        if not token_ids:
            raise InvalidRequestError("prompt must not be empty", "prompt")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size}), got {bad[:5]}", "prompt")
        return token_ids

    def compile_grammars(self, params: SamplingParams) -> list[Grammar | None]:
        """One grammar per sequence of a request (``params.n``), None each without a JSON schema. Safe to call from
        another thread than the step loop's (``EngineCore`` compiles in one, so that a schema that takes long to
        compile holds up only its own request).

        Raises:
            InvalidRequestError: the schema does not compile.
        """
        if params.json_schema is None:
            return [None] * params.n
        with self._grammar_lock:
            if self._grammar_compiler is None:  # scanning the vocabulary takes a moment: only once one is needed
                self._grammar_compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
            compiler = self._grammar_compiler
        return compiler.grammars(params.json_schema, params.n)

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The request's output budget; raises ``PromptTooLongError`` if it could never run."""
        if params.max_tokens is None:  # "the rest of the context", as far as the pool can ever hold
            limit = self.max_request_tokens
            max_tokens = limit - num_prompt_tokens
            if max_tokens < 1:
                raise PromptTooLongError(
                    f"this model's maximum context length is {limit} tokens; the prompt has {num_prompt_tokens}",
                    "prompt",
                )
        else:
            limit = self.max_model_len
            max_tokens = params.max_tokens
            if num_prompt_tokens + max_tokens > limit:
                param = "prompt" if num_prompt_tokens >= limit else "max_tokens"
                raise PromptTooLongError(
                    f"this model's maximum context length is {limit} tokens, but {num_prompt_tokens + max_tokens} "
                    f"were requested ({num_prompt_tokens} in the prompt, {max_tokens} for the completion)",
                    param,
                )
        if num_prompt_tokens + max_tokens > self.max_request_tokens:
            pages = self.kv_cache.pages_for_tokens(num_prompt_tokens + max_tokens)
            raise PromptTooLongError(
                f"the request needs {pages} KV pages for {num_prompt_tokens} prompt + {max_tokens} output tokens "
                f"but the whole pool holds {self.kv_cache.stats().total_pages} "
                f"({self.max_request_tokens} tokens)",
                "prompt",
            )
        return max_tokens

    def _make_output(self, request: Request) -> RequestOutput:
        finished = request.is_finished
        new_token_ids = request.output_token_ids[request.num_reported_tokens :]
        request.num_reported_tokens = request.num_output_tokens
        new_logprobs = None
        if request.params.logprobs is not None:
            new_logprobs, request.pending_logprobs = request.pending_logprobs, []
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            new_token_ids=new_token_ids,
            new_text=request.detokenizer.take_new_text(finished=finished),
            text=request.detokenizer.emitted_text if finished else "",
            token_ids=list(request.output_token_ids) if finished else [],
            finished=finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            arrival_time=request.arrival_time,
            first_token_time=request.first_token_time,
            new_logprobs=new_logprobs,
            error=request.error,
            index=request.index,
        )

    def _finish_with_output(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self._forget(request)
        self._pending_outputs.append(self._make_output(request))

    def _forget(self, request: Request) -> None:
        """Drop a finished sequence's request id once every sequence of that request is finished."""
        sequences = self.requests.get(request.request_id)
        if sequences is not None and all(r.is_finished for r in sequences):
            del self.requests[request.request_id]
