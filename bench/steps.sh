# The device-call scripts' shared part (bench/*.sh source it): the results folder made absolute, bench/ as the
# working directory with the repository on PYTHONPATH, the torch/GPU line, and
#
#   step NAME LIMIT_S COMMAND...   run COMMAND under `timeout LIMIT_S`, its output in OUT_DIR/NAME.log, then show
#                                  the log's lines matching $pattern; skipped when it would end past $budget
#                                  seconds, or when $runs is set (" a b ") and NAME's last _-part is not in it
#                                  (then it returns 1)
#   pack_logs ARCHIVE              move every OUT_DIR/*.log into OUT_DIR/ARCHIVE (.tar.gz)
#
# Set before sourcing: out (OUT_DIR), budget, pattern; runs optionally.
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
export PYTHONPATH=..${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

step() {
  local name=$1 limit=$2
  shift 2
  [[ -z ${runs:-} || $runs == *" ${name##*_} "* ]] || return 1
  if ((SECONDS + limit > budget)); then
    echo "== $name skipped: ${SECONDS}s used of ${budget}s"
    return 1
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name rc=$? $((SECONDS - start))s"
  grep -E "$pattern" "$out/$name.log" | tail -n 12
}

pack_logs() {
  tar czf "$out/$1" -C "$out" --remove-files $(cd "$out" && ls ./*.log)
}

"$py" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
