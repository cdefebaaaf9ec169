"""AMX tile permission for CPU workers (see nixl_connectors/vllm/cpu_amx.py), checked in a fresh
process: where the CPU has AMX, permission is missing before and granted after the request."""
import subprocess
import sys

CODE = """
from nixl_connectors.vllm import cpu_amx as a
import ctypes
libc = ctypes.CDLL(None)
supp = a._xcomp(libc, a.ARCH_GET_XCOMP_SUPP) or 0
has = bool(supp >> a.XFEATURE_XTILEDATA & 1)
before = a.amx_permitted()
got = a.request_amx()
print(has, before, got, a.amx_permitted())
"""


def test_request_grants_amx_where_the_cpu_has_it():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    has, before, got, after = (w == "True" for w in out.stdout.split())
    assert not before                      # a fresh process never has it
    assert got == after == has             # granted exactly where supported; a no-op elsewhere
