#!/usr/bin/env bash
# The whole course on a GPU runner: every gpu-marked test, every chapter's solution notebook under
# nbval at full size (labkit.runtime picks the GPU profile), and every chapter's benchmarks,
# recorded under data/bench/. Prints a summary; exits non-zero if anything failed.
#
# On the course's GPU runner (no Jupyter stack, no network; see ../shared/gpu/README.md), from the
# repository root, one stage per call keeps each call inside the runner's 10-minute limit
# (build the wheels with Liger-Kernel, the parity/baseline of chapter 17:
#  `.gpu/wheels.sh .whl liger-kernel==0.8.5`):
#   source .gpu/prelude.sh && bash tools/gpu-suite.sh tests
#   source .gpu/prelude.sh && bash tools/gpu-suite.sh notebooks
#   source .gpu/prelude.sh && bash tools/gpu-suite.sh bench
# Chapters after the stage limit it (e.g. `bash tools/gpu-suite.sh bench 16 17`): the whole course no
# longer fits one 10-minute call. With no argument all three stages run, for every chapter. When $OUT is set (the runner's output folder), the log
# and each benchmark record are copied there as soon as they exist, so a timeout loses nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
if [[ -n "${OUT:-}" ]]; then exec > >(tee -a "$OUT/gpu-suite.log") 2>&1; fi
stages=${1:-"tests notebooks bench"}
only=("${@:2}")
status=()
fail=0
note() { status+=("$1"); echo "== $1"; }

$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA!)', '| torch', torch.__version__)"

if [[ $stages == *tests* ]]; then
  targets=$($PY -c "import sys; from labkit import book; b = book.load()
print(*sorted({t for x in sys.argv[1:] for t in b.chapter(x).tests}) or ['tests/'])" "${only[@]}")
  $PY -m pytest -q -p no:cacheprovider -m gpu $targets
  rc=$?; [[ $rc == 0 ]] && note "gpu tests: ok" || { note "gpu tests: FAILED ($rc)"; fail=1; }
fi
if [[ $stages == *notebooks* ]]; then
  $PY -m labkit.cli validate --solutions-only "${only[@]}"
  rc=$?; [[ $rc == 0 ]] && note "notebooks: ok" || { note "notebooks: FAILED ($rc)"; fail=1; }
fi
if [[ $stages == *bench* ]]; then
  for chapter in $($PY -c "import sys; from labkit import bench, book; b = book.load(); print(*[c.id for c in (
      [b.chapter(x) for x in sys.argv[1:]] or b.active()) if bench.has_benchmarks(c.id)])" "${only[@]}"); do
    $PY -m labkit.cli bench "$chapter"
    rc=$?
    if [[ $rc == 0 ]]; then
      note "bench $chapter: recorded in data/bench/$chapter.json"
      [[ -n "${OUT:-}" ]] && cp "data/bench/$chapter.json" "$OUT/"
    else
      note "bench $chapter: FAILED ($rc)"; fail=1
    fi
  done
fi
echo; echo "== GPU suite summary"; printf '  %s\n' "${status[@]}"
exit $fail
