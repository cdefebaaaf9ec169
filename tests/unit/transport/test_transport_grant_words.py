"""Grant words on a shared board (grant_words.py): the owner's sealed memfd, mapped read-only by a
reader only after every check, and a reader that falls back to process_vm_readv on anything it
cannot trust. The "owner" here is this process (its /proc/<pid>/fd entries are real)."""
from __future__ import annotations

import fcntl
import os
import tempfile
import threading

import numpy as np
import pytest

from transport import cma, grant_words
from transport.grant_words import BoardRef, WordReader, map_board, new_board, parse_ref
from transport.grants import GrantBoard

PID = os.getpid()


@pytest.fixture
def board():
    b = new_board(64)
    if b.fd is None:
        pytest.fail("this Linux has memfd_create: the board must be shared")
    yield b
    b.close_fd()


def test_a_board_maps_and_reads_the_owners_words_as_they_change(board):
    board.words[5] = 1234
    m = map_board(PID, board.ref)
    assert m is not None
    addr = board.words.ctypes.data + 8 * 5
    assert m.read(addr) == 1234
    board.words[5] = 0          # the lease ended: the mapping sees it at once
    assert m.read(addr) == 0


def test_reads_outside_the_words_are_refused(board):
    m = map_board(PID, board.ref)
    base = board.words.ctypes.data
    assert m.read(base) is None                    # slot 0 is the board id, never a grant word
    assert m.read(base + 8 * 64) is None           # past the end
    assert m.read(base - 8) is None
    assert m.read(base + 8 * 3 + 4) is None        # not a word boundary
    assert m.read(base + 8 * 63) == 0


def test_another_boards_id_is_not_this_board(board):
    ref = board.ref
    assert map_board(PID, BoardRef(ref.fd, ref.base, ref.ident ^ 1)) is None


def test_an_unsealed_memfd_of_the_same_name_is_refused():
    fd = os.memfd_create(grant_words.MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 4096)
        os.pwrite(fd, (77).to_bytes(8, "little"), 0)
        assert map_board(PID, BoardRef(fd, 1 << 20, 77)) is None   # it could shrink under the reader
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        assert map_board(PID, BoardRef(fd, 1 << 20, 77)) is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["pipe", "file", "fifo", "closed"])
def test_an_fd_that_is_not_a_board_is_refused_without_blocking(kind, tmp_path):
    """A lying owner names one of its other fds: nothing is opened that could block (a FIFO with
    no writer) and nothing is mapped."""
    keep = []
    if kind == "pipe":
        r, w = os.pipe()
        keep, fd = [r, w], r
    elif kind == "file":
        f = tempfile.NamedTemporaryFile(dir=tmp_path)
        f.write(b"\0" * 4096)
        f.flush()
        keep, fd = [f], f.fileno()
    elif kind == "fifo":
        path = tmp_path / "q"
        os.mkfifo(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        keep = [fd]
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
    out = []
    t = threading.Thread(target=lambda: out.append(map_board(PID, BoardRef(fd, 1 << 20, 5))), daemon=True)
    t.start()
    t.join(10)
    try:
        assert not t.is_alive(), "mapping a foreign fd blocked"
        assert out == [None]
    finally:
        for k in keep:
            k.close() if hasattr(k, "close") else os.close(k)


def test_the_word_reader_falls_back_to_process_vm_readv(monkeypatch, board):
    calls = []
    monkeypatch.setattr(cma, "read_word", lambda pid, addr: calls.append(addr) or 99)
    wr = WordReader()
    addr = board.words.ctypes.data + 8 * 2
    board.words[2] = 42
    assert wr.read(PID, addr, None) == 99                                   # no board named
    bad = BoardRef(board.fd, board.ref.base, board.ident ^ 2)
    assert wr.read(PID, addr, bad) == 99 and wr.read(PID, addr, bad) == 99   # unmappable: remembered
    assert wr.read(PID, addr, board.ref) == 42                               # mapped: no syscall
    assert wr.read(PID, board.words.ctypes.data, board.ref) == 99            # not a word of the board
    assert len(calls) == 4 and wr.mapped() == 1
    wr.clear()
    assert wr.mapped() == 0


def test_a_closed_grant_board_reads_zero_through_a_mapping_made_before():
    gb = GrantBoard(slots=4)

    class E:
        grant = None
    addr, gen = gb.issue(E())
    ref = gb.ref
    assert ref is not None and (addr - ref.base) % 8 == 0 and addr > ref.base
    m = map_board(PID, ref)
    assert m.read(addr) == gen
    gb.close()
    assert m.read(addr) == 0
    assert map_board(PID, ref) is None   # (its fd is closed: new readers use process_vm_readv)


@pytest.mark.parametrize("fields", [(-1, 8, 1), (3, 0, 1), (3, 12, 1), (3, 8, 0), (3, 8, 1 << 63), (True, 8, 1),
                                    (3, 8.0, 1), (1 << 31, 8, 1)])
def test_malformed_board_fields_are_refused(fields):
    assert parse_ref(*fields) is None
    assert parse_ref(3, 8, 1) == BoardRef(3, 8, 1)


def test_grant_board_slots_start_after_the_id():
    gb = GrantBoard(slots=2)

    class E:
        grant = None
    issued = [gb.issue(E()) for _ in range(3)]
    assert issued[2] is None
    slots = sorted((a - gb.words.ctypes.data) // 8 for a, _ in issued[:2])
    assert slots == [1, 2] and int(gb.words[0]) == gb.ref.ident
    assert np.count_nonzero(gb.words) == 3
    gb.close()


def test_a_peer_naming_ever_new_boards_gets_process_vm_readv_not_ever_more_mappings(monkeypatch):
    tried = []
    monkeypatch.setattr(grant_words, "map_board", lambda pid, ref: tried.append(ref))   # (each unmappable)
    monkeypatch.setattr(cma, "read_word", lambda pid, addr: 7)
    wr = WordReader()
    for i in range(50):
        assert wr.read(PID, 4096, BoardRef(3, 8 * (i + 1), i + 1)) == 7
    assert len(tried) == grant_words.MAX_BOARDS and wr.mapped() == 0
