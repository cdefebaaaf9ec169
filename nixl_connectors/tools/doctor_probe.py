"""Child-process side of ``nixl-connectors doctor``: start a UCX context and describe it.

Run as ``python -m nixl_connectors.tools.doctor_probe``; prints one JSON object on a private copy
of stdout (fd 1 itself is pointed at stderr so UCX output cannot corrupt it). It runs in
a child so that the caller's process never initialises UCX and the environment used
(e.g. without ``UCX_TLS``) is the child's alone.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

_RESOURCE_RE = re.compile(r"resource\s+\d+\s*:\s*md\s+\d+\s+dev\s+\d+\s+flags\s+\S*\s+(\S+)/(\S+)")
_UCX_LIBS = ("libucp", "libuct", "libucs")


def parse_resources(context_info: str) -> list[tuple[str, str]]:
    """(transport, device) pairs from ``ucxx.get_ucp_context_info()`` text ("tcp/eth0" lines)."""
    return [(m.group(1), m.group(2)) for m in _RESOURCE_RE.finditer(context_info)]


def loaded_ucx_libraries(maps_text: str) -> list[str]:
    """Paths of UCX shared libraries in a /proc/<pid>/maps text, deduplicated, in order."""
    paths: dict[str, None] = {}
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and any(os.path.basename(parts[5]).startswith(lib) for lib in _UCX_LIBS):
            paths[parts[5]] = None
    return list(paths)


def uct_modules(libraries: list[str]) -> list[str]:
    """Names of the UCT transport modules next to the loaded libucp ("cma", "cuda", "ib"...).

    A UCX without an ``ib`` module was built without verbs and cannot do RDMA."""
    mods: set[str] = set()
    for lib in libraries:
        if os.path.basename(lib).startswith("libucp"):
            mod_dir = os.path.join(os.path.dirname(lib), "ucx")
            try:
                names = os.listdir(mod_dir)
            except OSError:
                continue
            for name in names:
                m = re.fullmatch(r"libuct_(\w+)\.so", name)
                if m:
                    mods.add(m.group(1))
    return sorted(mods)


def probe() -> dict[str, Any]:
    import ucxx

    ucxx.init(options={"WARN_UNUSED_ENV_VARS": "n"})
    info = ucxx.get_ucp_context_info()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            libs = loaded_ucx_libraries(f.read())
    except OSError:
        libs = []
    return {
        "ucx_version": ".".join(str(v) for v in ucxx.get_ucx_version()),
        "ucxx_version": getattr(ucxx, "__version__", None),
        "active_transports": sorted(ucxx.get_active_transports()),
        "resources": [list(r) for r in parse_resources(info)],
        "ucx_libraries": libs,
        "uct_modules": uct_modules(libs),
        "ucx_tls": os.environ.get("UCX_TLS"),
    }


def main() -> int:
    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        result: dict[str, Any] = {"ok": True, **probe()}
    except Exception as exc:  # reported to the parent as data
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    os.write(out_fd, (json.dumps(result) + "\n").encode("utf-8"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
