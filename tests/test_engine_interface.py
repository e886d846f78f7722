"""The workers use the engine through its public methods only (issue 12): no reads of the
scheduler, the model runner, the block manager or the step's internals, and no private
attribute of a KV receiver. A worker that needs more asks the engine for a method."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_PACKAGES = ("worker_base", "decode_worker", "prefill_worker")
# engine.<internal> (however the engine is named: self.engine, engine, e) and receivers' privates
FORBIDDEN = re.compile(r"\bengine\.(scheduler|runner|blocks|current_step|_\w+)\b|\b(receiver|rx)\._\w+")


def _worker_sources():
    for pkg in WORKER_PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if name.endswith(".py"):
                path = os.path.join(ROOT, pkg, name)
                with open(path, encoding="utf-8") as f:
                    yield f"{pkg}/{name}", f.read()


def test_workers_reach_no_engine_or_receiver_internals():
    found = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
             for path, text in _worker_sources() for m in FORBIDDEN.finditer(text)]
    assert not found, "workers reach into internals:\n" + "\n".join(found)


def test_the_check_catches_a_reach():
    assert FORBIDDEN.search("x = self.engine.scheduler.running")
    assert FORBIDDEN.search("self.engine.current_step = []")
    assert FORBIDDEN.search("sock = self.receiver._sock")
    assert not FORBIDDEN.search("self.engine.queue_stats()")
