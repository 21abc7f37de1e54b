#!/usr/bin/env bash
# Builds the payload that scripts/gpu-check/run.sh installs on a lent GPU machine whose
# image has Python 3.12 and torch 2.11.0+cu130 but no vLLM and no network: the CUDA
# build of vLLM 0.24.0 (the release built for torch 2.11.0), the packages it and the
# node, coordinator and CLI import, and the packaged model's GGUF file. Each device call
# carries at most 64 MiB, so the payload is split into parts of 55 MB (.gpu/p1, .gpu/p2,
# ..., ignored by git), one per call.
# Leaves out what a dense model on one GPU never loads: FlashAttention 2 (Hopper uses
# FA3), the MoE kernels, the Rust front end.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$1" "${@:2}"
}
get "$work/vllm" vllm==0.24.0
(cd "$work/vllm" && unzip -q ./*.whl && rm ./*.whl \
  && rm vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs \
  && tar -cf - vllm vllm-*.dist-info | xz -T0 -6 >"$work/vllm_min.tar.xz")
get "$work/deps" -r scripts/gpu-check/requirements-py312.txt
gguf=$(.venv/bin/python -c 'from node.model_store import PACKAGED_MODELS, packaged_gguf_path
print(packaged_gguf_path(PACKAGED_MODELS["SmolLM2-135M-Instruct"]))')
xz -T0 -6 -c "$gguf" >"$work/model.gguf.xz"
(cd "$work" && tar -cf payload.tar vllm_min.tar.xz model.gguf.xz deps)
rm -rf .gpu && mkdir -p .gpu
split -b 55M -d -a 2 "$work/payload.tar" "$work/part_"
n=0
for part in "$work"/part_*; do
  n=$((n + 1))
  mkdir -p ".gpu/p$n" && mv "$part" ".gpu/p$n/"
done
du -sh .gpu/p*
