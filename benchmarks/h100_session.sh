#!/usr/bin/env bash
# One device-tool call on a 4 x H100 machine: installs .whl/ (Ray Serve + pyzmq, see
# ../shared/tools/gpu-ray-wheels.sh and benchmarks/gpu_wheels.sh), then runs a stage, logs under $OUT.
#   suite:  GPU 2 the GPU stress suite (then the prefix benchmark, engine mode); GPU 3 bench_load.py;
#           GPUs 0-1 bench_served_vs_offline.py (1 replica, then 2) -- the four in parallel.
#   router: bench_serving.py --compare-routers, 4 replicas x TP=1 of dummy:llama-3-8b, several Poisson rates.
set -uo pipefail
stage=$1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$(pwd):${PYTHONPATH:-} RAY_AUTH_MODE=disabled
export VATTN_COMMIT=${VATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt"
quiet() { grep -v -e ' INFO ' -e 'Loading' -e '^\s*$'; }
case $stage in
suite)
  (
    CUDA_VISIBLE_DEVICES=2 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --timeout 200 \
      tests/gpu tests/engine tests/kvcache tests/benchmarks > "$OUT/gpu_suite.log" 2>&1
    echo "suite rc=$?" >> "$OUT/gpu_suite.log"
    if [ -f benchmarks/bench_prefix.py ]; then
      CUDA_VISIBLE_DEVICES=2 timeout 230 python3 benchmarks/bench_prefix.py --mode engine --device cuda \
        --model dummy:llama-3-8b --name prefix_h100 > "$OUT/prefix_h100.log" 2>&1
      cp benchmarks/results/prefix_h100.json "$OUT/" 2>/dev/null
    fi
  ) &
  (
    CUDA_VISIBLE_DEVICES=3 timeout 560 python3 benchmarks/bench_load.py --dir /tmp/vattn_bench_load \
      > "$OUT/load_h100.log" 2>&1
    cp benchmarks/results/load_h100.json "$OUT/" 2>/dev/null
  ) &
  CUDA_VISIBLE_DEVICES=0,1 timeout 560 python3 benchmarks/bench_served_vs_offline.py --device cuda \
    --model dummy:llama-3-8b --num-replicas 1,2 \
    --engine-kwargs '{"max_batch_size": 256, "kv_cache_memory_fraction": 0.85, "max_num_batched_tokens": 8192}' \
    --num-prompts 300 --long-input-len 4000 --long-output-len 600 --short-input-len 300 --short-output-len 150 \
    --out "$OUT/served_vs_offline_h100.json" 2>&1 | quiet > "$OUT/served.log"
  wait
  tail -5 "$OUT/gpu_suite.log"; tail -25 "$OUT/prefix_h100.log" 2>/dev/null; tail -12 "$OUT/load_h100.log"
  tail -40 "$OUT/served.log"
  ;;
router)
  app='{"model": "dummy:llama-3-8b", "served_model_name": "llama-3-8b", "device": "cuda",
    "engine_kwargs": {"max_batch_size": 64, "kv_cache_memory_bytes": 6442450944, "max_num_batched_tokens": 8192},
    "engine": {"num_replicas": 4, "num_gpus": 1, "num_cpus": 1, "max_ongoing_requests": 64, "max_queued_requests": 2000,
               "routing_stats_period_s": 0.5},
    "ingress": {"num_replicas": 4, "num_cpus": 0, "max_queued_requests": 4000}}'
  timeout 580 python3 benchmarks/bench_serving.py --compare-routers --app-args "$app" --rates ${RATES:-14,28} \
    --num-prompts ${NUM_PROMPTS:-240} --long-input-len 4000 --long-output-len 600 --short-input-len 300 \
    --short-output-len 150 --out "$OUT/scale_h100x4.json" 2>&1 | quiet | tee "$OUT/router.log" | tail -120
  ;;
esac
