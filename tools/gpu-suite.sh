#!/usr/bin/env bash
# The whole course on a GPU runner, in one call: every gpu-marked test, every chapter that has
# notebooks under nbval (full sizes: labkit.runtime picks the GPU profile), and every chapter's
# benchmarks, recorded under data/bench/. Prints a summary; exits non-zero if anything failed.
#
# On the course's GPU runner (no Jupyter stack, no network), from the repository root:
#   source .gpu/prelude.sh && bash tools/gpu-suite.sh            (see ../shared/gpu/README.md)
# Pass a stage name to run only that stage: tests | notebooks | bench
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
[[ -x .venv/bin/python && -z "${PY_FORCED:-}" && ! -f .gpu/prelude.sh ]] && PY=.venv/bin/python
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
stages=${1:-"tests notebooks bench"}
status=()
fail=0

$PY -c "import torch; print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (no CUDA!)', '| torch', torch.__version__)"

if [[ $stages == *tests* ]]; then
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/ ; rc=$?
  # 5 = no tests collected (no gpu tests yet) is not a failure
  [[ $rc == 0 || $rc == 5 ]] && status+=("gpu tests: ok") || { status+=("gpu tests: FAILED ($rc)"); fail=1; }
fi
if [[ $stages == *notebooks* ]]; then
  $PY -m labkit.cli validate ; rc=$?
  [[ $rc == 0 ]] && status+=("notebooks: ok") || { status+=("notebooks: FAILED ($rc)"); fail=1; }
fi
if [[ $stages == *bench* ]]; then
  for chapter in $($PY -c "from labkit import book; print(' '.join(c.id for c in book.load().active()))"); do
    slug=${chapter#*-}
    [[ -f labkit/benchmarks/${slug//-/_}.py ]] || continue
    $PY -m labkit.cli bench "$chapter" ; rc=$?
    [[ $rc == 0 ]] && status+=("bench $chapter: recorded in data/bench/$chapter.json") || { status+=("bench $chapter: FAILED ($rc)"); fail=1; }
  done
fi
echo; echo "== GPU suite summary"; printf '  %s\n' "${status[@]}"
if [[ -n "${OUT:-}" && -d data/bench ]]; then cp data/bench/*.json "$OUT"/ 2>/dev/null || true; fi
exit $fail
