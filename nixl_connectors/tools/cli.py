"""Command line: `nixl-connectors demo | doctor | bench`."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(num_layers=args.layers, num_blocks=args.blocks, num_requests=args.requests,
                     rounds=args.rounds)
    res = run_demo(cfg)
    return 0 if res.bad_blocks == 0 else 1


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import format_report, run_doctor

    report = run_doctor()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench.sweep import main as bench_main

    return bench_main(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nixl-connectors", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="prefill/decode KV transfer between two local processes, verified, against "
                                    "the contiguous-copy limit of this machine")
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--blocks", type=int, default=1024, help="blocks per layer on each side")
    d.add_argument("--requests", type=int, default=16)
    d.add_argument("--rounds", type=int, default=3)
    d.set_defaults(fn=_demo)
    doc = sub.add_parser("doctor", help="data paths this machine can use (same-host copy, CUDA IPC, UCX), "
                                        "UCX transports, CUDA peer access, RDMA, NIXL, and why a slower path")
    doc.add_argument("--json", action="store_true")
    doc.set_defaults(fn=_doctor)
    b = sub.add_parser("bench", help="workloads through ours, NIXL and the one-process copies of the same bytes "
                                     "(contiguous: the limit; scattered: a reference), ratios from one run")
    from .bench.sweep import add_arguments

    add_arguments(b)
    b.set_defaults(fn=_bench)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
