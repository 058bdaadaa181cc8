#!/usr/bin/env bash
# P8 GPU feed (issue #10), one bounded command: are extract-teacher and train-student as fast
# as their models? In its own work folder it measures
#   1. the bare models on random device tensors (bench/bare.py): the ViT-T-16 cliprd training
#      step at batch 256 and 1024, the ViT-B-16 image + text forward at the same batches;
#   2. rdkd demo-data: IMAGES (50,000) 224 px PNG scenes as an open_clip CSV;
#   3. rdkd extract-teacher: ViT-B-16 (random init) over them, batch 1024;
#   4. rdkd train-student: ViT-T-16, cliprd, from that cache, batch 256 (60 steps) and 1024
#      (40 steps, its peak host memory (PSS + shared memory) watched by bench/train_feed.py),
#      a log record every 10 steps; then, if time is left, batch 1024 with --compile;
#   5. the web regime (issue #16), when PHOTOS names the folder `bench/photos.py make` wrote
#      (carry it: scikit-image is not needed there): its web photos tiled into WEB_IMAGES
#      (20,000) samples, then for each of WEB_DECODES ("workers device") extract-teacher and
#      train-student at the largest batch on them, with --preprocess $WEB_PREPROCESS (fast;
#      the student follows the cache) and that --decode, each also run small first for the
#      marginal host CPU per sample (SCENES=0 skips stages 2-4 for a run of the web regime alone);
# and prints (bench/gpu_summary.py) extraction steady img/s / bare forward img/s, train
# samples/s (log intervals after the first) / bare step samples/s, the data-wait share, peak
# GPU memory and the targets (>= 0.85 each). bf16 on CUDA; models random-init (the speed of a
# model does not depend on its weights). Each stage has a time cap and all of it LIMIT_S
# (450 s); a stage that fails or runs out of time is reported and the rest still runs.
#
#     bash bench/gpu.sh                       # on a CUDA machine with rdkd installed
#     OUT=DIR bash bench/gpu.sh               # also: summary.json, bare.jsonl, logs.txt, metrics in DIR
#
# On a machine without a registry, install first: bash bench/device_setup.sh (see BENCHMARKS.md, P8).
# CPU smoke test of the script itself (3-5 minutes on 2 busy cores):
#   DEVICE=cpu PRECISION=fp32 TEACHER=demo-teacher-vit STUDENT=demo-student-vit SIZE=32 IMAGES=300 \
#   EXTRACT_BATCH=64 TRAIN_BATCHES="16 32" TRAIN_STEPS="6 4" LOG_EVERY=2 WORKERS=2 COMPILE_STEPS=0 \
#   BARE_ARGS="--warmup 1 --steps 2 --repeats 2" bash bench/gpu.sh
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
IMAGES=${IMAGES:-50000}
SIZE=${SIZE:-224}
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
TEACHER=${TEACHER:-ViT-B-16}
STUDENT=${STUDENT:-ViT-T-16}
EXTRACT_BATCH=${EXTRACT_BATCH:-1024}
TRAIN_BATCHES=${TRAIN_BATCHES:-256 1024}
TRAIN_STEPS=${TRAIN_STEPS:-60 40}
LOG_EVERY=${LOG_EVERY:-10}
COMPILE_STEPS=${COMPILE_STEPS:-40}  # train-student --compile at the largest batch; 0: not run
PHOTOS=${PHOTOS:-}  # bench/photos.py make's folder: the web-regime stages run when set
WEB_IMAGES=${WEB_IMAGES:-20000}
WEB_PREPROCESS=${WEB_PREPROCESS:-fast}
WEB_DECODES=${WEB_DECODES:-workers device}
SCENES=${SCENES:-1}  # 0: skip the PNG-scene stages 2-4 (a web-regime run: bare models, then 5)
WORKERS=${WORKERS:-$(( $(nproc) > 16 ? 16 : $(nproc) ))}
BARE_ARGS=${BARE_ARGS:-}
LIMIT_S=${LIMIT_S:-$([ -n "$PHOTOS" ] && echo 560 || echo 450)}  # 560 with the web regime: under a 600 s call
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/rdkd-gpu-XXXXXX")}
RESULTS=${OUT:-$WORK/results}
export COLUMNS=200 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # one summary line per stage; no Hub look-ups
PY=${PYTHON:-python3}
export DEVICE PRECISION TEACHER STUDENT IMAGES SIZE WORKERS EXTRACT_BATCH TRAIN_BATCHES TRAIN_STEPS LOG_EVERY \
    COMPILE_STEPS LIMIT_S PHOTOS WEB_IMAGES WEB_PREPROCESS WEB_DECODES  # recorded in machine.json
read -r -a batches <<< "$TRAIN_BATCHES"
read -r -a steps <<< "$TRAIN_STEPS"
command -v rdkd >/dev/null || { echo "error: rdkd is not on PATH (bash bench/device_setup.sh)" >&2; exit 2; }
[ ${#batches[@]} -eq ${#steps[@]} ] || { echo "error: TRAIN_BATCHES and TRAIN_STEPS differ in length" >&2; exit 2; }
mkdir -p "$WORK" "$RESULTS"
deadline=$(( SECONDS + LIMIT_S ))

# CPU seconds (user + system) of this shell's finished children, from `times` written to a
# file (a command substitution would run it in a subshell, which has no children): a stage's
# host CPU, its DataLoader workers included, is the difference around it.
children_cpu() {
  awk 'NR == 2 { split($1, u, "m"); split($2, s, "m"); printf "%.3f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$1"
}

# run_stage NAME CAP_S COMMAND...: COMMAND bounded by min(CAP_S, time left), output in
# $WORK/NAME.log, one record in $WORK/stages.jsonl, one line here.
run_stage() {
  local name=$1 cap=$2 left limit start rc
  shift 2
  left=$(( deadline - SECONDS ))
  limit=$(( cap < left ? cap : left ))
  if (( limit < 15 )); then
    echo "{\"stage\": \"$name\", \"skipped\": true, \"seconds\": 0, \"rc\": null}" >> "$WORK/stages.jsonl"
    echo "[$name] skipped: ${left} s of the ${LIMIT_S} s left"
    return 1
  fi
  start=$SECONDS
  times > "$WORK/.times-before"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  times > "$WORK/.times-after"
  cpu=$(awk -v a="$(children_cpu "$WORK/.times-before")" -v b="$(children_cpu "$WORK/.times-after")" \
      'BEGIN{printf "%.2f", b - a}')
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $(( SECONDS - start )), \"cpu_s\": $cpu, \"limit_s\": $limit, \"timed_out\": $([ $rc -eq 124 ] && echo true || echo false)}" >> "$WORK/stages.jsonl"
  echo "[$name] rc $rc in $(( SECONDS - start )) s (limit $limit s): $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300)"
  return $rc
}

# the machine
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | sed 's/^ *//')
torch_line=$("$PY" -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda)" 2>&1 | tail -n 1)
commit=${RDKD_COMMIT:-$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "machine: ${gpu:-no GPU}; $(nproc) CPUs ($cpu); $(free -g 2>/dev/null | awk '/Mem:/{print $2 " GiB RAM"}'); \
/dev/shm $(df -h /dev/shm 2>/dev/null | awk 'NR==2{print $4 " free"}'); torch $torch_line; rdkd $commit"
echo "work folder: $WORK; results: $RESULTS; limit ${LIMIT_S} s"
GPU=${gpu:-none} CPU=$cpu CPUS=$(nproc) TORCH=$torch_line COMMIT=$commit "$PY" -c '
import json, os, sys
env = os.environ
keys = ("DEVICE", "PRECISION", "TEACHER", "STUDENT", "IMAGES", "SIZE", "WORKERS", "EXTRACT_BATCH",
        "TRAIN_BATCHES", "TRAIN_STEPS", "LOG_EVERY", "COMPILE_STEPS", "LIMIT_S", "PHOTOS", "WEB_IMAGES",
        "WEB_PREPROCESS", "WEB_DECODES")
record = {"gpu": env["GPU"], "cpu": env["CPU"], "cpus": int(env["CPUS"]), "torch": env["TORCH"],
          "rdkd_commit": env["COMMIT"], **{k.lower(): env[k] for k in keys}}
for k in ("images", "size", "workers", "extract_batch", "log_every", "compile_steps", "limit_s", "web_images"):
    record[k] = int(record[k])
json.dump(record, open(sys.argv[1], "w"), indent=1)
' "$WORK/machine.json"

# 1. bare models, first, on an idle machine
bare_batches=$(printf '%s\n' "${batches[@]}" "$EXTRACT_BATCH" | sort -n -u | paste -sd, -)
run_stage bare 150 "$PY" "$HERE/bare.py" --device "$DEVICE" --precision "$PRECISION" --student "$STUDENT" \
    --teacher "$TEACHER" --batches "$bare_batches" $BARE_ARGS
grep '^{' "$WORK/bare.log" > "$WORK/bare.jsonl"

if (( SCENES )); then
# 2. data: PNG scenes as an open_clip CSV (what the issue measured)
run_stage demo-data 150 rdkd demo-data --profile quick --image-size "$SIZE" --pretrain 0 --test 0 \
    --zeroshot-per-class 0 --train "$IMAGES" --train-format csv --workers "$WORKERS" --out "$WORK/data"

# 3. the teacher, once
run_stage extract 200 rdkd extract-teacher --data "$WORK/data/train/train.csv" --model "$TEACHER" \
    --batch-size "$EXTRACT_BATCH" --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" \
    --no-progress --out "$WORK/cache"

# 4. the student from the cache, at each batch; then --compile at the largest, with what is left
train() {  # train NAME BATCH STEPS CAP [extra options]; the largest batch under the memory watch
  local name=$1 batch=$2 steps=$3 cap=$4 watch=()
  shift 4
  [ "$batch" = "${batches[-1]}" ] && [ "$name" = "train-$batch" ] && watch=("$PY" "$HERE/train_feed.py" watch --)
  run_stage "$name" "$cap" "${watch[@]}" rdkd train-student --data "$WORK/data/train/train.csv" --cache "$WORK/cache" \
      --student "$STUDENT" --loss cliprd --steps "$steps" --batch-size "$batch" --precision "$PRECISION" \
      --workers "$WORKERS" --device "$DEVICE" --log-every "$LOG_EVERY" --save-every 100000 --no-progress \
      --out "$WORK/$name" "$@"
}
for i in "${!batches[@]}"; do
  train "train-${batches[$i]}" "${batches[$i]}" "${steps[$i]}" 150
done
if (( COMPILE_STEPS > 0 )); then
  largest=${batches[-1]}
  if (( deadline - SECONDS >= 100 )); then
    train "train-$largest-compile" "$largest" "$COMPILE_STEPS" 240 --compile
  else
    echo "[train-$largest-compile] not run: $(( deadline - SECONDS )) s left (needs 100)"
  fi
fi
fi  # SCENES

# 5. the web regime: real-photo JPEGs (bench/photos.py), extraction and the largest batch. Each
#    stage also runs small first (a fifth of the images, a quarter of the steps): the host CPU
#    per sample is the difference of the two over the difference of their samples, start-up out.
if [ -n "$PHOTOS" ]; then
  largest=${batches[-1]}
  for size in small full; do
    [ "$size" = small ] && count=$(( WEB_IMAGES / 5 ))
    [ "$size" = full ] && count=$WEB_IMAGES
    run_stage "web-data-$size" 60 "$PY" "$HERE/photos.py" tile --data "$PHOTOS" --regime web --count "$count" \
        --out "$WORK/web-$size"
  done
  web_stages() {  # web_stages DECODE SIZE STEPS: extract-teacher and train-student on web-SIZE
    local decode=$1 size=$2 n=$3 tag
    tag=$([ "$size" = small ] && echo "-small" || echo "")
    run_stage "extract-web-$decode$tag" 150 rdkd extract-teacher --data "$WORK/web-$size" --model "$TEACHER" \
        --batch-size "$EXTRACT_BATCH" --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" \
        --preprocess "$WEB_PREPROCESS" --decode "$decode" --no-progress --out "$WORK/cache-web-$decode$tag"
    run_stage "train-web-$decode-$largest$tag" 150 rdkd train-student --data "$WORK/web-$size" \
        --cache "$WORK/cache-web-$decode$tag" --student "$STUDENT" --loss cliprd --steps "$n" \
        --batch-size "$largest" --precision "$PRECISION" --workers "$WORKERS" --device "$DEVICE" --decode "$decode" \
        --log-every "$LOG_EVERY" --save-every 100000 --no-progress --out "$WORK/train-web-$decode-$largest$tag"
  }
  for decode in $WEB_DECODES; do
    web_stages "$decode" small $(( ${steps[-1]} / 4 > 0 ? ${steps[-1]} / 4 : 1 ))
    web_stages "$decode" full "${steps[-1]}"
  done
fi

# summary, and what comes back: at most 7 files in $RESULTS
for log in "$WORK"/bare.log "$WORK"/demo-data.log "$WORK"/extract*.log "$WORK"/train-*.log; do
  [ -f "$log" ] && { echo "===== $(basename "$log")"; cat "$log"; }
done > "$RESULTS/logs.txt"
cp "$WORK/bare.jsonl" "$RESULTS/bare.jsonl"
for run in "$WORK"/train-*/; do
  name=$(basename "$run")
  [ -f "$run/logs/metrics.jsonl" ] && cp "$run/logs/metrics.jsonl" "$RESULTS/$name.metrics.jsonl"
done
echo "=== P8 GPU feed summary (work folder $WORK, total $SECONDS s)"
"$PY" "$HERE/gpu_summary.py" "$WORK" --extract-batch "$EXTRACT_BATCH" \
    --train-batches "$(IFS=,; echo "${batches[*]}")" --out "$RESULTS/summary.json"
