"""Scheduler side of UcxConnector (runs in vLLM's engine-core process, no transport here).

One `ReqRecord` per request, with a `Phase`:

Producer (prefill, `do_remote_decode`): PRODUCING until the step that schedules the last prompt
chunk, then EXPOSING: the workers expose the prompt's blocks (per KV-cache group) right after
that forward pass and report their lease ids in the same step's worker metadata, which complete
the kv_transfer_params returned by `request_finished`. The blocks stay allocated (`delay_free`)
until every rank reports the request in `finished_sending` (read, aborted or expired).

Consumer (decode, `do_remote_prefill`): AWAITING (the prompt's tokens not cached locally are
loadable asynchronously; the remote leases are renewed while the request waits for blocks),
then PULLING once blocks are allocated: the workers pull only what is missing (pullplan.py).
Unusable kv_transfer_params fail that request into `kv_load_failure_policy`. An abort before
allocation dismisses the remote lease; an abort during the pull cancels it and keeps the blocks
until the pull settles.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .config import UcxConnectorConfig
from .metadata import RecvSpec, UcxConnectorMetadata, UcxHandshakeMetadata, UcxWorkerMetadata
from .params import TRANSFER_MODE, Key, ParamsError, RemotePrefill, wants_remote_decode, wants_remote_prefill
from .pullplan import LocalTarget

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

NULL = -1  # a block the engine does not keep (sliding-window groups)


class Phase(str, Enum):
    PRODUCING = "producing"   # prefill: prompt not complete yet
    EXPOSING = "exposing"     # prefill: exposed (or about to be); blocks held until every rank frees
    AWAITING = "awaiting"     # decode: waiting for blocks; remote leases renewed
    PULLING = "pulling"       # decode: the workers pull


@dataclass
class ReqRecord:
    request_id: str
    phase: Phase
    request: Any = None
    remote: RemotePrefill | None = None
    error: str | None = None                     # unusable kv_transfer_params (decode)
    renew_due: float = 0.0
    exposed: tuple[tuple[int, ...], ...] = ()    # per group (prefill)
    leases: dict[int, str] = field(default_factory=dict)
    params_out: dict[str, Any] | None = None     # awaiting lease ids
    sync: bool = False                           # decode: loaded synchronously (sync_load_max_tokens)
    local_hit: int = 0                           # decode: tokens vLLM found in its own prefix cache


@dataclass(frozen=True)
class GroupInfo:
    block_size: int
    sliding_window: int | None


def group_infos(vllm_config: Any, kv_cache_config: Any) -> tuple[GroupInfo, ...]:
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
    out = tuple(GroupInfo(int(g.kv_cache_spec.block_size), getattr(g.kv_cache_spec, "sliding_window", None))
                for g in groups)
    return out or (GroupInfo(int(vllm_config.cache_config.block_size), None),)


def exposed_blocks(groups: Sequence[GroupInfo], table: Sequence[Sequence[int]],
                   num_prompt_tokens: int) -> tuple[tuple[int, ...], ...]:
    """Per group, the tail of the prompt's blocks that prefill keeps after the request finishes:
    full-attention groups all of them; sliding-window groups those vLLM does not free at finish
    (blocks holding any of the last `window - 1` prompt tokens), never null blocks."""
    out = []
    for info, ids in zip(groups, table):
        n = -(-num_prompt_tokens // info.block_size)
        ids = list(ids[:n])
        first = 0
        if info.sliding_window:
            first = max(0, num_prompt_tokens - info.sliding_window + 1) // info.block_size
        nulls = [i for i, b in enumerate(ids) if b == NULL]
        if nulls:
            first = max(first, nulls[-1] + 1)
        out.append(tuple(ids[first:]))
    return tuple(out)


class UcxScheduler:
    def __init__(self, vllm_config: Any, engine_id: str, cfg: UcxConnectorConfig,
                 kv_cache_config: Any = None, clock: Callable[[], float] = time.monotonic):
        self.engine_id = engine_id
        self.cfg = cfg
        self.groups = group_infos(vllm_config, kv_cache_config)
        self.block_size = self.groups[0].block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._clock = clock
        self.agents: list[str] = []
        self._reqs: dict[str, ReqRecord] = {}
        self._next = UcxConnectorMetadata()

    # -- start-up ---------------------------------------------------------------------------
    def set_handshake(self, metadata: dict[int, Any]) -> None:
        """Addresses of every worker rank's agent, from vLLM's handshake gathering."""
        ranks = sorted(metadata)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"handshake metadata from ranks {ranks}, expected 0..n-1")
        addrs = []
        for r in ranks:
            m = metadata[r]
            if not isinstance(m, UcxHandshakeMetadata):
                raise TypeError(f"unexpected handshake metadata from rank {r}: {type(m)}")
            addrs.append(m.address)
        self.agents = addrs
        logger.info("UcxConnector %s agents: %s", self.engine_id, addrs)

    # -- consumer ---------------------------------------------------------------------------
    def _consumer_record(self, request: "Request") -> ReqRecord:
        rid = request.request_id
        rec = self._reqs.get(rid)
        if rec is not None and rec.phase in (Phase.AWAITING, Phase.PULLING):
            return rec
        try:
            rec = ReqRecord(rid, Phase.AWAITING, remote=RemotePrefill.parse(request.kv_transfer_params),
                            renew_due=self._clock() + self.cfg.renew_interval_s)
        except ParamsError as e:
            logger.warning("request %s: unusable kv_transfer_params: %s; it goes to the load-failure "
                           "policy", rid, e)
            rec = ReqRecord(rid, Phase.AWAITING, error=str(e))
        self._reqs[rid] = rec
        return rec

    def on_new_request(self, request: "Request") -> None:
        params = request.kv_transfer_params
        if wants_remote_decode(params):
            self._reqs[request.request_id] = ReqRecord(request.request_id, Phase.PRODUCING, request)
        elif wants_remote_prefill(params):
            self._consumer_record(request)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        if not wants_remote_prefill(request.kv_transfer_params):
            return 0, False
        rec = self._consumer_record(request)
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        if count <= 0:
            return 0, False
        rec.local_hit = num_computed_tokens
        rec.sync = (count <= self.cfg.pull.sync_load_max_tokens and len(self.groups) == 1
                    and rec.remote is not None and rec.error is None)
        if rec.sync:  # vLLM computes at least one token of a request it schedules: the last one
            return count - 1, False
        return count, True

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not wants_remote_prefill(params):
            return
        params[Key.DO_REMOTE_PREFILL.value] = False  # one transfer per request
        rid = request.request_id
        rec = self._consumer_record(request)
        if num_external_tokens <= 0:  # fully cached locally: let prefill free its blocks now
            self._reqs.pop(rid, None)
            if rec.remote is not None:
                self._next.to_dismiss.append(rec.remote)
            return
        tables, local_tokens = [], 0
        for info, group in zip(self.groups, blocks.blocks):
            ids = [NULL if getattr(b, "is_null", False) else b.block_id for b in group]
            hashed = [i for i, b in enumerate(group)
                      if b.block_hash is not None and not getattr(b, "is_null", False)]
            local_tokens = max(local_tokens, (hashed[-1] + 1) * info.block_size if hashed else 0)
            tables.append(tuple(ids))
        if rec.sync:  # a sync load's blocks are cached (hashed) at once: only the local hit is local
            local_tokens = rec.local_hit
        num_prompt = len(request.prompt_token_ids or ())
        target = LocalTarget(tuple(tables), local_tokens, local_tokens + num_external_tokens, num_prompt)
        load = tuple(b for b in tables[0][local_tokens // self.block_size:
                                          -(-target.token_end // self.block_size)] if b != NULL)
        self._next.to_recv[rid] = RecvSpec(rec.remote, target, load, rec.error, sync=rec.sync)
        rec.phase = Phase.PULLING
        if rec.sync:  # pulled and settled inside this step's forward: nothing left to track
            self._reqs.pop(rid, None)

    # -- producer ---------------------------------------------------------------------------
    def _note_prefill_chunks(self, scheduler_output: Any,
                             table_of: Callable[[str], Sequence[Sequence[int]]]) -> None:
        """Expose blocks of requests whose prompt completes in this step."""
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            rec = self._reqs.get(rid)
            if rec is None or rec.phase is not Phase.PRODUCING:
                continue
            req = rec.request
            if req.num_computed_tokens + n < req.num_prompt_tokens:
                continue
            rec.phase = Phase.EXPOSING
            rec.exposed = exposed_blocks(self.groups, table_of(rid), req.num_prompt_tokens)
            self._next.to_expose[rid] = rec.exposed

    def request_finished(self, request: "Request", block_ids: Sequence[Any]
                         ) -> tuple[bool, dict[str, Any] | None]:
        """`block_ids`: one list per KV-cache group (or a flat list for one group)."""
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        params = request.kv_transfer_params
        rec = self._reqs.get(rid)
        if wants_remote_prefill(params):  # never allocated: abort before scheduling
            params[Key.DO_REMOTE_PREFILL.value] = False
            self._reqs.pop(rid, None)
            if rec is not None and rec.remote is not None:
                self._next.to_dismiss.append(rec.remote)
            return False, None
        if rec is None:
            return False, None
        if rec.phase is Phase.PULLING:
            if rid in self._next.to_recv:  # aborted before the workers saw it: never start
                del self._next.to_recv[rid]
                self._reqs.pop(rid)
                return False, None
            self._next.to_cancel.append(rid)  # keep blocks until the pull settles
            return True, None
        if rec.phase is not Phase.EXPOSING:
            self._reqs.pop(rid)
            return False, None
        rec.request = None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            self._next.to_release.append(rid)
            return True, None
        groups = block_ids if block_ids and isinstance(block_ids[0], (list, tuple)) else (block_ids,)
        for g, (exp, kept) in enumerate(zip(rec.exposed, groups)):
            if not set(exp) <= set(kept):
                logger.error("request %s: vLLM freed blocks of group %d that were exposed (a sliding-"
                             "window prefill that generated more than one token); releasing", rid, g)
                self._next.to_release.append(rid)
                return True, None
        exposed = [list(g) for g in rec.exposed]
        out: dict[str, Any] = {
            Key.DO_REMOTE_PREFILL.value: True,
            Key.DO_REMOTE_DECODE.value: False,
            Key.REMOTE_ENGINE_ID.value: self.engine_id,
            Key.REMOTE_REQUEST_ID.value: rid,
            Key.REMOTE_BLOCK_IDS.value: exposed[0] if len(exposed) == 1 else exposed,
            Key.REMOTE_HOST.value: self.agents[0].rpartition(":")[0] if self.agents else None,
            Key.REMOTE_PORT.value: int(self.agents[0].rpartition(":")[2]) if self.agents else None,
            Key.REMOTE_NUM_TOKENS.value: request.num_computed_tokens,
            Key.TP_SIZE.value: self.tp_size,
            Key.REMOTE_AGENTS.value: list(self.agents),
            Key.REMOTE_BLOCK_SIZE.value: self.block_size,
            Key.TRANSFER_MODE.value: TRANSFER_MODE,
        }
        rec.params_out = out
        self._fill_leases(rec)
        return True, out

    def _fill_leases(self, rec: ReqRecord) -> None:
        if rec.params_out is None or len(rec.leases) < self.tp_size:
            return
        rec.params_out[Key.REMOTE_LEASE_IDS.value] = [rec.leases[r] for r in range(self.tp_size)]
        rec.params_out = None

    # -- per step ---------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any,
                             table_of: Callable[[str], Sequence[Sequence[int]]]) -> UcxConnectorMetadata:
        """`table_of(rid)`: the request's block ids per group, NULL (-1) for null blocks."""
        self._note_prefill_chunks(scheduler_output, table_of)
        now = self._clock()
        for rec in self._reqs.values():
            if rec.phase is Phase.AWAITING and rec.remote is not None and now >= rec.renew_due:
                self._next.to_renew.append(rec.remote)
                rec.renew_due = now + self.cfg.renew_interval_s
        meta, self._next = self._next, UcxConnectorMetadata()
        return meta

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, UcxWorkerMetadata):
            for rid, by_rank in meta.leases.items():
                rec = self._reqs.get(rid)
                if rec is not None:
                    rec.leases.update(by_rank)
                    self._fill_leases(rec)
        for rid in output.finished_sending or ():
            rec = self._reqs.pop(rid, None)
            if rec is not None and rec.params_out is not None:
                logger.warning("request %s ended before its lease ids arrived", rid)
        for rid in output.finished_recving or ():
            rec = self._reqs.get(rid)
            if rec is not None and rec.phase is Phase.PULLING:
                del self._reqs[rid]

    # -- introspection (tests, logs) ---------------------------------------------------------
    @property
    def state(self) -> dict[str, int]:
        out = {p.value: 0 for p in Phase}
        for rec in self._reqs.values():
            out[rec.phase.value] += 1
        return out
