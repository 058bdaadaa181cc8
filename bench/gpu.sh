#!/usr/bin/env bash
# GPU figures in one bounded command: extraction images/s of a ViT-B-16 teacher and train
# steps/s of a ViT-T-16 student (cliprd, from the cache), batch 1024, bf16, random init
# (the speed of a model does not depend on its weights). Run from the repository root on a
# CUDA machine with rdkd installed:
#
#     bash bench/gpu.sh                  # IMAGES=8192 STEPS=30 LIMIT_S=480 by default
#
# A CPU smoke test of the script itself: DEVICE=cpu PRECISION=fp32 TEACHER=demo-teacher-vit
# STUDENT=demo-student-vit SIZE=32 BATCH=32 IMAGES=64 STEPS=3 bash bench/gpu.sh
# Prints the machine, both rates and where the logs are. Everything is bounded by LIMIT_S.
set -euo pipefail

IMAGES=${IMAGES:-8192}
STEPS=${STEPS:-30}
LIMIT_S=${LIMIT_S:-480}
WORKERS=${WORKERS:-$(( $(nproc) > 16 ? 16 : $(nproc) ))}
WORK=${WORK:-$(mktemp -d)}
export COLUMNS=200  # one summary line per command
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
TEACHER=${TEACHER:-ViT-B-16}
STUDENT=${STUDENT:-ViT-T-16}
SIZE=${SIZE:-224}
BATCH=${BATCH:-1024}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

timeout "$LIMIT_S" bash -euo pipefail -c "
  # 224 px scenes as an open_clip CSV (PNG), the size a ViT-B-16 teacher reads.
  rdkd demo-data --profile quick --image-size $SIZE --pretrain 0 --test 0 --zeroshot-per-class 0 \
      --train $IMAGES --train-format csv --workers $WORKERS --out $WORK/data > $WORK/data.log
  rdkd extract-teacher --data $WORK/data/train/train.csv --model $TEACHER \
      --batch-size $BATCH --precision $PRECISION --workers $WORKERS --device $DEVICE --no-progress \
      --out $WORK/cache 2>&1 | tee $WORK/extract.log
  rdkd train-student --data $WORK/data/train/train.csv --cache $WORK/cache --student $STUDENT \
      --loss cliprd --steps $STEPS --batch-size $BATCH --precision $PRECISION --workers $WORKERS \
      --device $DEVICE --save-every 100000 --no-progress --out $WORK/student 2>&1 | tee $WORK/train.log
"

python - "$WORK" <<'EOF'
import json, statistics, sys
from pathlib import Path

work = Path(sys.argv[1])
rows = [json.loads(line) for line in (work / "student/logs/metrics.jsonl").read_text().splitlines()]
rates = [r["samples_per_s"] for r in rows[len(rows) // 3:]]  # steady state: drop the first third
print(f"extraction: {(work / 'extract.log').read_text().strip().splitlines()[-1]}")
batch = json.loads((work / "student/run.json").read_text()).get("global_batch", 1024)
print(f"train-student cliprd: median {statistics.median(rates):.0f} samples/s "
      f"= {statistics.median(rates) / batch:.2f} steps/s over steps {len(rows) - len(rates) + 1}..{len(rows)}")
print(f"logs: {work}")
EOF
