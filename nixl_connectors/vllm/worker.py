"""Worker side of UcxConnector: one transport `Agent` per worker rank.

Producer: exposes blocks named by the scheduler right after the forward pass that computed
them (`wait_for_save`), and reports requests whose leases ended as `finished_sending`.
Consumer: starts pulls, renews and dismisses remote leases, and reports settled pulls as
`finished_recving`; failed pulls also go to `failed_recving` and their blocks to
`get_block_ids_with_load_errors()`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..handoff.lifecycle import ConsumerBook, LeaseEnd, PendingPull, ProducerBook
from . import layout
from .compat import compat_from_vllm, layout_signature
from .config import UcxConnectorConfig
from .metadata import UcxConnectorMetadata, UcxHandshakeMetadata, UcxWorkerMetadata
from .params import RemotePrefill
from .stats import UcxConnectorStats

logger = logging.getLogger(__name__)


class UcxWorker:
    def __init__(self, vllm_config: Any, engine_id: str, cfg: UcxConnectorConfig,
                 tp_rank: int, num_blocks: int | None = None):
        self.vllm_config = vllm_config
        self.engine_id = engine_id
        self.cfg = cfg
        self.tp_rank = tp_rank
        self.num_blocks = num_blocks
        self.agent: Any = None
        self.producer: ProducerBook | None = None
        self.consumer: ConsumerBook | None = None
        self.segments: list[layout.Segment] = []
        self.regions: dict[int, Any] = {}
        self._scratch: np.ndarray | None = None
        self._scratch_region: Any = None
        self._is_cuda = False
        self._stats = UcxConnectorStats()
        self._leases_this_step: dict[str, dict[int, str]] = {}
        self._freeable: set[str] = set()
        self._finished_seen: set[str] = set()
        self._recv_blocks: dict[str, list[int]] = {}
        self._load_errors: set[int] = set()
        self._failed_recving: set[str] = set()
        self._done_recving: set[str] = set()

    # -- start-up ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        from transport import Agent, AgentConfig

        first = next(iter(kv_caches.values()))
        first = first[0] if isinstance(first, (list, tuple)) else first
        self._is_cuda = first.device.type == "cuda"
        if not self._is_cuda:
            from .cpu_amx import request_amx

            request_amx()  # vLLM's CPU AMX attention needs it before decode's first step (cpu_amx.py)
        num_blocks = self.num_blocks
        if num_blocks is None:
            raise ValueError("number of KV blocks unknown")
        self.segments = layout.segments_for(kv_caches, num_blocks)
        shapes = {n: tuple((t[0] if isinstance(t, (list, tuple)) else t).shape)
                  for n, t in kv_caches.items()}
        bdim = layout.find_block_dim(next(iter(shapes.values())), num_blocks)
        compat = compat_from_vllm(
            self.vllm_config, kv_layout=f"{first.device.type}:{layout_signature(shapes, bdim)}",
            tp_rank=self.tp_rank, bytes_per_block=layout.bytes_per_block(self.segments))
        port = self.cfg.base_port + self.tp_rank if self.cfg.base_port else 0
        acfg = AgentConfig(listen=f"{self.cfg.listen_host}:{port}",
                           auth_key=self.cfg.auth_key.encode() if self.cfg.auth_key else None,
                           timeout_s=self.cfg.timeout_s, compat=compat,
                           transports=self.cfg.transports)
        self.agent = Agent(f"{self.engine_id}-tp{self.tp_rank}", acfg)
        for key, tensor in layout.distinct_storages(kv_caches).items():
            self.regions[key] = self.agent.register(tensor, whole_storage=True)
        self.producer = ProducerBook(self.agent, self.cfg.lease_ttl_s)
        self.consumer = ConsumerBook(self.agent, self.cfg.lease_ttl_s, self.cfg.pull_workers)
        logger.info("UcxConnector worker %s rank %d: agent at %s, %d layers, %d segments, "
                    "%d bytes per block", self.engine_id, self.tp_rank, self.address,
                    len(kv_caches), len(self.segments), layout.bytes_per_block(self.segments))

    @property
    def address(self) -> str:
        host, _, port = self.agent.address.rpartition(":")
        return f"{self.cfg.host}:{port}"

    def handshake_metadata(self) -> UcxHandshakeMetadata:
        return UcxHandshakeMetadata(self.tp_rank, self.address)

    # -- per step ---------------------------------------------------------------------------
    def start_load_kv(self, meta: UcxConnectorMetadata) -> None:
        for rid in meta.to_release:
            self.producer.abort(rid)
        for rid in meta.to_cancel:
            self.consumer.cancel(rid)
        for remote in meta.to_renew:
            self._renew(remote)
        for remote in meta.to_dismiss:
            self._dismiss(remote)
        for rid, spec in meta.to_recv.items():
            self._start_pull(rid, spec)

    def _my(self, remote: RemotePrefill) -> tuple[str, str]:
        return remote.agents[self.tp_rank], remote.lease_ids[self.tp_rank]

    def _renew(self, remote: RemotePrefill) -> None:
        addr, lease = self._my(remote)
        fut = self.consumer.renew(addr, lease)
        fut.add_done_callback(lambda f: f.exception() and logger.warning(
            "renew of lease %s at %s failed: %s", lease, addr, f.exception()))

    def _dismiss(self, remote: RemotePrefill) -> None:
        """Tell the owner we will not read (it ends the lease at once)."""
        addr, _ = self._my(remote)
        payload = remote.request_id.encode()

        def _go() -> None:
            self.agent.notify(self.consumer.peer(addr), payload)
        fut = self.consumer.run_async(_go)
        fut.add_done_callback(lambda f: f.exception() and logger.info(
            "dismiss of %s at %s failed (its lease will expire): %s", remote.request_id, addr,
            f.exception()))

    def _start_pull(self, rid: str, spec: Any) -> None:
        addr, lease = self._my(spec.remote)
        self._recv_blocks[rid] = list(spec.local_block_ids)
        try:
            scratch = self._scratch_for(spec.num_scratch)
            local = layout.build_local_descs(self.segments, self.regions, spec.local_block_ids,
                                             scratch, spec.num_scratch)
        except Exception as e:  # noqa: BLE001 - bad plan is a load failure, not a crash
            logger.error("request %s: cannot plan the pull: %s", rid, e)
            self._on_failed(rid)
            return
        self.consumer.start(PendingPull(rid, addr, lease, local, spec.local_block_ids),
                            notify=spec.remote.request_id.encode())

    def _scratch_for(self, num_blocks: int) -> Any:
        if num_blocks == 0:
            return None
        need = num_blocks * layout.bytes_per_block(self.segments)
        if self._scratch is None or self._scratch.nbytes < need:
            if self._is_cuda:
                import torch
                self._scratch = torch.empty(need, dtype=torch.uint8, device="cuda")
            else:
                self._scratch = np.empty(need, dtype=np.uint8)
            self._scratch_region = self.agent.register(self._scratch)
        return self._scratch_region

    def wait_for_save(self, meta: UcxConnectorMetadata | None) -> None:
        """After the forward pass: expose the blocks that it just completed."""
        if meta is None or not meta.to_expose:
            return
        if self._is_cuda:
            import torch
            torch.cuda.current_stream().synchronize()
        for rid, block_ids in meta.to_expose.items():
            if not block_ids:
                self.producer.hold_nothing(rid)
                continue
            try:
                descs = layout.build_descs(self.segments, self.regions, block_ids)
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
        for p in res.done:
            self._recv_blocks.pop(p.request_id, None)
            self._done_recving.add(p.request_id)
            self._stats.add("reads")
            self._stats.add("bytes_read", p.nbytes)
            self._stats.add("transfer_seconds", p.seconds)
        for p in res.failed:
            self._on_failed(p.request_id)
        recving, failed = self._done_recving, self._failed_recving
        self._done_recving, self._failed_recving = set(), set()
        return sending, recving | failed, failed

    def _on_failed(self, rid: str) -> None:
        self._load_errors.update(self._recv_blocks.pop(rid, ()))
        self._failed_recving.add(rid)
        self._stats.add("read_failures")

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
