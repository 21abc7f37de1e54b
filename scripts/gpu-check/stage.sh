#!/usr/bin/env bash
# On the GPU machine: move the payload part this call carried (.gpu/pN) out of the
# working tree, where it stays while the machine is held.
set -euo pipefail
mkdir -p /root/stash
mv .gpu/p*/part_* /root/stash/
ls -l /root/stash
