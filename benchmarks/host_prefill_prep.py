"""Host time a long prompt costs before its prefill's first kernel: the engine's token id
checks (LLMEngine.validate_prompt), the step's rows (engine.step_inputs.build_inputs), and
turning those rows into tensors (torch.tensor on the lists, against numpy first). CPU only,
no model run: the GPU waits for exactly this work when a prefill step starts.

    python benchmarks/host_prefill_prep.py [--tokens 4096] [--repeat 50]

Copied into another checkout's benchmarks/ and run there, it times that checkout's engine.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLMEngine, SamplingParams  # noqa: E402
from engine.scheduler import ScheduledSeq  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from engine.step_inputs import build_inputs  # noqa: E402


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    n, bs = args.tokens, 16
    engine = LLMEngine("random:tiny", device="cpu", enable_prefix_caching=False)
    engine.max_model_len = n + 64   # the checks only: the tiny model's own context is shorter
    rng = random.Random(0)
    ids = [rng.randrange(engine.model_config.vocab_size) for _ in range(n)]
    params = SamplingParams(max_tokens=1)
    seq = Sequence("r", list(ids), n, params, block_table=list(range(-(-n // bs))))
    entry = ScheduledSeq(seq, n)
    inp = build_inputs([entry], bs, None)
    rows = dict(validate_prompt=median_ms(lambda: engine.validate_prompt(ids, params), args.repeat),
                build_inputs=median_ms(lambda: build_inputs([entry], bs, None), args.repeat),
                torch_tensor_3_lists=median_ms(lambda: [torch.tensor(x, dtype=torch.int64) for x in
                                                        (inp.token_ids, inp.positions, inp.slots)], args.repeat),
                numpy_3_lists=median_ms(lambda: [torch.from_numpy(np.array(x, dtype=np.int64)) for x in
                                                 (inp.token_ids, inp.positions, inp.slots)], args.repeat))
    print(f"{n}-token prompt, host ms (median of {args.repeat}):")
    for k, v in rows.items():
        print(f"  {k:22s} {v:.3f}")


if __name__ == "__main__":
    main()
