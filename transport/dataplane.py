"""Per-agent data-path resources: staging pools and CUDA side streams, the UCX chunk streams of
a session, and the CUDA IPC offer (owner) / fused-kernel copy (initiator)."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import copy_plan, cuda_ipc, gpu_copy, gpu_direct, gpu_memcpy, gpu_remote, gpu_runs, gpu_upload, trace
from . import handshake as hs
from .config import AgentConfig
from .dataeps import abort_when_idle
from .datapath import CancelToken, StagingPool
from .descs import Descs, common_value
from .errors import BadMessage, PeerLost, TransferError, TransferTimeout
from .plan import StreamPlan
from .session import Session
from .stats import AgentStats

log = logging.getLogger(__name__)


MAX_UNCOALESCED = 1 << 20


@dataclass(frozen=True)
class IpcPlan:
    """A checked IPC read of one lease: the owner's run table over this process's mappings."""

    bases: np.ndarray        # int64 mapped addresses, one per region slot
    slot: np.ndarray
    off: np.ndarray
    ln: np.ndarray
    maps: tuple              # (region uid, mapping serial, device) of the mappings it was checked against
    remote: Any = None       # gpu_remote.RemoteTable: its runs for the paired kernel (device half kept)
    ulen: int = 0            # the length of every run when they are all equal, else 0
    span: int | None = None  # the address of its first byte when it is one contiguous range of one mapping
    _seen: list = field(default_factory=lambda: [-1], compare=False, repr=False)   # [epoch of ipc_maps checked]

    def __post_init__(self) -> None:
        uids = [uid for uid, _, _ in self.maps]
        get = operator.itemgetter(*uids) if len(uids) > 1 else None
        object.__setattr__(self, "_get", get)

    def pairs_with(self, local: Descs) -> bool:
        """Do the local runs pair one to one with the owner's (the paired kernel's case)? O(1)
        when both sides' runs have one length."""
        if self.ulen and local.uniform_length:
            return self.ulen == local.uniform_length and len(self.ln) == len(local) <= gpu_runs.MAX_PAIRS
        return gpu_runs.paired(self.ln, local.length)

    def live(self, s: Session) -> tuple | None:
        """The session's mappings it was checked against, to hold while a kernel runs over them;
        None when one was dropped or replaced since (region gone, owner lost or restarted). A plan
        holds no mapping itself: a plan kept somewhere (a grant of a session not yet collected)
        must not keep a dead owner's memory mapped. While the session's table has not changed
        since the last full check (its epoch), one lookup of every uid is all it takes."""
        maps = s.ipc_maps
        try:
            out = self._get(maps) if self._get is not None else (maps[self.maps[0][0]],)
        except (KeyError, IndexError):
            return None
        epoch = getattr(maps, "epoch", None)
        if epoch is None or epoch != self._seen[0]:
            for m, (_, serial, _) in zip(out, self.maps):
                if m.serial != serial:
                    return None
            self._seen[0] = -1 if epoch is None else epoch
        return out


def _ipc_label(uid: int) -> bytes:
    return b"ipc|" + uid.to_bytes(8, "little")


class DataPlane:
    def __init__(self, name: str, config: AgentConfig, executor: Executor, stats: AgentStats):
        self.name = name
        self.config = config
        self.executor = executor
        self.stats = stats
        self._pools: dict[str, StagingPool] = {}
        self._streams: dict[int, Any] = {}
        self._ipc_reason: str | None | bool = False   # False: not probed yet
        self._export_reason: str | None | bool = False
        self.exporter = cuda_ipc.Exporter()
        self._warned_staged: set[str] = set()
        self._parked: dict[asyncio.Task, Any] = {}  # endpoints left open for their blocked sends

    # -- resources ----------------------------------------------------------------------------
    def pool(self, device: torch.device) -> StagingPool:
        key = str(device)
        if key not in self._pools:
            self._pools[key] = StagingPool(device, self.config.chunk_bytes, self.config.staging_slots)
        return self._pools[key]

    def stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device.index not in self._streams:
            self._streams[device.index] = torch.cuda.Stream(device=device)
        return self._streams[device.index]

    def quarantined_slots(self) -> int:
        return sum(p.retired_total for p in self._pools.values())

    def parked_endpoints(self) -> int:
        """UCX endpoints of failed transfers kept open until their blocked sends end."""
        return len(self._parked)

    # -- UCX ----------------------------------------------------------------------------------
    async def run_stream(self, kind, s: Session, descs: Descs, tag: int, deadline: float,
                         tok: CancelToken) -> None:
        """Move one transfer's chunks. Every failure reaches the caller as a TransferError (an
        unexpected exception is logged and wrapped), so its clean-up always runs."""
        try:
            await self._run_stream(kind, s, descs, tag, deadline, tok)
        except (TransferError, asyncio.CancelledError):
            raise
        except Exception as e:
            log.exception("%s: UCX data path to %s failed", self.name, s.name)
            raise TransferError(f"UCX data path failed: {type(e).__name__}: {str(e)[:300]}") from None

    async def _run_stream(self, kind, s: Session, descs: Descs, tag: int, deadline: float,
                          tok: CancelToken) -> None:
        if s.ucx is None or s.lost is not None:
            raise PeerLost(f"no UCX link to {s.name}")
        device = descs.regions[0].device if descs.regions else torch.device("cpu")
        if device.type == "cuda":
            self._warn_staged_cuda(s)
        chunk = min(self.config.chunk_bytes, s.peer.chunk)
        plan = StreamPlan(descs, chunk)   # before borrowing: a plan that fails leaks no endpoint
        eps = s.ucx.endpoints
        loop = asyncio.get_running_loop()
        try:
            ep = await asyncio.wait_for(eps.borrow(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise TransferTimeout(f"no UCX endpoint to {s.name} before the transfer's deadline") from None
        io = kind(ep, plan, self.pool(device), self.executor, tag, self.stream(device),
                  sends_may_block=eps.error_handling)
        try:
            await io.run(descs, deadline, tok)
        finally:
            if io.endpoint_busy is not None:
                abort_when_idle(ep, io.endpoint_busy, self._parked)
            elif not io.aborted and s.lost is None:
                await eps.give_back(ep)

    def _warn_staged_cuda(self, s: Session) -> None:
        """UCX between two processes moves CUDA memory through host memory unless it can use
        cuda_ipc (same host) or GPUDirect RDMA (other hosts): say so, once per peer."""
        if s.name in self._warned_staged:
            return
        self._warned_staged.add(s.name)
        why = ("same host: the CUDA IPC path is off or failed, and UCX between processes serves CUDA "
               "memory by eager copies through host memory (measured 0.7 GB/s on one GPU)"
               if s.peer.same_host else
               "other host: without GPUDirect RDMA (a UCX built with verbs) UCX stages CUDA memory "
               "through host memory")
        log.warning("%s: CUDA memory to/from %s goes over UCX (%s)", self.name, s.name, why)
        self.stats.fallbacks[f"ucx-cuda: {why}"] += 1

    # -- CUDA IPC -------------------------------------------------------------------------------
    def ipc_unavailable(self) -> str | None:
        """Why this agent cannot copy over CUDA IPC as an initiator (None: it can)."""
        if self._ipc_reason is False:
            self._ipc_reason = cuda_ipc.unavailable()
        return self._ipc_reason  # type: ignore[return-value]

    def export_unavailable(self) -> str | None:
        """Why this agent cannot share its CUDA regions as an owner (None: it can)."""
        if self._export_reason is False:
            self._export_reason = cuda_ipc.export_unavailable()
        return self._export_reason  # type: ignore[return-value]

    @staticmethod
    def ipc_table(descs: Descs) -> tuple[tuple, bytes]:
        """The regions a transfer touches and its encoded (slot, offset, length) run table
        (pure; an owner caches it per lease). Runs are sent as exposed, not coalesced, so a
        reader whose blocks have the same sizes pairs them one to one (gpu_runs.py)."""
        d = descs if len(descs) <= MAX_UNCOALESCED else descs.coalesced()
        if len(d.regions) == 1:
            return (d.regions[0],), copy_plan.encode_runs(np.zeros(len(d), np.int64), d.offset, d.length)
        used = np.unique(d.region_idx)
        slot_of = np.full(len(d.regions), -1, dtype=np.int64)
        slot_of[used] = np.arange(len(used))
        return tuple(d.regions[i] for i in used.tolist()), copy_plan.encode_runs(slot_of[d.region_idx], d.offset,
                                                                                  d.length)

    def ipc_offer(self, s: Session, regions: tuple, table: bytes) -> list:
        """Owner: the offer of a transfer's regions; handles only for those this session has
        not seen yet (encrypted under the session secret when a key is set)."""
        offer = []
        for r in regions:
            blob = None
            if r.uid not in s.ipc_sent:
                blob = hs.keystream_xor(s.secret, _ipc_label(r.uid), self.exporter.blob(r))
                s.ipc_sent.add(r.uid)
            offer.append([r.uid, blob, r.nbytes])
        return offer

    def ipc_copy(self, s: Session, local: Descs, offer: Any, table: Any, nbytes: int, write: bool):
        """Initiator: map what is new, check the owner's table against the mappings, and launch
        the one kernel. Returns (event, keep-alive, plan). Raises BadMessage for a lying owner."""
        plan = self.ipc_prepare(s, local.regions[0].device.index, offer, table, nbytes)
        ev, keep = self.ipc_launch(plan, local, write, plan.live(s))
        return ev, keep, plan

    def ipc_prepare(self, s: Session, device: int | None, offer: Any, table: Any, nbytes: int,
                    may_open: bool = True) -> IpcPlan:
        """Map the regions of an offer that are new (on CUDA device `device`; with `may_open`
        False every region must be mapped already) and check the owner's run table against the mappings (the
        checked plan may be kept: a lease grant re-reads it)."""
        if not isinstance(offer, list) or not isinstance(table, bytes) or not offer or len(offer) > 4096:
            raise BadMessage("malformed IPC offer")
        bases, sizes, maps = [], [], []
        for item in offer:
            if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], int)
                    or not isinstance(item[2], int) or not isinstance(item[1], (bytes, type(None)))):
                raise BadMessage("malformed IPC offer entry")
            uid, blob, size = item
            m = s.ipc_maps.get(uid)
            if m is None:
                if blob is None or not may_open:
                    raise BadMessage(f"owner referred to region {uid} without sharing it")
                try:
                    m = cuda_ipc.open_blob(hs.keystream_xor(s.secret, _ipc_label(uid), blob), device)
                except ValueError as e:
                    raise BadMessage(str(e)) from None
                s.ipc_maps[uid] = m
            if m.nbytes != size:
                raise BadMessage("IPC region size changed")
            bases.append(m.ptr)
            sizes.append(m.nbytes)
            maps.append((uid, m.serial, m.device))
        trace.mark("ipc", "mapped")
        try:
            slot, off, ln = copy_plan.decode_runs(table)
        except ValueError as e:
            raise BadMessage(f"malformed IPC table: {e}") from None
        sizes_a = np.asarray(sizes, dtype=np.int64)
        if len(bases) == 1:
            bad = off.min() < 0 or ln.min() <= 0 or bool(slot.any()) or bool((off > sizes_a[0] - ln).any())
        else:
            bad = (slot.min() < 0 or slot.max() >= len(bases) or off.min() < 0 or ln.min() <= 0
                   or bool((off > sizes_a[slot] - ln).any()))
        if bad:
            raise BadMessage("the owner's IPC table points outside the shared regions")
        if int(ln.sum()) != nbytes:
            raise BadMessage("the owner's IPC table does not add up to the transfer size")
        trace.mark("ipc", "checked")
        bases_a = np.asarray(bases, dtype=np.int64)
        remote = gpu_remote.RemoteTable(gpu_runs.RunSide(bases_a, slot if len(bases) > 1 else None, off), ln)
        span = None
        if len(bases) == 1 and (len(off) == 1 or np.array_equal(off[1:], off[:-1] + ln[:-1])):
            span = int(bases_a[0]) + int(off[0])
        return IpcPlan(bases_a, slot, off, ln, tuple(maps), remote, common_value(ln), span)

    def ipc_preload(self, plan: IpcPlan) -> None:
        """Put a kept plan's half of the kernel's table on the device now (a lease grant just
        arrived: its first read then uploads only its own half). Only where the mappings say which
        device; a failure is left to the read (which uploads it itself)."""
        devs = {dev for _, _, dev in plan.maps}
        if len(devs) != 1 or None in devs or len(plan.ln) > gpu_runs.MAX_PAIRS:
            return
        device = torch.device("cuda", devs.pop())
        try:
            plan.remote.on(device, self.stream(device))
        except (RuntimeError, ValueError) as e:
            log.debug("%s: preloading an IPC table failed (%s); its read uploads it", self.name, e)

    def ipc_launch(self, plan: IpcPlan, local: Descs, write: bool, live: tuple | None, record: bool = True):
        """Enqueue the copy of a checked plan over the mappings `live` (`plan.live()`); returns
        (what to synchronize: the event recorded after it, or without `record` the side stream
        itself (a driver call less), then the keep-alive: the copy's buffers and those mappings,
        whose `synced()` (when it has one) is called once that synchronize returned)."""
        if live is None:
            raise PeerLost("a CUDA IPC mapping of this read was dropped (region gone or owner lost)")
        trace.mark("ipc", "start")
        device = local.regions[0].device
        stream = self.stream(device)
        ev, keep = self._ipc_launch(plan, local, write, device, stream, record)
        if isinstance(keep, gpu_upload.Held):
            keep.extra = (keep.extra, live)
        else:
            keep = (keep, live)
        return (ev if record else stream), keep

    def _ipc_launch(self, plan: IpcPlan, local: Descs, write: bool, device: Any, stream: Any, record: bool):
        if plan.span is not None and gpu_memcpy.disabled is None and local.span is not None:
            mine = local.regions[0].ptr + local.span   # (one range each side; the sizes are equal: checked)
            src, dst = (mine, plan.span) if write else (plan.span, mine)
            trace.mark("ipc", "memcpy call")
            try:
                out = gpu_memcpy.copy(dst, src, local.nbytes, device, stream, record)
            except RuntimeError as e:   # nothing was enqueued: the kernel copies instead, now and from now on
                if gpu_memcpy.disable(str(e)[:200]):
                    self.stats.fallbacks[f"ipc-memcpy: {str(e)[:200]}"] += 1
            else:
                trace.mark("ipc", "memcpy")
                return out
        if plan.pairs_with(local):
            if self.config.gpu_direct_tables and gpu_direct.usable(local, device.index):
                trace.mark("ipc", "sides")
                try:
                    out = gpu_direct.launch(plan.remote, local, device, stream, write, record)
                except Exception as e:   # (raised before anything was enqueued) tables filled from now on
                    if gpu_direct.disable(f"{type(e).__name__}: {str(e)[:200]}"):
                        self.stats.fallbacks[f"gpu-direct: {type(e).__name__}: {str(e)[:200]}"] += 1
                else:
                    trace.mark("ipc", "launched")
                    return out
            lside = gpu_runs.RunSide(local.bases, local.region_idx if len(local.regions) > 1 else None, local.offset,
                                     local.offset_low_bits, local.base_low_bits)
            trace.mark("ipc", "sides")
            out = gpu_runs.launch(plan.remote, lside, device, stream, write, record)
            trace.mark("ipc", "launched")
            return out
        bases, slot, off, ln = plan.bases, plan.slot, plan.off, plan.ln
        remote = copy_plan.run_addresses(bases, slot, off)
        ld = local.coalesced()
        laddr = copy_plan.run_addresses(ld.bases, ld.region_idx, ld.offset)
        if write:
            s_, d_, n_ = copy_plan.pair_streams(laddr, ld.length, remote, ln)
        else:
            s_, d_, n_ = copy_plan.pair_streams(remote, ln, laddr, ld.length)
        trace.mark("ipc", "paired")
        ev, keep = gpu_copy.launch(s_, d_, n_, device, stream)
        trace.mark("ipc", "launched")
        return ev, keep

    def drop_mappings(self, s: Session, uid: int | None = None) -> None:
        """Forget the session's mappings (all, or one region's); the last reference closes each
        (a kernel in flight over one holds it until it ends). Without `uid` (the session ended)
        its lease grants go too: their plans name mappings that are gone."""
        if uid is None:
            s.ipc_maps.clear()
            s.grants.clear()
            s.words.clear()
        else:
            s.ipc_maps.pop(uid, None)
