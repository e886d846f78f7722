#!/usr/bin/env bash
# Device runs: stop any Ray cluster and kill what still holds the GPU, so the next step
# measures an empty device (Ray actors run in their own sessions and outlive their command).
ray stop --force >/dev/null 2>&1 || true
for p in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
sleep 1
