#!/usr/bin/env bash
# The closed-form benchmark on one CUDA GPU: full-size SD1.5 shapes end to end (CLIP-L on the GPU),
# then every optional section bench_closed_form.py offers (SDXL, and any other family whose flag's
# help starts with "also run"), edit alone. Writes a markdown table to $OUT/gpu_closed_form.md.
#
#   bash benchmarks/gpu.sh             # on a machine with CUDA; a few minutes
#   bash benchmarks/gpu.sh --dry-run   # checks the script on the CPU (one tiny case per section)
#
# Environment: PYTHON (default: python), OUT (default: benchmarks/gpu_results), SECTION_TIMEOUT
# (seconds per section, default 240).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python}"
OUT="${OUT:-$ROOT/benchmarks/gpu_results}"
SECTION_TIMEOUT="${SECTION_TIMEOUT:-240}"
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash benchmarks/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
TABLE="$OUT/gpu_closed_form.md"
cd "$ROOT"

# Device information; without CUDA stop here with a clear message (unless --dry-run).
DEVICE="$("$PY" - "$DRY" <<'PYEOF'
import sys, torch
dry = sys.argv[1] == "1"
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}", file=sys.stderr)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"{torch.cuda.device_count()} visible", file=sys.stderr)
    print("cpu" if dry else "cuda")
elif dry:
    print("no CUDA device: dry run on the CPU", file=sys.stderr)
    print("cpu")
else:
    sys.exit("gpu.sh: CUDA is not available to torch (no NVIDIA GPU or driver, or a CPU-only torch "
             "build). Run it on a machine with a GPU, or pass --dry-run to check it on the CPU.")
PYEOF
)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true

SECTIONS="$("$PY" benchmarks/bench_closed_form.py --list-sections)"
if [[ $DRY -eq 1 ]]; then
  SD1=(--methods uce-last --targets 1 --preserve 0 --repeats 1)
  EXTRA=(--methods uce-last --targets 1 --preserve 0 --repeats 1)
else
  SD1=(--methods uce,uce-last,speed,speed-multi,rece --targets 1,100,1000 --preserve 0,1000 --repeats 3 --warmup)
  EXTRA=(--methods uce,uce-last,speed --targets 1,100,1000 --preserve 0,1000 --repeats 3 --warmup)
fi

{
  echo "# Closed-form benchmark on $DEVICE ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Sections: SD1.5 end to end${SECTIONS:+, then edit alone for: $SECTIONS}. Columns: benchmarks/README.md."
} > "$TABLE"

run() {  # one section, bounded in time; a section that fails or times out is reported, not fatal
  local status=0
  timeout "$SECTION_TIMEOUT" "$PY" benchmarks/bench_closed_form.py --device "$DEVICE" --inline "$@" \
    | tee -a "$TABLE" || status=$?
  if [[ $status -ne 0 ]]; then
    echo "(section '$*' stopped with status $status; 124 means it ran past ${SECTION_TIMEOUT} s)" | tee -a "$TABLE"
    FAILED=1
  fi
}

FAILED=0
run "${SD1[@]}"
for section in $SECTIONS; do
  run --no-sd1 "$section" "${EXTRA[@]}"
done
echo "table: $TABLE"
exit $FAILED
