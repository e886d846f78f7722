"""Serving benchmark: now `pdserve bench` (deploy/bench.py), kept here so existing commands
and benchmarks/RESULTS.md's instructions still work. See deploy/bench.py for the options:

    python benchmarks/serve.py --model random:tiny --modes colocated,disaggregated,conditional \\
        --rates 1,2,4 --requests 24 --json serve.json --png serve.png
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deploy.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
