"""One process's engine: continuous batching over a paged KV cache.

Each `step()` runs one batch: new (or preempted) requests' prompts if any can be admitted,
otherwise one decode token for every running request. Requests join and leave between steps.
When the cache cannot take every running request's next token, the most recently admitted
request is preempted: its blocks are freed and it is recomputed later from its tokens, so a
full cache slows requests down but never fails or corrupts them.

The services build on this: the prefill service runs only `_prefill`, the decode service
only `_decode` with part of the attention elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from common.block_manager import BlockManager
from common.config import EngineConfig
from common.errors import InvalidRequestError
from common.kv_pool import KVLayout, KVPool
from common.kv_transfer import gather_kv
from common.model.loader import load_model
from common.model.model import CausalLM
from common.model.spec import ModelSpec
from common.offload import ExecutorClient, RemoteGroup, SplitAttention
from common.paged_attention import PagedAttention, decode_metadata, prefill_metadata
from common.request import FinishReason, PromptLogprobs, Request, Status
from common.sampling import SamplingParams, processes_logits, sample
from kernels.backend import default_backend, get_backend

PROMPT_LOGPROBS_CHUNK = 256  # prompt positions whose full-vocabulary logits are held at once


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: FinishReason | None  # set on the request's last step
    index: int = 0  # the token's position in the request's output (0: the first token)
    prompt_logprobs: PromptLogprobs | None = None  # with the first token, if the request asked for them


class Engine:
    def __init__(self, model: CausalLM, config: EngineConfig) -> None:
        self.model = model
        self.spec = model.spec
        self.config = config
        self.device = torch.device(config.device)
        spec = self.spec
        self.layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, config.block_size, spec.dtype)
        num_blocks = self.layout.blocks_for_budget(config.kv_cache_bytes)
        self.blocks = BlockManager(num_blocks, config.block_size)
        self.pool = KVPool(self.layout, num_blocks, self.device)
        backend = get_backend(config.attention_backend) if config.attention_backend else default_backend(self.device)
        self.attention = PagedAttention(backend, self.pool, model.scale)
        model.use_linear_kernel(backend.linear)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator().manual_seed(0)
        self.num_preemptions = 0
        self.num_handed_back = 0  # offloaded requests an executor gave back (out of blocks), recomputed here
        self.taken_back: list[str] = []  # those of the last step, queued here (a service may resume them elsewhere)
        self.executors: dict[str, ExecutorClient] = {}  # offloading targets, by name
        self.last_split: SplitAttention | None = None  # the last decode step's, if it offloaded rows
        self._generated = 0

    @classmethod
    def from_folder(cls, path: str | Path, config: EngineConfig | None = None) -> Engine:
        config = config or EngineConfig()
        spec = ModelSpec.from_folder(path, dtype=config.dtype)
        return cls(load_model(spec, config.device), config)

    # ---- requests --------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise `InvalidRequestError` naming the field if this request can never be served."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt", "is empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < self.spec.vocab_size]
        if bad:
            raise InvalidRequestError(
                "prompt", f"token ids {bad[:5]} are outside the vocabulary [0, {self.spec.vocab_size})"
            )
        vocab = self.spec.vocab_size
        for field, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", [t for t, _ in params.logit_bias]),
            ("bad_words", [t for word in params.bad_words for t in word]),
        ):
            bad = [t for t in ids if t >= vocab]  # the processors index the logits with them
            if bad:
                raise InvalidRequestError(field, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        limit = self.spec.max_model_len
        if len(prompt_token_ids) >= limit:
            raise InvalidRequestError("prompt", f"has {len(prompt_token_ids)} tokens; the model's context is {limit}")
        total = len(prompt_token_ids) + params.max_new_tokens
        if total > limit:
            raise InvalidRequestError(
                "max_new_tokens",
                f"{len(prompt_token_ids)} prompt tokens + {params.max_new_tokens} new tokens "
                f"exceed the context of {limit}",
            )
        if total > self.capacity_tokens:
            raise InvalidRequestError(
                "max_new_tokens",
                f"{total} tokens exceed the KV cache's capacity of {self.capacity_tokens} tokens",
            )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, earlier: Sequence[int] = ()
    ) -> Request:
        """Queue a request to prefill; `earlier`: the tokens it generated before its KV was lost
        elsewhere (a resumed request), whose KV is recomputed with the prompt's."""
        request = self._register(request_id, prompt_token_ids, params, list(earlier))
        self.waiting.append(request)
        return request

    def add_running(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        executor: str | None = None,
        earlier: Sequence[int] = (),
    ) -> Request:
        """Admit a request prefilled elsewhere, with its next token already sampled there (its
        first, or, resumed, the one after `earlier`).

        The KV of its prompt and `earlier` must already sit in this engine's blocks, allocated
        under `request_id` (the decode service allocates, receives the KV, then calls this), or,
        for an offloaded request, on `executor`, one of `self.executors`.
        """
        if request_id in self.requests:  # before the block check: an id in use holds blocks of its own
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        cached = len(prompt_token_ids) + len(earlier)
        if executor is not None:
            if executor not in self.executors:
                raise ValueError(f"{request_id}: unknown executor {executor!r}")
        elif self.blocks.num_tokens(request_id) != cached:
            raise ValueError(f"{request_id}: blocks hold {self.blocks.num_tokens(request_id)} tokens, not {cached}")
        request = self._register(request_id, prompt_token_ids, params, [*earlier, first_token_id])
        request.status = Status.RUNNING
        request.executor = executor
        self.running.append(request)
        return request

    def add_waiting(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        params: SamplingParams,
        earlier: Sequence[int] = (),
    ) -> Request:
        """Queue a request prefilled elsewhere whose KV is not here: its tokens are recomputed when
        blocks allow, exactly as a preempted request is (FIFO behind those)."""
        request = self._register(request_id, prompt_token_ids, params, [*earlier, first_token_id])
        self.waiting.append(request)
        return request

    def withdraw(self, request_id: str) -> Request:
        """Take a waiting request that holds no blocks out of this engine (to be resumed elsewhere)."""
        request = self.requests[request_id]
        if request.status is not Status.WAITING or request_id in self.blocks:
            raise ValueError(f"{request_id}: only a waiting request that holds no blocks can be withdrawn")
        self.waiting.remove(request)
        del self.requests[request_id]
        return request

    def _register(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, output_token_ids: list[int]
    ) -> Request:
        """A validated request under a new id, with what it has generated so far (sampled elsewhere)."""
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self.validate(prompt_token_ids, params)
        params = dataclasses.replace(params, eos_token_ids=self.spec.eos_token_ids)
        request = Request(request_id, list(prompt_token_ids), params, output_token_ids=output_token_ids)
        self.requests[request_id] = request
        return request

    def detach(self, request_id: str) -> Request:
        """Take a running request out of this engine (its KV has been copied elsewhere) and free its blocks."""
        request = self.requests.pop(request_id)
        self.running.remove(request)
        self.blocks.free(request_id)
        return request

    def offload(self, request_id: str, executor: str) -> None:
        """Move a running request's KV to an attention executor; its decode attention runs there from now on."""
        request = self.requests[request_id]
        if request.status is not Status.RUNNING or request.executor is not None:
            raise ValueError(f"{request_id}: only a running local request can be offloaded")
        cached = request.num_tokens - 1  # the last token's KV is written by the next step
        slots = torch.tensor(self.blocks.slots(request_id, 0, cached), dtype=torch.int64, device=self.device)
        max_tokens = len(request.prompt_token_ids) + request.params.max_new_tokens
        self.executors[executor].admit(request_id, gather_kv(self.pool, slots), max_tokens)
        self.blocks.free(request_id)
        request.executor = executor

    def drop_executor(self, executor: str) -> list[Request]:
        """End every request whose KV lives on `executor` (it failed) and forget the executor."""
        lost = [r for r in self.running if r.executor == executor]
        for request in lost:
            self._finish(request, FinishReason.ERROR)
        self.executors.pop(executor, None)
        return lost

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is unknown or done."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.status is Status.WAITING:
            self.waiting.remove(request)
        self._finish(request, FinishReason.ABORT)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop --------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        self.last_split = None
        self.taken_back = []
        batch = self._admit()
        if batch:
            return self._run(batch, self._prefill(batch))
        if not self.running:
            return []
        self._reserve_next_slots()
        if not self.running:  # each local request was preempted: the free blocks are held by KV on its way in
            return []
        batch = list(self.running)
        logits = self._decode(batch)
        return self._run(batch, logits, skip=self._take_back(batch))

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams) -> list[Request]:
        """Run prompts to completion; a convenience for scripts and tests."""
        requests = []
        for prompt in prompts:
            self._generated += 1
            requests.append(self.add_request(f"generate-{self._generated}", prompt, params))
        while self.has_unfinished():
            self.step()
        return requests

    def _admit(self) -> list[Request]:
        """Move waiting requests into a prefill batch, FIFO, while seats, tokens and blocks allow."""
        batch: list[Request] = []
        tokens = 0
        while self.waiting and len(self.running) + len(batch) < self.config.max_num_seqs:
            request = self.waiting[0]
            n = request.num_tokens
            if batch and tokens + n > self.config.max_num_batched_tokens:
                break
            # Keep one block in reserve per admitted request so that admission does not force
            # a preemption on the very next decode step.
            reserve = len(self.running) + len(batch)
            if self.blocks.blocks_for(n) + reserve > self.blocks.num_free_blocks:
                break
            self.blocks.allocate(request.request_id, n)
            self.waiting.popleft()
            batch.append(request)
            tokens += n
        return batch

    def _reserve_next_slots(self) -> None:
        """Give every running request a slot for its next token, preempting the newest if needed."""
        index = 0
        while index < len(self.running):
            request = self.running[index]
            if request.executor is not None:  # its executor grows it (or hands it back: `_take_back`)
                index += 1
                continue
            if self.blocks.can_append(request.request_id, request.num_tokens):
                self.blocks.append(request.request_id, request.num_tokens)
                index += 1
                continue
            # the most recently admitted local request (at worst `request` itself)
            victim = next(r for r in reversed(self.running) if r.executor is None)
            self.running.remove(victim)
            self.blocks.free(victim.request_id)
            victim.status = Status.WAITING
            self.waiting.appendleft(victim)
            self.num_preemptions += 1

    def _prefill(self, batch: list[Request]) -> torch.Tensor:
        owners = [r.request_id for r in batch]
        lengths = [r.num_tokens for r in batch]
        meta = prefill_metadata(self.blocks, owners, lengths, self.device)
        tokens = torch.tensor([t for r in batch for t in r.all_token_ids], device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        hidden = self.model(tokens, positions, self.attention.prefill_fn(meta))
        starts = meta.cu_seqlens[:-1].tolist()
        last = meta.cu_seqlens[1:].long() - 1
        for request, start in zip(batch, starts, strict=True):
            request.status = Status.RUNNING
            # once, at the first prefill: a recomputed request has an output, and has sent them already
            if request.params.prompt_logprobs is not None and not request.output_token_ids:
                request.prompt_logprobs = self._prompt_logprobs(request, hidden[start : start + request.num_tokens])
        self.running.extend(batch)
        return self.model.logits(hidden[last])

    def _prompt_logprobs(self, request: Request, hidden: torch.Tensor) -> PromptLogprobs:
        """Each prompt token's logprob given the tokens before it, from the prefill's own hidden states
        (position j predicts token j + 1), and the `prompt_logprobs` most likely tokens there. Logits
        are made PROMPT_LOGPROBS_CHUNK positions at a time, so a long prompt never holds [n, vocab]."""
        k = request.params.prompt_logprobs or 0
        targets = torch.tensor(request.prompt_token_ids[1:], device=hidden.device)
        chosen: list[float] = []
        top: list[list[tuple[int, float]]] = []
        for lo in range(0, len(targets), PROMPT_LOGPROBS_CHUNK):
            hi = min(lo + PROMPT_LOGPROBS_CHUNK, len(targets))
            logp = torch.log_softmax(self.model.logits(hidden[lo:hi]), dim=-1)
            chosen += logp.gather(1, targets[lo:hi, None]).squeeze(1).tolist()
            if k:
                values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
                top += [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
            else:
                top += [[] for _ in range(hi - lo)]
        return PromptLogprobs(chosen, top)

    def _decode(self, batch: list[Request]) -> torch.Tensor:
        tokens = torch.tensor([r.output_token_ids[-1] for r in batch], device=self.device)
        positions = torch.tensor([r.num_tokens - 1 for r in batch], device=self.device)
        local = [i for i, r in enumerate(batch) if r.executor is None]
        if len(local) == len(batch):
            meta = decode_metadata(
                self.blocks, [r.request_id for r in batch], [r.num_tokens for r in batch], self.device
            )
            return self.model.logits(self.model(tokens, positions, self.attention.decode_fn(meta)))
        # Metadata and the executors' slot reservations happen once here, not per layer.
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(batch):
            if r.executor is not None:
                groups.setdefault(r.executor, []).append(i)
        remote = []
        for name, rows in groups.items():
            client = self.executors[name]
            client.begin_step([batch[i].request_id for i in rows], [batch[i].num_tokens for i in rows])
            remote.append(RemoteGroup(client, torch.tensor(rows, device=self.device)))
        local_meta = None
        if local:
            local_reqs = [batch[i] for i in local]
            local_meta = decode_metadata(
                self.blocks, [r.request_id for r in local_reqs], [r.num_tokens for r in local_reqs], self.device
            )
        split = SplitAttention(self.attention, torch.tensor(local, device=self.device), local_meta, remote)
        self.last_split = split
        return self.model.logits(self.model(tokens, positions, split))

    def _take_back(self, batch: list[Request]) -> set[int]:
        """Rows an executor did not serve this step (it was out of blocks and evicted them): their
        outputs are meaningless, so their tokens are not taken; the requests come back here and
        are recomputed from their tokens when blocks allow, as a preempted request is. Rows of
        requests aborted meanwhile are skipped the same way and go with their abort."""
        split = self.last_split
        if split is None:
            return set()
        rows = {int(group.rows[i]) for group in split.remote for i in group.client.refused()}
        for row in sorted(rows, reverse=True):
            request = batch[row]
            if request.status is not Status.RUNNING or request.request_id not in self.requests:
                continue
            self.running.remove(request)
            request.executor = None
            request.status = Status.WAITING
            self.waiting.appendleft(request)
            self.num_preemptions += 1
            self.num_handed_back += 1
            self.taken_back.append(request.request_id)
        return rows

    def _run(self, batch: list[Request], logits: torch.Tensor, skip: set[int] | None = None) -> list[StepOutput]:
        params = [r.params for r in batch]
        # histories only where a logits processor reads them: a batch without one builds nothing
        histories = [(r.prompt_token_ids, r.output_token_ids) for r in batch] if processes_logits(params) else None
        result = sample(logits.cpu(), params, [len(r.output_token_ids) for r in batch], self.generator, histories)
        outputs = []
        for i, request in enumerate(batch):
            if skip and i in skip:
                continue
            token = result.token_ids[i]
            request.output_token_ids.append(token)
            logprob = result.logprobs[i] if result.logprobs is not None else None
            top = result.top_logprobs[i] if result.top_logprobs is not None else None
            if request.params.logprobs is not None and logprob is not None and top is not None:
                request.output_logprobs.append(logprob)
                request.top_logprobs.append(top)
            reason = self._finish_reason(request, token)
            if reason is not None:
                self._finish(request, reason)
            index = len(request.output_token_ids) - 1
            prompt_logprobs = request.prompt_logprobs if index == 0 else None
            outputs.append(StepOutput(request.request_id, token, logprob, top, reason, index, prompt_logprobs))
        return outputs

    def _finish_reason(self, request: Request, token: int) -> FinishReason | None:
        if request.params.stops_at(token):
            return FinishReason.STOP
        if len(request.output_token_ids) >= request.params.max_new_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.spec.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request in self.running:
            self.running.remove(request)
        if request.executor is not None:
            self.executors[request.executor].release(request.request_id)
        else:
            self.blocks.free(request.request_id)
        request.status = Status.FINISHED
        request.finish_reason = reason
        self.requests.pop(request.request_id, None)

    def check_integrity(self) -> None:
        """The block manager's own invariants, and exactly the running requests hold blocks."""
        self.blocks.check_integrity()
        holders = set(self.blocks.owners())
        running = {r.request_id for r in self.running if r.executor is None}
        if holders != running:
            raise RuntimeError(
                f"blocks held by {sorted(map(str, holders - running))}, running without: {sorted(running - holders)}"
            )
