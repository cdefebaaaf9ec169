"""The paired copy kernel in one process (gpu_runs.launch): the remote half kept on the device,
the local half read from the mapped pinned slot or from its device copy, reads and writes, one or
several regions per side, uniform and mixed run lengths; every byte checked, and the rest of both
pools untouched. (The two-process tests in test_gpu_transport.py run it over CUDA IPC.)"""
from __future__ import annotations

import numpy as np
import pytest


def _pools(torch, dev, k, blocks, bb, seed):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randint(0, 255, (blocks, bb), dtype=torch.uint8, device=dev, generator=g) for _ in range(k)]


@pytest.mark.parametrize("home", ["mapped", "device"])
@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("rk,lk", [(1, 1), (3, 1), (1, 4)])
@pytest.mark.parametrize("lengths", ["uniform", "mixed"])
def test_paired_kernel_moves_exactly_the_runs(monkeypatch, home, write, rk, lk, lengths):
    _check_paired(monkeypatch, home, write, rk, lk, lengths, 100)


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("rk,lk", [(1, 1), (3, 4)])
@pytest.mark.parametrize("lengths", ["uniform", "mixed"])
def test_a_large_read_launches_in_two_parts_that_move_exactly_the_runs(monkeypatch, write, rk, lk, lengths):
    from transport import gpu_runs

    n = 5000
    assert gpu_runs.split_point(n) > 0
    before = gpu_runs._LAUNCHER.raw_launches + gpu_runs._LAUNCHER.fast_launches
    _check_paired(monkeypatch, "mapped", write, rk, lk, lengths, n)
    # three reps: the first part of rep 1 may compile (through Triton); the other five go direct
    assert gpu_runs._LAUNCHER.raw_launches + gpu_runs._LAUNCHER.fast_launches >= before + 5


def _check_paired(monkeypatch, home, write, rk, lk, lengths, n):
    torch = pytest.importorskip("torch")
    from transport import gpu_remote, gpu_runs, gpu_upload

    monkeypatch.setattr(gpu_runs, "LOCAL_TABLE", gpu_runs.TableHome(home))
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    bb, blocks = 16384, max(256, n)
    rng = np.random.default_rng(rk * 10 + lk + write)
    rpools, lpools = _pools(torch, dev, rk, blocks, bb, 1), _pools(torch, dev, lk, blocks, bb, 2)
    r_before = [p.clone() for p in rpools]
    l_before = [p.clone() for p in lpools]
    ln = (np.full(n, bb, np.int64) if lengths == "uniform"
          else (rng.integers(1, bb // 16 + 1, n) * 16).astype(np.int64))
    # distinct blocks per side (a run never spans blocks), random order
    rblk, lblk = rng.permutation(blocks * rk)[:n], rng.permutation(blocks * lk)[:n]
    rslot, roff = rblk // blocks, (rblk % blocks) * bb
    lslot, loff = lblk // blocks, (lblk % blocks) * bb
    remote = gpu_remote.RemoteTable(gpu_runs.RunSide(np.array([p.data_ptr() for p in rpools], np.int64),
                                                   rslot.astype(np.int64) if rk > 1 else None, roff.astype(np.int64)), ln)
    local = gpu_runs.RunSide(np.array([p.data_ptr() for p in lpools], np.int64),
                             lslot.astype(np.int32) if lk > 1 else None, loff.astype(np.int64))
    stream = torch.cuda.Stream(dev)
    src_p, src_s, src_o, dst_p, dst_s, dst_o = ((lpools, lslot, loff, rpools, rslot, roff) if write
                                                else (rpools, rslot, roff, lpools, lslot, loff))
    dst_before = r_before if write else l_before
    expect = [p.clone() for p in dst_before]
    for i in range(n):
        a, b, m = int(src_o[i]), int(dst_o[i]), int(ln[i])
        srcrow = src_p[int(src_s[i])].view(-1)[a:a + m]
        expect[int(dst_s[i])].view(-1)[b:b + m] = srcrow
    launches = gpu_runs._LAUNCHER.raw_launches + gpu_runs._LAUNCHER.fast_launches
    for rep in range(3):   # the remote half is uploaded once and reused; later launches go direct
        for p, b in zip(dst_p, dst_before):   # every rep starts from the old bytes: each must copy
            p.copy_(b)
        torch.cuda.synchronize(dev)
        ev, keep = gpu_runs.launch(remote, local, dev, stream, write)
        ev.synchronize()
        keep.synced()
        assert isinstance(keep, gpu_upload.Held) and remote.resident()
        for got, want in zip(dst_p, expect):
            assert torch.equal(got, want), f"rep {rep}: the kernel wrote other bytes than the runs"
        for got, want in zip(lpools if write else rpools, l_before if write else r_before):
            assert torch.equal(got, want), f"rep {rep}: the source changed"
    assert gpu_runs._LAUNCHER.raw_launches + gpu_runs._LAUNCHER.fast_launches >= launches + 2, \
        "later launches of a variant did not go direct"
    assert gpu_runs._LAUNCHER.disabled is None, gpu_runs._LAUNCHER.disabled


def test_direct_launches_take_the_raw_c_launcher_on_a_known_triton():
    """On a Triton whose launcher triton_fast knows, the kernel's launches (checked byte for byte
    above) went straight to its C launcher, and none of them failed."""
    pytest.importorskip("torch")
    import triton

    from transport import gpu_runs, triton_fast
    if not triton.__version__.startswith(triton_fast.RAW_LAUNCH_VERSIONS):
        pytest.skip(f"triton {triton.__version__}: not a release the raw launch knows")
    if gpu_runs._LAUNCHER.raw_launches == 0:   # (run alone: launch once)
        with pytest.MonkeyPatch.context() as mp:
            test_paired_kernel_moves_exactly_the_runs(mp, "mapped", False, 1, 1, "uniform")
    assert gpu_runs._LAUNCHER.raw_disabled is None, gpu_runs._LAUNCHER.raw_disabled
    assert gpu_runs._LAUNCHER.raw_launches > 0


@pytest.mark.parametrize("write", [False, True])
@pytest.mark.parametrize("rk,lk", [(1, 1), (3, 1), (1, 4), (3, 32)])
@pytest.mark.parametrize("lengths", ["uniform", "mixed"])
def test_direct_kernel_reads_the_runs_from_the_descs_own_tables(write, rk, lk, lengths):
    """gpu_direct.launch: the local runs come from the Descs' pinned tables (offsets, region
    index, the device table of region bases), one launch, every byte checked and the rest of
    both pools untouched, three reps (the later ones through the compiled launcher)."""
    torch = pytest.importorskip("torch")
    from transport import Descs, gpu_direct, gpu_remote, gpu_runs
    from transport.region import make_region

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    bb, n = 16384, 5000 if lk > 1 else 300
    blocks = max(64, -(-n // min(rk, lk)) + 8)   # (each side has n distinct blocks)
    rng = np.random.default_rng(rk * 100 + lk * 3 + write)
    rpools, lpools = _pools(torch, dev, rk, blocks, bb, 11), _pools(torch, dev, lk, blocks, bb, 12)
    r_before = [p.clone() for p in rpools]
    l_before = [p.clone() for p in lpools]
    regions = [make_region(p) for p in lpools]
    ln = (np.full(n, bb, np.int64) if lengths == "uniform"
          else (rng.integers(1, bb // 16 + 1, n) * 16).astype(np.int64))
    rblk, lblk = rng.permutation(blocks * rk)[:n], rng.permutation(blocks * lk)[:n]
    if lengths == "uniform" and lk > 1:   # per-layer block lists joined, as the vLLM layout builds them
        order = np.argsort(lblk // blocks, kind="stable")
        rblk, lblk = rblk[order], lblk[order]
    rslot, roff = rblk // blocks, (rblk % blocks) * bb
    lslot, loff = (lblk // blocks).astype(np.int32), ((lblk % blocks) * bb).astype(np.int64)
    if lengths == "uniform" and lk == 1:
        local = Descs.from_blocks(regions[0], lblk % blocks, bb)
    elif lengths == "uniform":
        local = Descs.concat([Descs.from_blocks(regions[k], loff[lslot == k] // bb, bb) for k in range(lk)])
    else:
        local = Descs.from_parts(tuple(regions), [lslot], [loff], [ln])
    assert local.device_tables is not None and gpu_direct.usable(local, 0), "no pinned tables"
    assert np.array_equal(local.region_idx, lslot if lk > 1 else np.zeros(n, np.int32))
    remote = gpu_remote.RemoteTable(gpu_runs.RunSide(np.array([p.data_ptr() for p in rpools], np.int64),
                                                   rslot.astype(np.int64) if rk > 1 else None,
                                                   roff.astype(np.int64)), ln)
    stream = torch.cuda.Stream(dev)
    src_p, src_s, src_o, dst_p, dst_s, dst_o = ((lpools, lslot, loff, rpools, rslot, roff) if write
                                                else (rpools, rslot, roff, lpools, lslot, loff))
    dst_before = r_before if write else l_before
    expect = [p.clone() for p in dst_before]
    for i in range(n):
        a, b, m = int(src_o[i]), int(dst_o[i]), int(ln[i])
        expect[int(dst_s[i])].view(-1)[b:b + m] = src_p[int(src_s[i])].view(-1)[a:a + m]
    launches = gpu_direct._LAUNCHER.raw_launches + gpu_direct._LAUNCHER.fast_launches
    count = gpu_direct.direct_launches
    for rep in range(3):
        for p, b in zip(dst_p, dst_before):
            p.copy_(b)
        torch.cuda.synchronize(dev)
        ev, keep = gpu_direct.launch(remote, local, dev, stream, write, record=rep != 1)
        if ev is None:
            stream.synchronize()
        else:
            ev.synchronize()
        del keep
        for got, want in zip(dst_p, expect):
            assert torch.equal(got, want), f"rep {rep}: the kernel wrote other bytes than the runs"
        for got, want in zip(lpools if write else rpools, l_before if write else r_before):
            assert torch.equal(got, want), f"rep {rep}: the source changed"
    assert gpu_direct.direct_launches == count + 3 and gpu_direct.disabled is None
    assert gpu_direct._LAUNCHER.raw_launches + gpu_direct._LAUNCHER.fast_launches >= launches + 2, \
        "later launches of a variant did not go direct"
