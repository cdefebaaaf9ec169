"""Scheduler side of UcxConnector (runs in vLLM's engine-core process, no transport here).

Producer (prefill, `do_remote_decode`): when a request's last prompt chunk is scheduled, the
worker is told to expose its blocks right after that forward pass; the worker reports the
lease ids (one per TP rank) in its worker metadata of the same step, and `request_finished`'s
kv_transfer_params are completed with them. Blocks stay allocated (`delay_free`) until every
rank reports the request in `finished_sending` (read, aborted or expired: see lifecycle.py).

Consumer (decode, `do_remote_prefill`): the whole prompt is loadable asynchronously; once
blocks are allocated the worker pulls; while the request still waits for blocks the scheduler
asks the worker to renew the remote leases. An abort before allocation dismisses the remote
lease; an abort during the pull cancels it and keeps the blocks until the pull settles.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from .config import UcxConnectorConfig
from .metadata import RecvSpec, UcxConnectorMetadata, UcxHandshakeMetadata, UcxWorkerMetadata
from .params import Key, ParamsError, RemotePrefill, wants_remote_decode, wants_remote_prefill

if TYPE_CHECKING:
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

TRANSFER_MODE = "ucx_pull"


class UcxScheduler:
    def __init__(self, vllm_config: Any, engine_id: str, cfg: UcxConnectorConfig,
                 clock: Callable[[], float] = time.monotonic):
        self.engine_id = engine_id
        self.cfg = cfg
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._clock = clock
        self.agents: list[str] = []
        # producer
        self._producing: dict[str, "Request"] = {}
        self._expose_next: dict[str, list[int]] = {}
        self._exposing: set[str] = set()
        self._exposed_blocks: dict[str, list[int]] = {}
        self._leases: dict[str, dict[int, str]] = {}
        self._params_awaiting_leases: dict[str, dict[str, Any]] = {}
        self._release_next: list[str] = []
        # consumer
        self._waiting: dict[str, tuple[RemotePrefill, float]] = {}
        self._recv_next: dict[str, RecvSpec] = {}
        self._receiving: set[str] = set()
        self._renew_next: list[RemotePrefill] = []
        self._dismiss_next: list[RemotePrefill] = []
        self._cancel_next: list[str] = []

    # -- start-up ---------------------------------------------------------------------------
    def set_handshake(self, metadata: dict[int, Any]) -> None:
        """Addresses of every worker rank's agent, from vLLM's handshake gathering."""
        ranks = sorted(metadata)
        addrs = []
        for r in ranks:
            m = metadata[r]
            if not isinstance(m, UcxHandshakeMetadata):
                raise TypeError(f"unexpected handshake metadata from rank {r}: {type(m)}")
            addrs.append(m.address)
        if ranks != list(range(len(ranks))):
            raise ValueError(f"handshake metadata from ranks {ranks}, expected 0..n-1")
        self.agents = addrs
        logger.info("UcxConnector %s agents: %s", self.engine_id, addrs)

    # -- consumer ---------------------------------------------------------------------------
    def _remote(self, request: "Request") -> RemotePrefill | None:
        try:
            return RemotePrefill.parse(request.kv_transfer_params)
        except ParamsError as e:
            logger.warning("request %s: %s; computing it locally", request.request_id, e)
            return None

    def on_new_request(self, request: "Request") -> None:
        if wants_remote_decode(request.kv_transfer_params):
            self._producing[request.request_id] = request
        if wants_remote_prefill(request.kv_transfer_params):
            remote = self._remote(request)
            if remote is not None:
                self._waiting[request.request_id] = (
                    remote, self._clock() + self.cfg.renew_interval_s)

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if not wants_remote_prefill(params):
            return 0, False
        remote = self._remote(request)
        if remote is None:
            return 0, False
        if remote.tp_size != self.tp_size:
            logger.warning("request %s: prefill tp_size %d != decode tp_size %d; computing "
                           "locally", request.request_id, remote.tp_size, self.tp_size)
            return 0, False
        num_prompt = len(request.prompt_token_ids or ())
        count = num_prompt - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not wants_remote_prefill(params):
            return
        rid = request.request_id
        params[Key.DO_REMOTE_PREFILL.value] = False  # one transfer per request
        waiting = self._waiting.pop(rid, None)
        remote = waiting[0] if waiting else self._remote(request)
        if remote is None:
            return
        if num_external_tokens <= 0:
            # Fully cached locally (or not pulled): let prefill free its blocks now.
            self._dismiss_next.append(remote)
            return
        groups = blocks.get_block_ids()
        local_ids = list(groups[0])
        num_cached = sum(1 for b in blocks.blocks[0] if b.block_hash is not None
                         and not getattr(b, "is_null", False))
        num_remote = len(remote.block_ids)
        num_cached = min(num_cached, num_remote)
        self._recv_next[rid] = RecvSpec(remote, local_ids[num_cached:num_remote], num_cached)
        self._receiving.add(rid)

    # -- producer ---------------------------------------------------------------------------
    def _note_prefill_chunks(self, scheduler_output: Any) -> None:
        """Ask the worker to expose blocks of requests whose prompt completes in this step."""
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            req = self._producing.get(rid)
            if req is None or rid in self._exposing:
                continue
            if not wants_remote_decode(req.kv_transfer_params):
                continue
            if req.num_computed_tokens + n < req.num_prompt_tokens:
                continue
            self._exposing.add(rid)
            self._expose_next[rid] = []  # filled by the connector (needs the cache manager)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        rid = request.request_id
        params = request.kv_transfer_params
        self._producing.pop(rid, None)
        # consumer side
        if wants_remote_prefill(params):  # never allocated: abort before scheduling
            waiting = self._waiting.pop(rid, None)
            if waiting is not None:
                self._dismiss_next.append(waiting[0])
            params[Key.DO_REMOTE_PREFILL.value] = False
            return False, None
        self._waiting.pop(rid, None)
        if rid in self._recv_next:  # aborted before the worker saw it: never start
            self._recv_next.pop(rid)
            self._receiving.discard(rid)
            return False, None
        if rid in self._receiving:  # pull in flight: keep blocks until it settles
            self._cancel_next.append(rid)
            return True, None
        # producer side
        if not wants_remote_decode(params) or rid not in self._exposing:
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            self._release_next.append(rid)
            return True, None
        out: dict[str, Any] = {
            Key.DO_REMOTE_PREFILL.value: True,
            Key.DO_REMOTE_DECODE.value: False,
            Key.REMOTE_ENGINE_ID.value: self.engine_id,
            Key.REMOTE_REQUEST_ID.value: rid,
            Key.REMOTE_BLOCK_IDS.value: self._exposed_blocks.get(rid, list(block_ids)),
            Key.REMOTE_HOST.value: self.agents[0].rpartition(":")[0] if self.agents else None,
            Key.REMOTE_PORT.value: int(self.agents[0].rpartition(":")[2]) if self.agents else None,
            Key.REMOTE_NUM_TOKENS.value: request.num_computed_tokens,
            Key.TP_SIZE.value: self.tp_size,
            Key.REMOTE_AGENTS.value: list(self.agents),
            Key.REMOTE_BLOCK_SIZE.value: self.block_size,
            Key.TRANSFER_MODE.value: TRANSFER_MODE,
        }
        self._params_awaiting_leases[rid] = out
        self._fill_leases(rid)
        return True, out

    def _fill_leases(self, rid: str) -> None:
        out = self._params_awaiting_leases.get(rid)
        by_rank = self._leases.get(rid, {})
        if out is None or len(by_rank) < self.tp_size:
            return
        out[Key.REMOTE_LEASE_IDS.value] = [by_rank[r] for r in range(self.tp_size)]
        del self._params_awaiting_leases[rid]

    # -- per step ---------------------------------------------------------------------------
    def build_connector_meta(self, scheduler_output: Any,
                             block_ids_of: Callable[[str], list[int]]) -> UcxConnectorMetadata:
        self._note_prefill_chunks(scheduler_output)
        for rid in self._expose_next:
            ids = list(block_ids_of(rid))
            req = self._producing.get(rid)
            if req is not None:  # only the blocks that hold prompt tokens
                ids = ids[:-(-req.num_prompt_tokens // self.block_size)]
            self._expose_next[rid] = ids
            self._exposed_blocks[rid] = ids
        now = self._clock()
        for rid, (remote, due) in list(self._waiting.items()):
            if now >= due:
                self._renew_next.append(remote)
                self._waiting[rid] = (remote, now + self.cfg.renew_interval_s)
        meta = UcxConnectorMetadata(
            to_expose=self._expose_next, to_release=self._release_next, to_recv=self._recv_next,
            to_renew=self._renew_next, to_dismiss=self._dismiss_next, to_cancel=self._cancel_next)
        self._expose_next, self._release_next, self._recv_next = {}, [], {}
        self._renew_next, self._dismiss_next, self._cancel_next = [], [], []
        return meta

    def update_connector_output(self, output: Any) -> None:
        meta = getattr(output, "kv_connector_worker_meta", None)
        if isinstance(meta, UcxWorkerMetadata):
            for rid, by_rank in meta.leases.items():
                self._leases.setdefault(rid, {}).update(by_rank)
                self._fill_leases(rid)
        for rid in output.finished_sending or ():
            self._exposing.discard(rid)
            self._exposed_blocks.pop(rid, None)
            self._leases.pop(rid, None)
            out = self._params_awaiting_leases.pop(rid, None)
            if out is not None:
                logger.warning("request %s ended before its lease ids arrived", rid)
        for rid in output.finished_recving or ():
            self._receiving.discard(rid)

    # -- introspection (tests, logs) ---------------------------------------------------------
    @property
    def state(self) -> dict[str, int]:
        return {"exposing": len(self._exposing), "waiting": len(self._waiting),
                "receiving": len(self._receiving)}
