#!/usr/bin/env bash
# Run the VGG16 study in resumable pieces, with its tracking store, checkpoints and data
# outside the checkout ($PRUNETRACK_STUDY_DIR, default ~/prunetrack-study), so that they
# outlive it. The cells run the committed code (a clone in $STUDY/code, brought to HEAD while no cell runs),
# so editing the checkout while the study runs cannot change a cell half-way.
#
#   bash scripts/study.sh start    # import the committed export, then start (or resume) the sweep in the background
#                                  # (--allow-precision-change: also where this machine would train the cells
#                                  # left in another precision than the finished ones; the sweep refuses otherwise;
#                                  # --cells N: only the next N cells, then the sweep exits, with no cell cut short;
#                                  # --time-limit D, e.g. 2h30m: the sweep exits by then, its cell stopped at the
#                                  # last checkpoint that fits, and starts no cell that could not save an epoch)
#   bash scripts/study.sh status   # every cell's state and the time left (sweep --dry-run), and the log's tail
#                                  # (--time-limit D: also which cells a start with that limit would finish)
#   bash scripts/study.sh stop     # stop the sweep once the cell in training saved its next checkpoint
#   bash scripts/study.sh finish   # stop, time the cells finished since the last pass, export them, regenerate the report
#   bash scripts/study.sh import FILE  # runs made elsewhere (a GPU machine's export: scripts/device.sh) join the store
#   bash scripts/study.sh retime   # stop, then time every finished cell in one pass (the study's last step:
#                                  # cells of one pass compare best; about a minute per cell on 2 cores;
#                                  # cells imported without masks are rebuilt from their per-layer counts;
#                                  # every cell in this machine's native arithmetic: bf16 where it has it, else fp32)
# stop, finish and retime wait for the next per-epoch checkpoint (at most one epoch), so that
# no training is lost; with --now they stop at once and the cell resumes from its last one.
#
# SPEC (default sweeps/study_vgg16.yaml) picks another spec of the same experiment, e.g.
#   SPEC=sweeps/study_resnet50.yaml bash scripts/study.sh start
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STUDY=${PRUNETRACK_STUDY_DIR:-$HOME/prunetrack-study}
SPEC=${SPEC:-sweeps/study_vgg16.yaml}
EXPERIMENT=study
EXPORT=$REPO/reports/cifar10/runs.jsonl.gz
PY=$REPO/.venv/bin/python

mkdir -p "$STUDY"
cd "$STUDY"
export MLFLOW_TRACKING_URI=sqlite:///$STUDY/mlflow.db PRUNETRACK_CHECKPOINT_DIR=$STUDY/checkpoints

prunetrack() { PYTHONPATH=$STUDY/code "$PY" -m prunetrack "$@"; }

running() { [ -f sweep.pid ] && kill -0 "$(cat sweep.pid)" 2>/dev/null; }

update_code() {  # the committed code, while no cell runs from the clone
  if [ -d code/.git ]; then git -C code pull -q --ff-only "$REPO" HEAD; else git clone -q "$REPO" code; fi
}

stop() {
  case "${1:-}" in
    ""|--now) ;;
    *) echo "study.sh: unknown option '$1' (accepted: --now, to stop at once)" >&2; exit 2 ;;
  esac
  if running && [ "${1:-}" != --now ]; then
    # A checkpoint's progress.json is written last, after its state: one newer than the
    # marker means an epoch was just saved.
    echo "waiting for the cell in training to save its next checkpoint (at most one epoch; --now stops at once)"
    touch stop.marker
    until [ -n "$(find checkpoints -name progress.json -newer stop.marker 2>/dev/null)" ] || ! running; do sleep 2; done
    rm -f stop.marker
  fi
  if running; then
    kill -TERM "$(cat sweep.pid)"  # the sweep stops its cell (run KILLED, checkpoint kept)
    while running; do sleep 1; done
    echo "sweep stopped"
  fi
}

case "${1:-}" in
  start)
    shift
    opts=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --allow-precision-change) opts+=("$1") ;;
        --cells)
          [[ "${2:-}" =~ ^[1-9][0-9]*$ ]] || { echo "study.sh: --cells takes a number of cells, 1 or more" >&2; exit 2; }
          opts+=(--max-cells "$2"); shift ;;
        --time-limit)
          [ -n "${2:-}" ] || { echo "study.sh: --time-limit takes a duration, such as 2h30m" >&2; exit 2; }
          opts+=(--time-limit "$2"); shift ;;  # the sweep checks the duration, and refuses a bad one at once
        *) echo "study.sh: unknown option '$1' (accepted: --allow-precision-change, --cells N, --time-limit D)" >&2
           exit 2 ;;
      esac
      shift
    done
    if running; then echo "the sweep is running already (pid $(cat sweep.pid)); see $STUDY/sweep.log"; exit 0; fi
    update_code
    if [ ! -f data/cifar-10-batches-py/test_batch ]; then
      if [ -f "$REPO/data/cifar-10-batches-py/test_batch" ]; then cp -r "$REPO/data" data
      else "$PY" "$REPO/../shared/data/cifar10_jpeg.py" materialize data; fi
    fi
    if [ -f "$EXPORT" ]; then prunetrack import "$EXPORT"; fi
    PYTHONPATH=$STUDY/code nohup setsid "$PY" -m prunetrack sweep "code/$SPEC" ${opts[@]+"${opts[@]}"} >> sweep.log 2>&1 &
    pid=$!  # the sweep itself: nohup and setsid exec it (this script's child, not a group leader)
    echo $pid > sweep.pid
    # What the sweep refuses (a precision change, an unreachable store), it refuses within
    # seconds of starting: watch it that long, so that a refusal is not reported as a start.
    # Its exit status says which it was: a refusal, or a piece (--cells) that was that short.
    for _ in $(seq 60); do running || break; sleep 1; done
    if ! running; then
      if wait "$pid"; then
        echo "the sweep has finished already (exit 0); the end of $STUDY/sweep.log:"
        tail -n 1 sweep.log
        exit 0
      fi
      echo "the sweep stopped at once; the end of $STUDY/sweep.log:" >&2
      tail -n 3 sweep.log >&2
      exit 1
    fi
    echo "sweep started (pid $(cat sweep.pid)), code at $(git -C code rev-parse --short HEAD); log: $STUDY/sweep.log"
    ;;
  status)
    limit=()
    case "${2:-}" in
      "") ;;
      --time-limit) [ -n "${3:-}" ] || { echo "study.sh: --time-limit takes a duration, such as 2h30m" >&2; exit 2; }
                    limit=(--time-limit "$3") ;;
      *) echo "study.sh status: unknown option '$2' (accepted: --time-limit D)" >&2; exit 2 ;;
    esac
    prunetrack sweep "code/$SPEC" --dry-run ${limit[@]+"${limit[@]}"}
    running && echo "running (pid $(cat sweep.pid)):" || echo "not running; last lines of the log:"
    grep -v '^      ' sweep.log | tail -n 5 || true
    ;;
  stop)
    stop "${2:-}"
    ;;
  finish)
    stop "${2:-}"
    update_code
    # One arithmetic for every cell this machine times (bf16 where it is native, fp32 elsewhere):
    # cells trained in another precision compare with the rest, and no bf16 is emulated.
    prunetrack time --experiment "$EXPERIMENT" --untimed --precision auto
    mkdir -p "$(dirname "$EXPORT")"
    prunetrack export --experiment "$EXPERIMENT" -o "$EXPORT"
    cd "$REPO" && "$PY" -m prunetrack report --experiment "$EXPERIMENT" --name cifar10
    ;;
  import)
    file=$(cd "$OLDPWD" && realpath -e "${2:-}" 2>/dev/null) || {
      echo "study.sh import: no export file '${2:-}' (give the runs.jsonl.gz that scripts/device.sh brought back)" >&2; exit 2; }
    running || update_code  # a running cell keeps its code
    prunetrack import "$file"
    ;;
  retime)
    stop "${2:-}"
    update_code
    prunetrack time --experiment "$EXPERIMENT" --precision auto
    ;;
  *)
    awk 'NR > 1 && !/^#/ {exit} NR > 1' "$REPO/scripts/study.sh"  # its usage: the comment at the top
    exit 2
    ;;
esac
