#!/usr/bin/env bash
# On the device machine, in the call that carries .dev/c3 (the two earlier calls copied .dev/c1/part.00 and
# .dev/c2/part.01 to /tmp/b): re-joins the bundle that make_bundle.sh made, checks it, and unpacks the model to
# /tmp/SmolLM2-135M-Instruct.Q4_1.gguf, the data to .data and the packages to /tmp/site (put it on PYTHONPATH).
set -euo pipefail
ROOT=$(pwd)
B=/tmp/b
mkdir -p "$B"
cp .dev/c3/part.02 "$B/"
for p in part.00 part.01 part.02; do
  [ -f "$B/$p" ] || { echo "missing $p: this machine did not get every chunk (a fresh machine needs all three calls)"; exit 3; }
done
cat "$B/part.00" "$B/part.01" "$B/part.02" > "$B/bundle.tar"
[ "$(sha256sum "$B/bundle.tar" | cut -d' ' -f1)" = "$(cat .dev/c3/sha256)" ] || { echo "bundle sha256 mismatch"; exit 4; }
tar -C "$B" -xf "$B/bundle.tar"
mv "$B/model.gguf" /tmp/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/site && tar -xJf "$B/site.tar.xz" -C /tmp/site
mkdir -p "$B/data" && tar -xJf "$B/data.tar.xz" -C "$B/data" && rm -rf "$ROOT/.data" && mv "$B"/data/* "$ROOT/.data"
rm -f "$B/bundle.tar" "$B/site.tar.xz" "$B/data.tar.xz"
echo "setup done: export PYTHONPATH=$ROOT:/tmp/site"
