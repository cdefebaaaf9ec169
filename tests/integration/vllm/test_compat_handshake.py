"""A compat mismatch between prefill and decode agents is a clear error naming the field.

Each agent lives in its own process (one transport Agent per process, as in vLLM)."""
import multiprocessing as mp

import pytest

from nixl_connectors.kit import KvCompat

pytestmark = pytest.mark.timeout(120)


def _compat(**over):
    """What the vLLM connector puts in the handshake (compat.compat_from_vllm); TP size and block
    size are not in it (they are mapped, and travel in kv_transfer_params)."""
    base = KvCompat(engine="vllm", model="m", dtype="bfloat16", num_layers=4, kv_layout="cpu:HND/256").with_extra(
        {"kv_heads_total": 2, "head_size": 64, "kv_groups": "FullAttentionSpecx4"}).to_dict()
    base.update(over)
    return base


def _owner(q_addr, q_stop, compat):
    from transport import Agent, AgentConfig
    with Agent("owner", AgentConfig(compat=compat, timeout_s=10)) as a:
        q_addr.put(a.address)
        q_stop.get(timeout=60)


def _reader(addr, compat, q_out):
    from transport import Agent, AgentConfig, TransferError
    with Agent("reader", AgentConfig(compat=compat, timeout_s=10)) as b:
        try:
            b.connect(addr)
            q_out.put(("ok", None))
        except TransferError as e:
            q_out.put((type(e).__name__, getattr(e, "field", None)))


def _handshake(owner_compat, reader_compat):
    ctx = mp.get_context("spawn")
    qa, qs, qo = ctx.Queue(), ctx.Queue(), ctx.Queue()
    po = ctx.Process(target=_owner, args=(qa, qs, owner_compat))
    po.start()
    try:
        addr = qa.get(timeout=60)
        pr = ctx.Process(target=_reader, args=(addr, reader_compat, qo))
        pr.start()
        res = qo.get(timeout=60)
        pr.join(30)
        return res
    finally:
        qs.put(1)
        po.join(30)
        if po.is_alive():
            po.kill()


@pytest.mark.parametrize("field,value", [("kv_layout", "cpu:NHD/256"), ("kv_groups", "FullAttentionSpecx2;"
                                         "SlidingWindowSpec[64]x2"), ("model", "other")])
def test_mismatch_names_field(field, value):
    name, got_field = _handshake(_compat(), _compat(**{field: value}))
    assert name == "CompatMismatch" and got_field == field


def test_match_connects():
    assert _handshake(_compat(), _compat())[0] == "ok"
