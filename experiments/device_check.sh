#!/usr/bin/env bash
# One GPU session's measurements in one call (a lent H100/H200 has ~15 min of device time).
#
#   bash experiments/device_check.sh            # on the GPU machine, from the repository root
#
# Prints versions, then `python -m sjc_jax bench` JSON lines (renderer; the SJC step in bfloat16
# with the default and diffusers' attention, then float32), a testbed lift (duck preset: wall
# time, eval PSNR / IoU) and the numerics tests on the GPU. PARTS="bench tests/test_x.py" picks
# parts (bench, testbed, tests, learned: the learned model's default training, gpu_tests: the
# tests that run only on a GPU, or test files).
# Each part has its own time limit so a slow one cannot eat the rest; results also go to $OUT.
# Wheels in .whl/ (diffusers 0.39, transformers 4.x, ... for images without them) are installed
# first; .whl/pins/ (flax, optax, chex of requirements.txt) only if the image's own do not work.
set -u
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/sjc_device_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
smoke='import sjc_jax.sjc, sjc_jax.bench; from sjc_jax.diffusion.quiet import import_flax_models as f; f()'
if ! $PY -c "$smoke" 2>"$OUT/smoke.err" && [ -d .whl/pins ]; then
  echo "image's flax/optax/chex failed ($(tail -1 "$OUT/smoke.err")); installing the pinned ones"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/pins/*.whl || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
$PY - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "chex", "diffusers", "transformers", "numpy"):
    print(name, importlib.import_module(name).__version__, end="; ")
import jax
print("\n", jax.devices())
EOF

part() {  # part NAME SECONDS COMMAND...: run with a limit, keep its output in $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -E "^(WARNING|I0000|W0000)" "$OUT/$name.log" | tail -n 4
  echo "-- $name rc=$rc in $((SECONDS - start))s"
}

PARTS=${PARTS:-bench testbed tests}
for p in $PARTS; do
  case $p in
    # bfloat16 first (the default kernel, then diffusers' own), float32 last; each step's
    # numbers are printed (stderr, "bench:") as soon as it is timed.
    bench) part bench 250 $PY -m sjc_jax bench --repeats 30 --dtypes bfloat16,float32 \
      --attention auto,diffusers ;;
    testbed) part testbed 90 $PY experiments/testbed_timing.py ;;
    # The learned model's default training (4 scenes, 4000 steps, seed 0) on the GPU: its
    # budget is under 2 minutes there; the summary JSON line has render and train seconds (a
    # fresh empty --out each time, so the part can be rerun on a warm machine). Not
    # in the default PARTS (with it they pass one call's 600 s): PARTS="learned bench".
    learned) part learned 240 $PY -m sjc_jax train-model --out "$(mktemp -d)" \
      --no-progress ;;
    tests) part tests 100 $PY -m pytest -q -p no:cacheprovider -p no:logging tests/test_render.py \
      tests/test_grid.py tests/test_estimators.py tests/test_empirical.py tests/test_attention.py ;;
    gpu_tests) part gpu_tests 60 $PY -m pytest -q -p no:cacheprovider -p no:logging \
      tests/test_estimators.py tests/test_attention.py -k "gpu or cudnn or var_red" ;;
    *) part "$(basename "$p" .py)" 100 $PY -m pytest -q -p no:cacheprovider -p no:logging "$p" ;;
  esac
done
echo "== results"
grep -h -E "^(\{|sjc_jax: bench:|testbed )" "$OUT"/*.log || true
