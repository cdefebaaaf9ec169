"""Worker side of UcxConnector: one transport `Agent` per worker rank.

Producer: exposes the blocks named by the scheduler (per KV-cache group, one lease per request)
right after the forward pass that computed them (`wait_for_save`), and reports requests whose
leases ended as `finished_sending`.
Consumer: plans each pull (pullplan.py: which prefill ranks hold its heads, which byte ranges it
lacks), starts the reads, renews and dismisses remote leases, and reports settled pulls as
`finished_recving`; failed pulls (and unusable hand-offs) also go to `failed_recving`, and, for
single-group models, their blocks to `get_block_ids_with_load_errors()`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..handoff.lifecycle import ConsumerBook, LeaseEnd, PendingPull, ProducerBook, read_done_payload
from ..kit import make_agent
from . import layout
from .compat import compat_from_vllm
from .config import UcxConnectorConfig
from .metadata import RecvSpec, UcxConnectorMetadata, UcxHandshakeMetadata, UcxWorkerMetadata
from .params import RemotePrefill
from .pullplan import PlanError, RemoteSide, local_descs, owned_prefill_ranks, plan_reads, readers_of
from .stats import UcxConnectorStats

logger = logging.getLogger(__name__)

_PART = "\x1f"  # pull part key: "<request id>\x1f<prefill rank>"


class PullPhase(str, Enum):
    PULLING = "pulling"
    DONE = "done"
    FAILED = "failed"


@dataclass
class PullRecord:
    """One request's pull on this rank: one part per prefill rank it reads from."""

    request_id: str
    load_block_ids: tuple[int, ...]
    parts: set[str] = field(default_factory=set)
    phase: PullPhase = PullPhase.PULLING


class UcxWorker:
    def __init__(self, vllm_config: Any, engine_id: str, cfg: UcxConnectorConfig,
                 tp_rank: int, kv_cache_config: Any = None):
        self.vllm_config = vllm_config
        self.engine_id = engine_id
        self.cfg = cfg
        self.tp_rank = tp_rank
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.kv_cache_config = kv_cache_config
        self.num_blocks = getattr(kv_cache_config, "num_blocks", None)
        self.agent: Any = None
        self.producer: ProducerBook | None = None
        self.consumer: ConsumerBook | None = None
        self.segments: list[layout.Segment] = []
        self.regions: dict[int, Any] = {}
        self.total_heads = 0
        self.num_groups = 1
        self._is_cuda = False
        self._stats = UcxConnectorStats()
        self._leases_this_step: dict[str, dict[int, str]] = {}
        self._freeable: set[str] = set()
        self._finished_seen: set[str] = set()
        self._pulls: dict[str, PullRecord] = {}
        self._load_errors: set[int] = set()
        self._settled: dict[str, PullPhase] = {}
        self._scratch: list[tuple[Any, Any]] = []  # (buffer, region), largest last; kept alive

    # -- start-up ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        first = next(iter(kv_caches.values()))
        first = first[0] if isinstance(first, (list, tuple)) else first
        self._is_cuda = first.device.type == "cuda"
        if not self._is_cuda:
            from .cpu_amx import request_amx

            request_amx()  # vLLM's CPU AMX attention needs it before decode's first step (cpu_amx.py)
        if self.num_blocks is None:
            raise ValueError("number of KV blocks unknown")
        mc, pc = self.vllm_config.model_config, self.vllm_config.parallel_config
        groups = getattr(self.kv_cache_config, "kv_cache_groups", None) or ()
        group_of = {name: g for g, grp in enumerate(groups) for name in grp.layer_names}
        self.num_groups = max(1, len(groups))
        self.total_heads = int(mc.get_total_num_kv_heads())
        # vLLM's CPU attention views a [B, H, N, 2*D] layer as [B, H, 2N, D] and chunks it: per
        # head, the block's keys, then its values (two parts); its cache write keeps the keys
        # transposed ([D, N] elements: D rows of N tokens) and the values token-major ([N, D]).
        self.segments = layout.segments_for(
            kv_caches, self.num_blocks, local_heads=int(mc.get_num_kv_heads(pc)),
            block_size=int(self.vllm_config.cache_config.block_size), group_of=group_of,
            head_parts=1 if self._is_cuda else 2,
            part_rows=() if self._is_cuda else (int(mc.get_head_size()), 1))
        compat = compat_from_vllm(self.vllm_config, device=first.device.type, segments=self.segments,
                                  kv_cache_config=self.kv_cache_config)
        self.agent = make_agent(f"{self.engine_id}-tp{self.tp_rank}", self.cfg.agent, self.tp_rank, compat)
        for key, tensor in layout.distinct_storages(kv_caches).items():
            self.regions[key] = self.agent.register(tensor, whole_storage=True)
        self.producer = ProducerBook(self.agent, self.cfg.lease_ttl_s)
        self.consumer = ConsumerBook(self.agent, self.cfg.lease_ttl_s, self.cfg.pull.pull_workers)
        logger.info("UcxConnector worker %s rank %d: agent at %s, %d layers, %d groups, %d segments "
                    "(%s), %d bytes per block", self.engine_id, self.tp_rank, self.address, len(kv_caches),
                    self.num_groups, len(self.segments), self.segments[0].kind.value if self.segments else "-",
                    layout.bytes_per_block(self.segments))

    @property
    def address(self) -> str:
        return self.cfg.agent.advertised(self.agent.address)

    def handshake_metadata(self) -> UcxHandshakeMetadata:
        return UcxHandshakeMetadata(self.tp_rank, self.address)

    # -- per step ---------------------------------------------------------------------------
    def start_load_kv(self, meta: UcxConnectorMetadata) -> None:
        for rid in meta.to_release:
            self.producer.abort(rid)
        for rid in meta.to_cancel:
            for key in self._pulls[rid].parts if rid in self._pulls else ():
                self.consumer.cancel(key)
        for remote in meta.to_renew:
            self._renew(remote)
        for remote in meta.to_dismiss:
            self._dismiss(remote)
        sync = []
        for rid, spec in meta.to_recv.items():
            if spec.sync:
                sync.append((rid, spec))
            else:
                self._start_pull(rid, spec)
        for rid, spec in sync:   # before this step's forward reads them
            self._pull_now(rid, spec)

    def _owned(self, remote: RemotePrefill) -> list[int]:
        return owned_prefill_ranks(remote.tp_size, self.tp_size, self.tp_rank)

    def _renew(self, remote: RemotePrefill) -> None:
        for p in self._owned(remote):
            addr, lease = remote.agents[p], remote.lease_ids[p]
            fut = self.consumer.renew(addr, lease)
            fut.add_done_callback(lambda f, lease=lease, addr=addr: f.exception() and logger.warning(
                "renew of lease %s at %s failed: %s", lease, addr, f.exception()))

    def _notify(self, addr: str, payload: bytes, why: str) -> None:
        def _go() -> None:
            self.agent.notify(self.consumer.peer(addr), payload)
        fut = self.consumer.run_async(_go)
        fut.add_done_callback(lambda f: f.exception() and logger.info(
            "%s notification to %s failed (the lease will expire): %s", why, addr, f.exception()))

    def _dismiss(self, remote: RemotePrefill) -> None:
        """Tell the owners we will not read (they end the leases at once)."""
        for p in self._owned(remote):
            self._notify(remote.agents[p], remote.request_id.encode(), "dismiss")

    def _plan(self, spec: RecvSpec):
        if spec.error is not None or spec.remote is None or spec.target is None:
            raise PlanError(spec.error or "no remote prefill")
        remote = spec.remote
        side = RemoteSide(remote.tp_size, remote.block_size or self.segments[0].paged.block_size,
                          tuple(len(g) for g in remote.group_block_ids))
        return plan_reads(self.segments, spec.target, side, total_heads=self.total_heads,
                          local_tp=self.tp_size, rank=self.tp_rank)

    def _parts(self, rid: str, spec: RecvSpec) -> list | None:
        """(planned read, read-done payload, local descriptors or None) per prefill rank; None
        when the pull cannot be planned (then the owners are told we will not read)."""
        try:
            reads = self._plan(spec)
            readers = readers_of(self.total_heads, spec.remote.tp_size, self.tp_size)
            parts = []
            for r in reads:
                payload = read_done_payload(spec.remote.request_id, readers[r.prefill_rank].index(self.tp_rank),
                                            len(readers[r.prefill_rank]))
                parts.append((r, payload, local_descs(r, self.regions, self._scratch_region(r.scratch_bytes))
                              if r.nbytes else None))
            return parts
        except Exception as e:  # noqa: BLE001 - any planning error fails this request only
            logger.error("request %s: cannot pull: %s", rid, e)
            if spec.remote is not None:
                self._dismiss(spec.remote)
            return None

    def _pull_now(self, rid: str, spec: RecvSpec) -> None:
        """A synchronous load: every part read and waited for here, on the engine thread, before
        the forward pass. A failure marks the request's blocks as load errors (vLLM recomputes or
        fails the request, by its kv_load_failure_policy); vLLM is not told about it otherwise."""
        parts = self._parts(rid, spec)
        ok = parts is not None
        t0 = time.monotonic()
        nbytes = 0
        for r, payload, descs in parts or ():
            addr, lease = spec.remote.agents[r.prefill_rank], spec.remote.lease_ids[r.prefill_rank]
            if descs is None:
                self._notify(addr, payload, "read-done")
                continue
            if not ok:   # an earlier part failed: do not read the rest, let the owners release
                self._notify(addr, payload, "read-done")
                continue
            try:
                peer = self.consumer.peer(addr)
                self.agent.read(peer, descs, lease, notify=payload, ranges=r.ranges).wait(self.cfg.agent.timeout_s)
                nbytes += descs.nbytes
            except Exception as e:  # noqa: BLE001 - any transfer failure is a load error
                logger.warning("request %s: synchronous pull from %s failed: %s: %s", rid, addr,
                               type(e).__name__, e)
                self.consumer.forget_peer(addr)
                ok = False
        if ok:
            self._stats.add("reads")
            self._stats.add("bytes_read", nbytes)
            self._stats.add("transfer_seconds", time.monotonic() - t0)
        else:
            self._stats.add("read_failures")
            self._load_errors.update(spec.load_block_ids)

    def _start_pull(self, rid: str, spec: RecvSpec) -> None:
        rec = PullRecord(rid, spec.load_block_ids)
        self._pulls[rid] = rec
        parts = self._parts(rid, spec)
        if parts is None:
            self._mark(rec, failed=True)
            return
        for r, payload, descs in parts:
            addr, lease = spec.remote.agents[r.prefill_rank], spec.remote.lease_ids[r.prefill_rank]
            if descs is None:  # nothing of this rank is missing: just let its owner release
                self._notify(addr, payload, "read-done")
                continue
            key = f"{rid}{_PART}{r.prefill_rank}"
            rec.parts.add(key)
            self.consumer.start(PendingPull(key, addr, lease, descs, spec.load_block_ids, ranges=r.ranges),
                                notify=payload)
        if not rec.parts:
            self._mark(rec, failed=False)

    def _scratch_region(self, nbytes: int) -> Any:
        """A registered scratch buffer of at least `nbytes` (bytes that have no place here land in
        it; concurrent pulls may share it). Older, smaller buffers stay registered: a pull still
        in flight may write them."""
        if nbytes == 0:
            return None
        if not self._scratch or self._scratch[-1][1].nbytes < nbytes:
            if self._is_cuda:
                import torch
                buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            else:
                import numpy as np
                buf = np.empty(nbytes, dtype=np.uint8)
            self._scratch.append((buf, self.agent.register(buf)))
        return self._scratch[-1][1]

    def _mark(self, rec: PullRecord, failed: bool) -> None:
        """A part of `rec` settled (or none was started); report it once no part is in flight."""
        if failed and rec.phase is not PullPhase.FAILED:
            rec.phase = PullPhase.FAILED
            self._stats.add("read_failures")
            if self.num_groups == 1:  # vLLM maps block-level errors for one group only
                self._load_errors.update(rec.load_block_ids)
        if not rec.parts:
            if rec.phase is PullPhase.PULLING:
                rec.phase = PullPhase.DONE
            self._settled[rec.request_id] = rec.phase
            self._pulls.pop(rec.request_id, None)

    def wait_for_save(self, meta: UcxConnectorMetadata | None) -> None:
        """After the forward pass: expose the blocks that it just completed."""
        if meta is None or not meta.to_expose:
            return
        if self._is_cuda:
            from transport.cuda_sync import wait_for_engine_writes

            wait_for_engine_writes()
        for rid, groups in meta.to_expose.items():
            try:
                parts = [layout.build_descs([s for s in self.segments if s.group == g], self.regions, ids)
                         for g, ids in enumerate(groups)]
                from transport import Descs

                descs = Descs.concat(parts)
                if descs.nbytes == 0:
                    self.producer.hold_nothing(rid)
                    continue
                held = self.producer.hold(rid, descs)
            except Exception as e:  # noqa: BLE001
                logger.error("request %s: expose failed: %s", rid, e)
                self.producer.hold_nothing(rid)
                continue
            self._stats.add("leases_exposed")
            self._leases_this_step.setdefault(rid, {})[self.tp_rank] = held.lease_id

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str], set[str]]:
        """(finished_sending, finished_recving, failed_recving) since the last call."""
        for fr in self.producer.poll():
            self._freeable.add(fr.request_id)
            self._stats.add({LeaseEnd.READ: "leases_read", LeaseEnd.EXPIRED: "leases_expired",
                             LeaseEnd.ABORTED: "leases_aborted",
                             LeaseEnd.FAILED: "leases_aborted"}[fr.reason])
        # vLLM may only be told about requests it has already reported finished; remember
        # just the finished ids that concern a lease (held or freed), nothing else.
        self._finished_seen |= finished_req_ids & (self.producer.held_ids | self._freeable)
        sending = self._freeable & self._finished_seen
        self._freeable -= sending
        self._finished_seen -= sending
        res = self.consumer.poll()
        for p, ok in [(p, True) for p in res.done] + [(p, False) for p in res.failed]:
            rec = self._pulls.get(p.request_id.rpartition(_PART)[0])
            if rec is None:
                continue
            rec.parts.discard(p.request_id)
            if ok:
                self._stats.add("reads")
                self._stats.add("bytes_read", p.nbytes)
                self._stats.add("transfer_seconds", p.seconds)
            self._mark(rec, failed=not ok)
        recving, self._settled = self._settled, {}
        return sending, set(recving), {r for r, ph in recving.items() if ph is PullPhase.FAILED}

    def load_errors(self) -> set[int]:
        out, self._load_errors = self._load_errors, set()
        return out

    def worker_meta(self) -> UcxWorkerMetadata | None:
        if not self._leases_this_step:
            return None
        out, self._leases_this_step = UcxWorkerMetadata(self._leases_this_step), {}
        return out

    def stats(self) -> UcxConnectorStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, UcxConnectorStats()
        return out

    def shutdown(self) -> None:
        if self.consumer is not None:
            self.consumer.close()
        if self.producer is not None:
            self.producer.close()
        if self.agent is not None:
            self.agent.close()
            self.agent = None
