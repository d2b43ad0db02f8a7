#!/usr/bin/env bash
# One device-tool call on a 4 x H100 machine: installs the wheels sent along (.whl/: Ray Serve + pyzmq, see
# ../shared/tools/gpu-ray-wheels.sh and benchmarks/gpu_wheels.sh; .whl-fi/: FlashInfer, see
# ../shared/tools/gpu-flashinfer-wheels.sh; the two do not fit one call), then runs a stage, logs under $OUT.
#   suite:  GPU 2 the GPU stress suite (then the prefix benchmark, engine mode); GPU 3 bench_load.py;
#           GPUs 0-1 bench_served_vs_offline.py (1 replica, then 2; INGRESS_REPLICAS, 4 as serve_config.gpu.yaml)
#           -- the four in parallel.
#   served: (with .whl) the served path against the offline engine, on the app's Serve data path (HAProxy ingress,
#           throughput-optimized mode) on GPUs 0-1 beside Serve's default proxy on GPUs 2-3, in parallel.
#   single: (with .whl-fi, 1 GPU) bench_prefix alone, then the stress cases and tests/kvcache.
#   shards: the GPU stress suite, one test directory per GPU, in parallel.
#   router: bench_serving.py --compare-routers, LAYOUT=4x1 (4 replicas x TP=1) or 2x2 of dummy:llama-3-8b,
#           several Poisson rates (RATES, NUM_PROMPTS).
#   tp4:    (with .whl, 4 GPUs) the stress suite (SUITE=0: not), the TP GPU tests (TP_TEST=0: not), ALLREDUCE=1
#           bench_allreduce.py, then bench_tp.py at TP=1, 2, 4 (TP_SIZES, TP_ARGS, TP_NAME).
#   scaleout2: (with .whl, 2 GPUs) the stress cases, bench_tp.py, bench_resilience.py (see the stage).
#   check1: (with .whl, 1 GPU) the GPU suite on the card, then an engine core stalled under load (stall_engine).
#   check2: (with .whl, 2 GPUs) the stress suite, the 2-GPU TP tests, then a TP worker killed under load.
#   scaleout4: (with .whl, 4 GPUs) the stress suite, then bench_resilience.py on 4 cards (see the stage).
#   slots:  (with .whl-fi, 1 GPU) the GPU tests of one card (SUITE_S), then --layouts at default slots and 256.
#   validate2: (with .whl-fi) a change of the step loop or cache within one call on 2 GPUs: the stress cases and
#           tests/kvcache, then the layouts.
#   diag:   (with .whl-fi) decode kernels at a few points, graph-timed; the step loop under cProfile.
#   final:  (with .whl-fi) the GPU suite, then the kernel and engine figures, on 4 or 2 GPUs (see below).
#   prefix: (with .whl-fi) the GPU suite, then bench_prefix alone.
set -uo pipefail
stage=$1
# The device's copy of .git can lag the working tree it runs: the results name the commit passed here.
export VATTN_COMMIT=${VATTN_COMMIT:?pass VATTN_COMMIT=<the commit of the tree sent>}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
wheels=$(ls .whl/*.whl .whl-fi/*.whl 2>/dev/null)
[ -n "$wheels" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site $wheels
export PYTHONPATH=/tmp/site:$(pwd):${PYTHONPATH:-} RAY_AUTH_MODE=disabled MAX_JOBS=${MAX_JOBS:-16}
python3 -c "import ray.dashboard.optional_deps" 2>&1 | tail -1 | sed 's/^/metrics agent deps: /'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpus.txt"
quiet() { grep -v -e ' INFO ' -e 'Loading' -e '^\s*$'; }
gpu_suite() {  # GPU, log name, pytest arguments
  local gpu=$1 name=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --timeout 250 \
    --durations=5 "$@" > "$OUT/gpu_suite_$name.log" 2>&1
  echo "rc=$?" >> "$OUT/gpu_suite_$name.log"
}
prefix_bench() {  # GPU, timeout: bench_prefix (engine mode), its file (named after the card) copied to $OUT
  CUDA_VISIBLE_DEVICES=$1 timeout "$2" python3 benchmarks/bench_prefix.py --mode engine --device cuda \
    --model dummy:llama-3-8b > "$OUT/prefix.log" 2>&1
  cp "$(grep -o 'wrote .*\.json' "$OUT/prefix.log" | cut -d' ' -f2)" "$OUT/" 2>/dev/null
}
served_bench() {  # GPUs, name, HTTP port, env assignments: bench_served_vs_offline.py, 1 then 2 replicas
  local gpus=$1 name=$2 port=$3
  shift 3
  env "$@" CUDA_VISIBLE_DEVICES=$gpus timeout ${SERVED_TIMEOUT:-560} python3 benchmarks/bench_served_vs_offline.py \
    --device cuda --model dummy:llama-3-8b --num-replicas 1,2 --ingress-replicas ${INGRESS_REPLICAS:-4} \
    --engine-kwargs '{"max_batch_size": 256, "kv_cache_memory_fraction": 0.85, "max_num_batched_tokens": 8192, "max_seq_len": 8192}' \
    --num-prompts 300 --long-input-len 4000 --long-output-len 600 --short-input-len 300 --short-output-len 150 \
    --http-port "$port" --out "$OUT/served_vs_offline_$name.json" 2>&1 | quiet > "$OUT/served_$name.log"
}
suite_shards() {
  # The GPU stress suite split over the GPUs in parallel (~150 s on 4, ~200 s with FlashInfer compiling; ~250 s on
  # one), balanced by the durations of a full run: the stress cases of tests/gpu spread out, the rest beside them.
  if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    (gpu_suite 0 stress_a tests/gpu -k "tm-graphs-async-0.5GiB"; gpu_suite 0 kvcache tests/kvcache) &
    (gpu_suite 1 stress_b tests/gpu -k "lm-eager-async or tm-graphs-async-2GiB"; gpu_suite 1 benchmarks tests/benchmarks) &
    gpu_suite 2 stress_c tests/gpu -k "tm-eager-sync or lm-graphs-sync or 100k" &
    gpu_suite 3 engine tests/engine &
  else
    (gpu_suite 0 stress_ab tests/gpu -k "tm-graphs-async-0.5GiB or lm-eager-async or tm-graphs-async-2GiB"
     gpu_suite 0 kvcache tests/kvcache) &
    (gpu_suite 1 engine tests/engine; gpu_suite 1 stress_c tests/gpu -k "tm-eager-sync or lm-graphs-sync or 100k"
     gpu_suite 1 benchmarks tests/benchmarks) &
  fi
  wait
  for f in "$OUT"/gpu_suite_*.log; do echo "$(basename "$f"): $(grep -E ' (passed|failed)' "$f" | tail -1)"; done
}
case $stage in
suite)
  (
    CUDA_VISIBLE_DEVICES=2 timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --timeout 200 \
      tests/gpu tests/engine tests/kvcache tests/benchmarks > "$OUT/gpu_suite.log" 2>&1
    echo "suite rc=$?" >> "$OUT/gpu_suite.log"
    prefix_bench 2 230
  ) &
  (
    CUDA_VISIBLE_DEVICES=3 timeout 560 python3 benchmarks/bench_load.py --dir /tmp/vattn_bench_load \
      > "$OUT/load_h100.log" 2>&1
    cp benchmarks/results/load_h100.json "$OUT/" 2>/dev/null
  ) &
  served_bench 0,1 h100 8012
  wait
  tail -5 "$OUT/gpu_suite.log"; grep -v INFO "$OUT/prefix.log" 2>/dev/null | tail -8; tail -12 "$OUT/load_h100.log"
  tail -40 "$OUT/served_h100.log"
  ;;
served)
  # (with .whl) bench_served_vs_offline.py twice at once on the same requests: GPUs 0-1 on the app's data path
  # (deployments/serve_mode.py: Serve's HAProxy ingress and throughput-optimized mode), GPUs 2-3 through Serve's
  # default Python proxy; 1 engine replica, then 2, each.
  served_bench 0,1 h100 8012 &
  served_bench 2,3 h100_serve_proxy 8013 RAY_SERVE_ENABLE_HA_PROXY=0 RAY_SERVE_THROUGHPUT_OPTIMIZED=0 &
  wait
  for f in "$OUT"/served_h100*.log; do echo "== $f"; grep -A3 -e '^served/offline' -e '^=* offline' "$f"; done
  ;;
shards)
  suite_shards
  ;;
final)
  # The GPU suite and the kernel and engine figures on one commit (a GPU figure counts only beside a passing suite):
  # the shards stage, then GPU 0 bench_attention.py, GPU 1 --layouts token_major,paged and, on 4 GPUs, GPU 2
  # --layouts token_major_fa2,paged_gather, GPU 3 bench_prefix.py (engine mode).
  python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1
  ngpu=$(nvidia-smi -L | wc -l)
  suite_shards
  left=$((${DEADLINE_S:-530} - SECONDS)); [ "$left" -lt 30 ] && left=30
  (
    CUDA_VISIBLE_DEVICES=0 timeout $left python3 benchmarks/bench_attention.py --budget-s 30 \
      > "$OUT/attention_h100.log" 2>&1
    cp benchmarks/results/attention_h100.json benchmarks/results/attention_*.png "$OUT/" 2>/dev/null
  ) &
  (
    CUDA_VISIBLE_DEVICES=1 timeout $left python3 benchmarks/bench_engine_gpu.py --layouts \
      --engines token_major,paged --name engine_layouts_h100 > "$OUT/engine_layouts_h100.log" 2>&1
    cp benchmarks/results/engine_layouts_h100.json "$OUT/" 2>/dev/null
  ) &
  if [ "$ngpu" -ge 4 ]; then
    (
      CUDA_VISIBLE_DEVICES=2 timeout $left python3 benchmarks/bench_engine_gpu.py --layouts \
        --engines token_major_fa2,paged_gather --name engine_layouts_more_h100 \
        > "$OUT/engine_layouts_more_h100.log" 2>&1
      cp benchmarks/results/engine_layouts_more_h100.json "$OUT/" 2>/dev/null
    ) &
    prefix_bench 3 "$left" &
  fi
  wait
  tail -40 "$OUT/attention_h100.log"; tail -n 4 "$OUT"/engine_layouts*_h100.log; grep -v INFO "$OUT/prefix.log" 2>/dev/null | tail -8
  ;;
prefix)
  # (with .whl-fi, 4 GPUs) The GPU suite, then bench_prefix (engine mode) alone on GPU 0, so its timings share the
  # host with nothing else; the file is named after the card (prefix_h100, prefix_h200). EXTRA: a command run on
  # GPU 3 once the suite's engine shard there is done, beside the other shards (a diagnosis, e.g.
  # "python3 benchmarks/sweep_prefix_admission.py").
  if [ -n "${EXTRA:-}" ]; then
    (sleep "${EXTRA_AFTER_S:-200}"; CUDA_VISIBLE_DEVICES=3 timeout 200 bash -c "$EXTRA" > "$OUT/extra.log" 2>&1) &
  fi
  suite_shards
  prefix_bench 0 200
  wait
  grep -v INFO "$OUT/prefix.log" | tail -8; grep -A1 "^x" "$OUT/extra.log" 2>/dev/null | cut -c1-200
  ;;
single)
  # (with .whl-fi, 1 GPU) bench_prefix alone on the host, then the stress cases and tests/kvcache in the time left
  # (DEADLINE_S): the prefix figures and a suite pass where only one card (an H100) comes.
  prefix_bench 0 240
  left=$((${DEADLINE_S:-520} - SECONDS))
  [ "$left" -gt 60 ] && CUDA_VISIBLE_DEVICES=0 timeout $left python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
    --timeout 250 tests/kvcache tests/gpu > "$OUT/gpu_suite_single.log" 2>&1
  echo "rc=$?" >> "$OUT/gpu_suite_single.log"
  grep -v INFO "$OUT/prefix.log" | tail -8; tail -3 "$OUT/gpu_suite_single.log"
  ;;
slots)
  # (with .whl-fi, 1 GPU) batch slots sized from the pool: the new GPU tests, the stress cases and tests/kvcache
  # (within SUITE_S), then the decode-heavy and default workloads on ENGINES with slots sized from the pool (1024)
  # and at 256, one after the other in this call.
  if [ "${SUITE_S:-400}" -gt 0 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout ${SUITE_S:-400} python3 -m pytest -q -m gpu -p no:cacheprovider -rfE \
      --timeout 250 --durations=8 tests/kvcache tests/gpu tests/engine/test_llm_engine.py \
      tests/benchmarks/test_paged_kv.py > "$OUT/gpu_suite_slots.log" 2>&1
    echo "rc=$?" >> "$OUT/gpu_suite_slots.log"
    tail -4 "$OUT/gpu_suite_slots.log"
  fi
  for slots in ${SLOTS:-0 256}; do
    left=$((${DEADLINE_S:-560} - SECONDS)); [ "$left" -lt 30 ] && break
    CUDA_VISIBLE_DEVICES=0 timeout $left python3 benchmarks/bench_engine_gpu.py --layouts --max-batch-size $slots \
      --engines ${ENGINES:-token_major,paged} --name engine_slots_${slots} > "$OUT/engine_slots_$slots.log" 2>&1
    cp benchmarks/results/engine_slots_$slots.json "$OUT/" 2>/dev/null
    grep -E "^(token_major|paged)" "$OUT/engine_slots_$slots.log" | cut -c1-260
  done
  ;;
scaleout2)
  # (with .whl, 2 GPUs) what 2 GPUs allow of the scale-out issue: the stress cases and tests/kvcache split over both
  # cards, then bench_tp.py (TP=2 vs TP=1, with the host time of each part of the step), then bench_resilience.py
  # (autoscaling 1 -> 2 replicas, a replica killed, a TP worker killed, all under load over HTTP), within DEADLINE_S.
  # All of it takes ~11 min (suite 80 s, bench_tp ~250 s, the scenarios ~100 + 70 + 120 s): split it over two calls
  # with TP_S=0 (no bench_tp) and SCENARIOS=... .
  (gpu_suite 0 stress_ab tests/gpu -k "tm-graphs-async-0.5GiB or lm-eager-async or tm-graphs-async-2GiB"
   gpu_suite 0 kvcache tests/kvcache) &
  gpu_suite 1 stress_c tests/gpu -k "tm-eager-sync or lm-graphs-sync or 100k" &
  wait
  for f in "$OUT"/gpu_suite_*.log; do echo "$(basename "$f"): $(grep -E ' (passed|failed)' "$f" | tail -1)"; done
  if [ "${TP_S:-260}" -gt 0 ]; then
    timeout ${TP_S:-260} python3 benchmarks/bench_tp.py --skip-correctness --skip-serve --name tp_h200x2 \
      > "$OUT/tp.log" 2>&1
    cp benchmarks/results/tp_h200x2.json "$OUT/" 2>/dev/null
    grep -v INFO "$OUT/tp.log" | tail -8
  fi
  left=$((${DEADLINE_S:-560} - SECONDS)); [ "$left" -lt 60 ] && left=60
  timeout $left python3 benchmarks/bench_resilience.py --device cuda --model dummy:llama-3-8b \
    --scenarios ${SCENARIOS:-kill_tp_worker,kill_replica,autoscale} --num-cpus 16 \
    --engine-kwargs '{"max_batch_size": 64, "max_seq_len": 4096, "kv_cache_memory_bytes": 6442450944}' \
    --input-len 512 --output-len 256 --concurrency 48 --target-ongoing-requests 16 --max-ongoing-requests 64 \
    --out "$OUT/resilience_h200x2.json" > "$OUT/resilience.log" 2>&1
  grep -E "^(==|  (PASS|FAIL))" "$OUT/resilience.log"
  ;;
check1)
  # (with .whl, 1 GPU) a change of the engine or served path within one call: the GPU suite on the card, then
  # bench_resilience.py's stall_engine (the engine core stopped under load; the watchdog at STEP_TIMEOUT_S).
  gpu_suite 0 all tests/gpu tests/engine tests/kvcache tests/benchmarks
  echo "gpu_suite_all.log: $(grep -E ' (passed|failed)' "$OUT/gpu_suite_all.log" | tail -1)"
  left=$((${DEADLINE_S:-570} - SECONDS)); [ "$left" -lt 60 ] && left=60
  timeout $left python3 benchmarks/bench_resilience.py --device cuda --model dummy:llama-3-8b \
    --scenarios stall_engine --num-replicas 1 --num-cpus 16 \
    --engine-kwargs '{"max_batch_size": 64, "max_seq_len": 4096, "kv_cache_memory_bytes": 6442450944, "step_timeout_s": '${STEP_TIMEOUT_S:-10}'}' \
    --input-len 512 --output-len 256 --concurrency 32 --max-ongoing-requests 64 \
    --out "$OUT/resilience_stall_h200.json" > "$OUT/resilience.log" 2>&1
  grep -E "^(==|  (PASS|FAIL))" "$OUT/resilience.log"
  ;;
check2)
  # (with .whl, 2 GPUs) a change of the TP or served path within one call: the GPU stress suite over both cards, the
  # 2-GPU TP tests (tests/deployments/test_tp_workers.py), then bench_resilience.py's SCENARIOS (kill_tp_worker).
  # SUITE=0: not the suite (it passed on the same engine code in an earlier call).
  [ "${SUITE:-1}" = 1 ] && suite_shards
  timeout ${TP_TEST_S:-240} python3 -X faulthandler -m pytest -q -m gpu -p no:cacheprovider -rfE --timeout 200 \
    -o faulthandler_timeout=180 tests/deployments/test_tp_workers.py > "$OUT/gpu_suite_tp_workers.log" 2>&1
  echo "rc=$?" >> "$OUT/gpu_suite_tp_workers.log"
  echo "gpu_suite_tp_workers.log: $(grep -E ' (passed|failed)' "$OUT/gpu_suite_tp_workers.log" | tail -1)"
  left=$((${DEADLINE_S:-570} - SECONDS)); [ "$left" -lt 60 ] && left=60
  timeout $left python3 benchmarks/bench_resilience.py --device cuda --model dummy:llama-3-8b \
    --scenarios ${SCENARIOS:-kill_tp_worker} --num-cpus 16 \
    --engine-kwargs '{"max_batch_size": 64, "max_seq_len": 4096, "kv_cache_memory_bytes": 6442450944}' \
    --input-len 512 --output-len 256 --concurrency 48 --target-ongoing-requests 16 --max-ongoing-requests 64 \
    --out "$OUT/resilience_h200x2.json" > "$OUT/resilience.log" 2>&1
  grep -E "^(==|  (PASS|FAIL))" "$OUT/resilience.log"
  ;;
scaleout4)
  # (with .whl, 4 GPUs) the scale-out issue's replicas coming and going on 4 cards, under load over HTTP: autoscaling
  # 1 -> 4 replicas and back, a replica of 4 killed, a TP worker of one of 2 TP=2 replicas killed (SCENARIOS), with
  # the stress suite first (SUITE=0: not), within DEADLINE_S. The scenarios take ~6 min together.
  [ "${SUITE:-1}" = 1 ] && suite_shards
  left=$((${DEADLINE_S:-570} - SECONDS)); [ "$left" -lt 60 ] && left=60
  timeout $left python3 benchmarks/bench_resilience.py --device cuda --model dummy:llama-3-8b \
    --scenarios ${SCENARIOS:-autoscale,kill_replica,kill_tp_worker} --num-cpus 32 \
    --engine-kwargs '{"max_batch_size": 64, "max_seq_len": 4096, "kv_cache_memory_bytes": 6442450944}' \
    --num-replicas 4 --tensor-parallel-size 2 --num-replicas-tp 2 --max-replicas 4 \
    --input-len 512 --output-len 256 --concurrency 96 --target-ongoing-requests 16 --max-ongoing-requests 64 \
    --out "$OUT/resilience_h200x4.json" > "$OUT/resilience.log" 2>&1
  grep -E "^(==|  (PASS|FAIL))" "$OUT/resilience.log"
  ;;
validate2)
  # On 2 GPUs within one call: GPU 0 the stress cases a and b and tests/kvcache, GPU 1 stress case c then
  # --layouts token_major,paged (tests/engine and tests/benchmarks are left to the shards stage).
  (gpu_suite 0 stress_ab tests/gpu -k "tm-graphs-async-0.5GiB or lm-eager-async or tm-graphs-async-2GiB"
   gpu_suite 0 kvcache tests/kvcache) &
  (
    gpu_suite 1 stress_c tests/gpu -k "tm-eager-sync or lm-graphs-sync or 100k"
    left=$((${DEADLINE_S:-470} - SECONDS)); [ "$left" -lt 30 ] && left=30
    CUDA_VISIBLE_DEVICES=1 timeout $left python3 benchmarks/bench_engine_gpu.py --layouts \
      --engines token_major,paged --name engine_layouts_h100 > "$OUT/engine_layouts_h100.log" 2>&1
    cp benchmarks/results/engine_layouts_h100.json "$OUT/" 2>/dev/null
  ) &
  wait
  for f in "$OUT"/gpu_suite_*.log; do echo "$(basename "$f"): $(grep -E ' (passed|failed)' "$f" | tail -1)"; done
  tail -3 "$OUT/engine_layouts_h100.log"
  ;;
diag)
  # Where time goes, on 2 GPUs (with .whl-fi): GPU 0 bench_attention.py at POINTS (decode only, graph-timed, host
  # launch time beside), GPU 1 profile_step_loop.py on the decode-heavy workload (token_major, then paged).
  (
    CUDA_VISIBLE_DEVICES=0 timeout ${DIAG_TIMEOUT:-420} python3 benchmarks/bench_attention.py \
      --decode-points "${POINTS:-1x1024,1x16384,8x1024,8x4096,32x1024,64x1024,256x4096}" \
      --name attention_diag_h100 > "$OUT/attention_diag_h100.log" 2>&1
    cp benchmarks/results/attention_diag_h100.json "$OUT/" 2>/dev/null
  ) &
  CUDA_VISIBLE_DEVICES=1 timeout ${DIAG_TIMEOUT:-420} python3 benchmarks/profile_step_loop.py --requests 512 \
    --input-len 256 --output-len 1024 --top 45 > "$OUT/profile_step_loop_h100.log" 2>&1
  wait
  tail -20 "$OUT/attention_diag_h100.log"; grep -A45 '^== ' "$OUT/profile_step_loop_h100.log" | cut -c1-150
  ;;
tp4)
  # (with .whl, 4 GPUs) the GPU stress suite over the 4 cards, the tensor-parallel GPU test (2 cards), then
  # bench_tp.py: TP=1, 2 and 4 (TP_SIZES) of dummy:llama-3-8b, greedy tokens in float32 and 64 x 512/128 throughput
  # with the host time of the step's parts (TP_ARGS adds or skips parts), within DEADLINE_S.
  [ "${SUITE:-1}" = 1 ] && suite_shards
  if [ "${TP_TEST:-1}" = 1 ]; then
    gpu_suite 0,1 tp tests/deployments/test_tp_workers.py
    echo "gpu_suite_tp.log: $(grep -E ' (passed|failed|skipped)' "$OUT/gpu_suite_tp.log" | tail -1)"
  fi
  if [ "${ALLREDUCE:-0}" = 1 ]; then  # all-reduce latency at the step's sizes: NCCL vs peer memory, 2 and 4 GPUs
    timeout 180 python3 benchmarks/bench_allreduce.py --world-sizes 2,4 > "$OUT/allreduce.log" 2>&1
    tail -16 "$OUT/allreduce.log"
  fi
  name=${TP_NAME:-tp_h200x4}
  left=$((${DEADLINE_S:-570} - SECONDS)); [ "$left" -lt 60 ] && left=60
  timeout $left python3 benchmarks/bench_tp.py --tp-sizes ${TP_SIZES:-2,4} --check-dtype float32 \
    ${TP_ARGS:---skip-serve} --name "$name" > "$OUT/$name.log" 2>&1
  cp "benchmarks/results/$name.json" "$OUT/" 2>/dev/null
  grep -v -e INFO -e Warning "$OUT/$name.log" | tail -14
  ;;
router)
  # LAYOUT=4x1: 4 replicas x TP=1; 2x2: 2 replicas x TP=2; deployments/configs/h100x4_router.yaml otherwise.
  layout=${LAYOUT:-4x1}
  replicas=${layout%x*} tp=${layout#*x}
  # NUM_GPUS=0.5: two replicas share each card (routing on one GPU); ROUTERS: bench_serving.py's --routers.
  override='{"tensor_parallel_size": '$tp', "engine": {"num_replicas": '$replicas', "num_gpus": '${NUM_GPUS:-1}'}}'
  timeout ${ROUTER_TIMEOUT:-580} python3 benchmarks/bench_serving.py --compare-routers \
    --routers "${ROUTERS:-page_aware,power_of_two}" \
    --app-args deployments/configs/h100x4_router.yaml --app-override "$override" \
    --rates ${RATES:-8,16,24} --num-prompts ${NUM_PROMPTS:-200} --long-input-len 4000 --long-output-len 600 \
    --short-input-len 300 --short-output-len 150 --out "$OUT/scale_h100x4_$layout.json" 2>&1 | quiet \
    | tee "$OUT/router_$layout.log" | grep -v -e '^Preemptions by' -e '^Requests by' | tail -150
  ;;
esac
# The device tool brings back a few files only: the logs travel as one archive, the result JSONs and plots as they are.
(
  cd "$OUT" || exit
  logs=$(ls *.log *.txt gpu_stress.json 2>/dev/null)
  # One archive per run of this script: a second stage in the same call keeps the first one's logs.
  name=logs.tgz n=1
  while [ -e "$name" ]; do n=$((n + 1)); name=logs$n.tgz; done
  [ -n "$logs" ] && tar czf /tmp/logs.tgz $logs && rm -f $logs && mv /tmp/logs.tgz "$name"
)
