#!/usr/bin/env bash
# Put ONNX Runtime's C/C++ headers from Debian's libonnxruntime-dev package into DEST (DEST/usr/include/onnxruntime),
# without installing anything: `apt-get download` and `dpkg -x`. Where this system's suites lack the package
# (Debian 12 bookworm; it is in 13 trixie), the trixie index is read into a private apt folder under DEST, so
# the system's sources and packages stay as they are. Only the headers are used: pair them with the library of
# the onnxruntime wheel (assemble_ort_root.py), which must be the same version or newer (trixie has 1.21).
#
# usage: bash examples/cpp/debian_headers.sh DEST      (prints the headers' folder)
set -euo pipefail
dest="$(mkdir -p "${1:?usage: debian_headers.sh DEST}" && cd "$1" && pwd)"
cd "$dest"
apt_options=()
if ! apt-cache policy libonnxruntime-dev 2>/dev/null | grep -q "Candidate: [0-9]"; then
  mkdir -p apt/lists/partial apt/cache/archives/partial
  echo "deb http://deb.debian.org/debian trixie main" > apt/sources.list
  apt_options=(-o "Dir::Etc::sourcelist=$dest/apt/sources.list" -o "Dir::Etc::sourceparts=-"
               -o "Dir::State::Lists=$dest/apt/lists" -o "Dir::Cache=$dest/apt/cache" -o "Dir::State::status=/dev/null")
  apt-get "${apt_options[@]}" update >&2
fi
apt-get "${apt_options[@]}" download libonnxruntime-dev >&2
dpkg -x libonnxruntime-dev_*.deb .
test -f usr/include/onnxruntime/onnxruntime_cxx_api.h
echo "$dest/usr/include/onnxruntime"
