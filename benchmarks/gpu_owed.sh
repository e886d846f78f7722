#!/usr/bin/env bash
# The GPU measurements the open issues still owe, in one command per device call, each step
# under its own time limit, results under $OUT (or ./gpu_out), the GPU emptied between steps.
#
#   bash benchmarks/gpu_owed.sh kv tests          # issue 11: transfer + TTFT, the GPU tests
#   bash benchmarks/gpu_owed.sh stream            # issue 14: the 256-request stream, 3 engine variants + HF
#   bash benchmarks/gpu_owed.sh saturated decode  # issue 14: the same requests all at once; decode table
#   bash benchmarks/gpu_owed.sh fused             # issue 14: fused batch-1 products, swept; decode with and without
#   bash benchmarks/gpu_owed.sh profile           # issue 15: the GPU profile (deployed-path probe)
#   bash benchmarks/gpu_owed.sh gputests          # every test marked gpu
#   bash benchmarks/gpu_owed.sh sampler           # issue 14: sync test; batched sampler vs per-row; sampled decode table
#   bash benchmarks/gpu_owed.sh sampledstream     # issue 14: the saturating stream with every request sampling, overlap vs sync
#   bash benchmarks/gpu_owed.sh gemvtiles         # issue 14: the batch-1 products' tiles and kernel variants swept; decode with the engine's table
#   GEMV_SWEEP=f.json bash benchmarks/gpu_owed.sh gemvdecode   # decode with the sweep's tiles, then with PDL kernels too (default: $OUT/gemv_sweep.json)
#   bash benchmarks/gpu_owed.sh gemvquick         # gemvtiles with a quick sweep, then gemvdecode on it: one call
#   bash benchmarks/gpu_owed.sh gemvregs          # registers and spills of every tile, compiled by the device's Triton
#   bash benchmarks/gpu_owed.sh gemvtests         # the GPU tests of the batch-1 products and PDL
#   bash benchmarks/gpu_owed.sh idle              # issue 14: where the 4k prefill's device idles; the batch-1 graph's pools
#
# Steps run in the order given; a step that fails or runs out of time is reported and the
# next one still runs. Each step's stdout+stderr is in $OUT/<step>.log.
set -u
SELF="$(realpath "$0")"   # for steps that run others of this script
cd "$(dirname "$0")/.."
OUT="$(realpath -m "${OUT:-gpu_out}")"   # absolute: some steps run from benchmarks/
mkdir -p "$OUT"
clean() { bash benchmarks/gpu_clean.sh; }

step() {   # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    clean
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "[$name] rc=$rc in $((SECONDS - t0)) s (limit $limit)"
    tail -n 6 "$OUT/$name.log" | sed "s/^/[$name]   /"
    clean
}

[ $# -gt 0 ] || { echo "usage: $0 kv|tests|densetests|gputests|stream|saturated|decode|fused|gemvtiles|gemvquick|gemvdecode|gemvregs|gemvtests|prefill|sampler|sampledstream|idle|profile ..." >&2; exit 2; }
for s in "$@"; do
    case "$s" in
        kv) kv_runs=$((${kv_runs:-0} + 1))   # each kv step its own file: kv_ipc_1.json, kv_ipc_2.json, ...
            step "kv_$kv_runs" 300 bash -c "python benchmarks/gpu_kv_ipc.py --json --repeat 4 --warmup 1 --best-tile \
                --ttft-tokens 1024 4096 7936 > '$OUT/kv_ipc_$kv_runs.json'" ;;
        tests) step tests 240 python -m pytest -q -m gpu tests/test_kv_transfer_ipc.py tests/test_triton_kernels.py ;;
        densetests) step densetests 200 python -m pytest -q -m gpu tests/test_gpu.py -k "dense or dropped" ;;
        gputests) step gputests 420 python -m pytest -q -m gpu tests ;;
        stream) step stream 420 bash -c "cd benchmarks && python gpu_vs_hf.py --requests 256 \
                --engines overlap,sync,dense --json '$OUT/stream.json'" ;;
        saturated) step saturated 420 bash -c "cd benchmarks && python gpu_vs_hf.py --requests 256 --rate 100000 \
                --engines overlap,sync --json '$OUT/stream_saturated.json'" ;;
        decode) step decode 200 bash -c "cd benchmarks && python gpu_decode.py --batches 1,8,32,128 --kernels \
                --json '$OUT/decode.json'" ;;
        fused) step gemv 240 bash -c "cd benchmarks && python gpu_gemv.py --json '$OUT/gemv.json'"
               step decode_fused 200 bash -c "cd benchmarks && python gpu_decode.py --batches 1,8 --json '$OUT/decode_fused.json'"
               step decode_unfused 200 bash -c "cd benchmarks && python gpu_decode.py --batches 1,8 --no-fused-products \
                --json '$OUT/decode_unfused.json'" ;;
        gemvtiles) step gemv_sweep 420 bash -c "cd benchmarks && python gpu_gemv.py --json '$OUT/gemv_sweep.json'"
                   step decode_table 140 bash -c "cd benchmarks && python gpu_decode.py --batches 1,8 --overlap on \
                --json '$OUT/decode_table.json'" ;;
        gemvquick) step gemv_sweep 170 bash -c "cd benchmarks && python gpu_gemv.py --quick --json '$OUT/gemv_sweep.json'"
                   step decode_table 100 bash -c "cd benchmarks && python gpu_decode.py --batches 1 --overlap on \
                --json '$OUT/decode_table.json'"
                   OUT="$OUT" GEMV_SWEEP="$OUT/gemv_sweep.json" bash "$SELF" gemvdecode ;;
        gemvdecode) sweep="$(realpath -m "${GEMV_SWEEP:-$OUT/gemv_sweep.json}")"   # gpu_gemv.py's file
                    step decode_swept 100 bash -c "cd benchmarks && python gpu_decode.py --batches 1 --overlap on \
                --gemv-tiles '$sweep' --json '$OUT/decode_swept.json'"
                    step decode_swept_pdl 100 bash -c "cd benchmarks && python gpu_decode.py --batches 1 --overlap on \
                --gemv-tiles '$sweep' --pdl-kernels --json '$OUT/decode_swept_pdl.json'" ;;
        gemvregs) step gemv_registers 120 bash -c "cd benchmarks && python gemv_registers.py \
                --json '$OUT/gemv_registers.json'" ;;
        gemvtests) step gemv_tests 240 python -m pytest -q -m gpu tests/test_triton_kernels.py tests/test_gpu.py \
                -k "fused or chained" ;;
        prefill) step prefill 200 bash -c "cd benchmarks && python gpu_prefill.py --lengths 1024,4096 --repeat 3 \
                --json '$OUT/prefill.json'" ;;
        sampler) step sampler_tests 200 python -m pytest -q -m gpu tests/test_overlap.py
                 step sampler 200 bash -c "cd benchmarks && python sampler_batch.py --device cuda --vocab 128256 \
                --json '$OUT/sampler.json'"
                 step sampled_decode 240 bash -c "cd benchmarks && python gpu_decode.py --batches 1,32,128 \
                --temperature 0.8 --top-p 0.95 --json '$OUT/decode_sampled.json'"
                 ;;
        sampledstream) step sampled_stream 420 bash -c "cd benchmarks && python gpu_vs_hf.py --requests 256 \
                --rate 100000 --engines overlap,sync --skip-hf --temperature 0.8 --top-p 0.95 \
                --json '$OUT/stream_sampled.json'" ;;
        idle) step prefill_gaps 240 bash -c "cd benchmarks && python gpu_prefill.py --lengths 4096 --repeat 5 --kernels \
                --json '$OUT/prefill_gaps.json'"
              step graph_pools 240 bash -c "cd benchmarks && python gpu_decode.py --batches 1 --overlap on \
                --max-num-seqs 128 --graph-pools --graph-kernels --json '$OUT/decode_pools.json'" ;;
        profile) step profile 540 python -m deploy.cli profile --model random:llama3-8b --dtype bfloat16 \
                --out "$OUT/profile_h100.json" ;;
        *) echo "unknown step $s" >&2 ;;
    esac
done
