#!/usr/bin/env bash
# The device kit, part 1: run HERE (a machine that reaches the package registries), from any
# folder. Downloads into bench/device/wheels/ (git-ignored) the Python 3.12 manylinux wheels
# the project needs beyond the GPU machine's image: Ray 2.60 with its default/tune/train
# extras, optuna, and their dependencies, minus what present.txt lists as already there.
# Ray's wheel (~79 MB) is over what a device call may carry (64 MiB), so its Java jars and
# JavaScript source maps, which nothing here uses, are removed (~45 MB left).
#
#   bench/device/pack.sh          # then, on a session lent a GPU, run check.sh there:
#   device run: carry [bench/device/wheels], command "bench/device/check.sh"
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
wheels="$here/wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$wheels"
mkdir -p "$wheels"

platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64 linux_x86_64 any; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  "${platforms[@]}" -d "$work/all" \
  "ray[default,tune,train]==2.60.0" optuna tensorboardX

# drop what the GPU machine already has, and what nothing in the check imports: virtualenv
# (Ray's pip runtime envs), cryptography (Ray's TLS and cloud launchers), py-spy (the
# dashboard's profiler), sqlalchemy (optuna's database storage; studies here are in memory)
present=$(grep -v '^#' "$here/present.txt" | tr ' ' '\n' | sed '/^$/d' \
          | tr 'A-Z' 'a-z' | tr '_.' '--')
present+=$'\n'"virtualenv"$'\n'"distlib"$'\n'"python-discovery"$'\n'"cryptography"
present+=$'\n'"cffi"$'\n'"pycparser"$'\n'"py-spy"$'\n'"sqlalchemy"
kept=0
for wheel in "$work"/all/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z' | tr '_.' '--')
  if grep -qx "$name" <<<"$present"; then
    continue
  fi
  cp "$wheel" "$wheels/"
  kept=$((kept + 1))
done

# slim Ray: no jars (Java workers), no source maps (dashboard debugging)
ray_wheel=$(ls "$wheels"/ray-*.whl)
mkdir "$work/ray"
(cd "$work/ray" && "$python" -m zipfile -e "$ray_wheel" .)
rm -rf "$work/ray/ray/jars"
find "$work/ray" -name '*.map' -delete
record=$(ls -d "$work"/ray/ray-*.dist-info)/RECORD
"$python" - "$work/ray" "$record" <<'PY'
import csv, os, sys
root, record = sys.argv[1], sys.argv[2]
rows = [r for r in csv.reader(open(record)) if os.path.exists(os.path.join(root, r[0]))
        or r[0].endswith("RECORD")]
with open(record, "w", newline="") as fh:
    csv.writer(fh).writerows(rows)
PY
rm "$ray_wheel"
(cd "$work/ray" && "$python" - "$ray_wheel" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1], "w", zipfile.ZIP_DEFLATED) as out:
    for folder, _, files in os.walk("."):
        for name in files:
            path = os.path.join(folder, name)[2:]
            out.write(path, path)
PY
)
echo "$kept wheels in $wheels:"
du -ch "$wheels"/*.whl | sort -h | tail -12
total=$(du -sm "$wheels" | cut -f1)
if [ "$total" -ge 60 ]; then
  echo "warning: ${total} MB of wheels leaves little of the 64 MiB a device call carries" >&2
fi
