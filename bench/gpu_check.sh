#!/bin/bash
# The GPU check of issue #27, one call of ~9.5 minutes (stages capped at 530 s together, plus installing the wheels),
# in order of what matters most, each stage under its own timeout so that a slow one cannot eat the next: CUDA's sync
# detector on the training step (<= 50 s); the benchmark at --size gpu, the first-loss check then 2 alternating rounds
# of minidpo's live, precomputed and prefix-sharing rows and TRL's default and precompute_ref_log_probs rows (20
# warm-up + 50 timed steps each: 10 worker processes of ~20-25 s, <= 300 s; each round's lines are printed as they
# come, the table at the end); a torch.profiler table of one step of minidpo with prefix sharing and of TRL (<= 60 s);
# then the compiled rows, minidpo-compile then trl-compile, one round (compiling takes a minute or more each; <= 120 s,
# what does not finish is cut). Output under $OUT (versions.txt, sync.log, bench.log, profile.log, compile.log), to be
# committed under docs/results/gpu_<machine>_<date>/ with the date, machine and versions.
#
# Before the call, here: bash bench/gpu_wheels.sh (the wheels the device machine lacks, into .whl/, ~19 MB; done on
# 2026-12-04 and left in this checkout, ignored by git), then:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=590)
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
timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k never_waits 2>&1 | tee "$OUT/sync.log"
t bench
timeout 300 python3 bench/bench.py --size gpu --rounds 2 --impl minidpo minidpo-precomputed-ref \
  minidpo-prefix-sharing trl trl-precomputed-ref 2>&1 | tee "$OUT/bench.log"
t profile
timeout 60 python3 bench/bench.py --size gpu --rounds 0 --steps 1 --warmup 3 --impl minidpo-prefix-sharing trl \
  --profile 2>&1 | tee "$OUT/profile.log"
t compile
timeout 120 python3 bench/bench.py --size gpu --rounds 1 --skip-check --impl minidpo-compile trl-compile 2>&1 \
  | tee "$OUT/compile.log"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t done
