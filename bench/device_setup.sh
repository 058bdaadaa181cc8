#!/usr/bin/env bash
# Make a machine without package registries ready for bench/gpu.sh: install, offline, the
# packages rdkd's extract-teacher / train-student path imports that its Python lacks, from
# wheels carried in .whl/, and rdkd itself, into a separate folder (the machine's own
# packages stay as they are). Run from anywhere; safe to run twice.
#
#     bash bench/device_setup.sh --download      # here, with a registry: fill .whl/ (~6 MB)
#     bash bench/device_setup.sh [SITE]          # there: install into SITE (default /tmp/rdkd-site)
#     export PYTHONPATH=SITE PATH=SITE/bin:$PATH  # then rdkd and bench/*.py use it
#
# .whl/ (git-ignored) holds open_clip_torch and what it needs that a torch image usually
# lacks: ftfy, wcwidth, braceexpand (rdkd's webdataset patterns), regex (one wheel per
# CPython version in PY_VERSIONS), plus setuptools, wheel and packaging for building rdkd
# when the machine's setuptools cannot. faiss is not needed: extract-teacher and
# train-student do not import it (evaluate does). A carried package is installed only when
# the machine's Python cannot import it already (FORCE=1: always).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SITE=${1:-${SITE:-/tmp/rdkd-site}}
WHEELS=${WHEELS:-$ROOT/.whl}
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --root-user-action=ignore
     --upgrade --target "$SITE")

# the versions carried (open_clip_torch: the one rdkd is developed and tested with)
PURE=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 braceexpand==0.1.7
      setuptools==84.2.1 wheel==0.48.0 packaging==26.4)
BINARY=(regex==2026.5.9)
if [ "${1:-}" = --download ]; then
  platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
  done
  for version in ${PY_VERSIONS:-3.10 3.11 3.12 3.13}; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp --python-version "$version" \
        "${platforms[@]}" -d "$WHEELS" "${BINARY[@]}" "${PURE[@]}"
  done
  ls -l "$WHEELS"
  du -sh "$WHEELS"
  exit 0
fi
[ -d "$WHEELS" ] || { echo "error: no wheel folder $WHEELS (bash bench/device_setup.sh --download)" >&2; exit 2; }
mkdir -p "$SITE"

# distribution name:module name, in install order
wanted=(wcwidth:wcwidth ftfy:ftfy regex:regex braceexpand:braceexpand open_clip_torch:open_clip)
install=()
for pair in "${wanted[@]}"; do
  dist=${pair%%:*} module=${pair##*:}
  if [ "${FORCE:-0}" != 1 ] && env -u PYTHONPATH "$PY" -c "import $module" 2>/dev/null; then
    echo "$dist: the machine's own"
  else
    install+=("$dist")
  fi
done
if [ ${#install[@]} -gt 0 ]; then
  # pip picks the one wheel of each name that fits this Python and platform
  "${PIP[@]}" --find-links "$WHEELS" "${install[@]}"
  echo "installed into $SITE: ${install[*]}"
fi

# rdkd itself: a regular (non-editable) install of this checkout, built without a registry.
# Built from a copy of the checkout, so no build/ or egg-info is left in it (or reused from it).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src"
tar -C "$ROOT" --exclude=./.git --exclude=./.whl --exclude=./.venv --exclude=./.gl --exclude=./artifacts \
    --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$tmp/src" -xf -
if ! "${PIP[@]}" --no-build-isolation "$tmp/src" 2>"$tmp/err"; then
  # the machine's setuptools could not build it: build in isolation with the carried ones
  echo "rdkd: the machine's setuptools failed ($(tail -n 1 "$tmp/err")); building with the carried setuptools"
  "${PIP[@]}" --find-links "$WHEELS" "$tmp/src"
fi

PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "$SITE" <<'EOF'
import importlib.metadata as md, platform, sys
import open_clip, rdkd, rdkd.stages.extract_teacher, rdkd.stages.train_student, torch
names = ["torch", "torchvision", "open_clip_torch", "ftfy", "wcwidth", "regex", "braceexpand", "pyarrow",
         "numpy", "typer", "rich", "timm", "huggingface_hub", "safetensors", "rdkd"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print(f"python {platform.python_version()} ({sys.executable}); rdkd from {rdkd.__file__}")
print(" ".join(f"{n}={version(n)}" for n in names))
print(f"cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""))
EOF
echo "ready: export PYTHONPATH=$SITE PATH=$SITE/bin:\$PATH"
