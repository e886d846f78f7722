"""Host time of the cuda_ipc receiver's handling of one `landed` report (CPU, no GPU).

A report names a group of layers and the request's blocks; the receiver checks it against
the reservation and marks each layer landed. On a GPU host this runs on the decode
worker's loop, between the copies finishing and the request being admitted, so it is on
a disaggregated request's critical path (benchmarks/RESULTS.md, issue 11).

    python benchmarks/ipc_report_cost.py            # 32 layers of 256 blocks, with and without the done
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kv_transfer as kt  # noqa: E402
from kv_transfer import ipc_backend as ipc  # noqa: E402
from kv_transfer.wire import KVLayout, encode_done  # noqa: E402


class _Pair:
    ident = b"p"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    nb = 2 * args.blocks + 8
    layout = KVLayout(num_layers=args.layers, num_blocks=nb, block_size=16, num_kv_heads=2, head_dim=8,
                      dtype="bfloat16")
    cache = torch.zeros(args.layers, 2, nb, 16, 2, 8, dtype=torch.bfloat16)
    rx = kt.make_receiver("cuda_ipc", layout, None, cache=cache)
    dst = list(range(nb - 1, nb - 1 - args.blocks, -1))
    out = {}
    try:
        for with_done in (False, True):
            if with_done and "done" not in ipc.encode_landed.__code__.co_varnames:
                continue   # code from before the done rode along
            times = []
            for rep in range(args.repeat):
                rid = f"r{with_done:d}{rep}"
                rx.expect(rid, dst, args.layers, time.monotonic() + 100)
                rx._claims[rid] = _Pair.ident   # as if granted to this pair
                done = encode_done(rid, 1, args.layers)[0] if with_done else None
                body = ipc.encode_landed(rid, 0, args.layers, dst, *([done] if done else []))
                written = rx.stats["layers_written"]
                t0 = time.perf_counter()
                rx._on_landed(_Pair, body)
                times.append(time.perf_counter() - t0)
                # Timed only if it was the real path: every layer marked, the request complete with its done.
                assert rx.stats["layers_written"] == written + args.layers, "the report was not accepted"
                done_now = [c.request_id for c in rx.poll(0).completed]   # hand out the completion
                assert done_now == ([rid] if with_done else []), done_now
            out["with_done" if with_done else "landed_only"] = 1e6 * statistics.median(times)
    finally:
        rx.close()
    print(json.dumps(dict(layers=args.layers, blocks=args.blocks, us_per_report=out)))


if __name__ == "__main__":
    main()
