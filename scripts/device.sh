#!/usr/bin/env bash
# Run the study's cells left (and the GPU benchmark) on a GPU machine that has Python, torch,
# torchvision and Pillow but no internet: the rest travels in .device/kit (about 57 MB: the
# wheels of prunetrack's other dependencies for that machine's Python, and the CIFAR-10 copy).
#
#   bash scripts/device.sh pack             # here: build .device/kit for Python $DEVICE_PYTHON (3.12)
#   bash scripts/device.sh study SECONDS    # there, in the checkout: the study's sweep for at most SECONDS,
#                                           # then every finished run exported to $OUT/runs.jsonl.gz
#   bash scripts/device.sh bench            # there: benchmarks/throughput.py's GPU setting -> $OUT/throughput.txt
#   bash scripts/study.sh import FILE       # here again: the runs brought back join the study's store
#
# There, the tracking store, checkpoints and installed packages sit in .device/state, which a
# later call on the same machine takes up (a cell cut off by SECONDS resumes from its last
# epoch); only .device/kit is carried there. The sweep refuses what it refuses here (a change of
# precision: a GPU with native bf16 continues the study's bf16 cells).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
KIT=.device/kit
STATE=.device/state
SPEC=${SPEC:-sweeps/study_vgg16.yaml}
EXPERIMENT=${EXPERIMENT:-study}  # the experiment the spec names
EXPORT=reports/cifar10/runs.jsonl.gz
# What the machine's image lacks (mlflow-skinny: the tracking client, without MLflow's server
# and pandas, which only parallel cells and the report need; the carry has 64 MiB). Left out
# of the kit: numpy and Pillow, which come with the image's torchvision.
PACKAGES="mlflow-skinny sqlalchemy alembic matplotlib torchinfo pyyaml psutil markdown click nvidia-ml-py"
LEAVE_OUT="numpy pillow"

there() {  # the machine's own Python, with the kit's packages and this checkout on its path
  export PYTHONPATH=$REPO/$STATE/site:$REPO MLFLOW_TRACKING_URI=sqlite:///$REPO/$STATE/mlflow.db \
    PRUNETRACK_CHECKPOINT_DIR=$REPO/$STATE/checkpoints OUT=${OUT:-$REPO/$STATE/out}
  PY=${DEVICE_PYTHON_BIN:-python3}
  mkdir -p "$STATE" "$OUT"
  if [ ! -f "$STATE/site/.installed" ]; then
    [ -d "$KIT/wheels" ] || { echo "device.sh: no $KIT/wheels: run 'bash scripts/device.sh pack' first, and carry $KIT" >&2; exit 2; }
    # Exactly the kit's wheels, resolved where they were packed: no index to resolve against here.
    if "$PY" -m pip --version > /dev/null 2>&1; then
      "$PY" -m pip install --quiet --no-index --no-deps --target "$STATE/site" "$KIT"/wheels/*.whl
    else  # an image without pip: a wheel is a zip of what goes on the path (none of these needs its scripts)
      "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$STATE/site" "$KIT"/wheels/*.whl
    fi
    touch "$STATE/site/.installed"
  fi
  if [ ! -f data/cifar-10-batches-py/test_batch ]; then "$PY" "$KIT/data/cifar10_jpeg.py" materialize data; fi
  "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA:', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
}

case "${1:-}" in
  pack)
    PYV=${DEVICE_PYTHON:-3.12}
    rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/data"
    .venv/bin/pip download --quiet --only-binary=:all: --python-version "$PYV" -c constraints.txt \
      -d "$KIT/wheels" $PACKAGES
    for name in $LEAVE_OUT; do rm -f "$KIT"/wheels/"$name"-*.whl; done
    cp ../shared/data/cifar10-jpeg.npz ../shared/data/cifar10_jpeg.py "$KIT/data/"
    echo "$KIT: $(ls "$KIT/wheels" | wc -l) wheels for Python $PYV and CIFAR-10, $(du -sh "$KIT" | cut -f1); carry it: run(carry=['$KIT'])"
    ;;
  study)
    SECONDS_LEFT=${2:-}
    [[ "$SECONDS_LEFT" =~ ^[1-9][0-9]*$ ]] || {
      echo "device.sh study: give the sweep's time limit in whole seconds, e.g. 'device.sh study 480' (got '${2:-}')" >&2; exit 2; }
    there
    "$PY" -m prunetrack import "$EXPORT"
    # TERM at the deadline: the sweep stops its cell (run KILLED, checkpoint kept) and exits.
    code=0
    timeout --signal=TERM --kill-after=60 "$SECONDS_LEFT" "$PY" -m prunetrack sweep "$SPEC" >> "$OUT/sweep.log" 2>&1 || code=$?
    echo "sweep exit status $code ($([ $code = 124 ] && echo "stopped at the deadline" || echo done)); its log: \$OUT/sweep.log"
    grep -v '^      ' "$OUT/sweep.log" | tail -n 25
    "$PY" -m prunetrack export --experiment "$EXPERIMENT" -o "$OUT/runs.jsonl.gz"
    "$PY" -m prunetrack sweep "$SPEC" --dry-run 2>&1 | tail -n 3
    ;;
  bench)
    there
    # torch.compile's GPU kernels need a C compiler to build their launchers.
    compile=--compile
    command -v cc > /dev/null || command -v gcc > /dev/null || { compile=; echo "no C compiler here: torch.compile left out"; }
    "$PY" benchmarks/throughput.py --steps 50 $compile --data-dir data 2>&1 | tee "$OUT/throughput.txt"
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
