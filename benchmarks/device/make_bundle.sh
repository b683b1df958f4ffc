#!/usr/bin/env bash
# Packs what the accuracy and zero-shot tables need on the device machine and lacks there (the SmolLM2 GGUF, a copy
# of ../shared/data, the Python 3.12 packages of gguf and lm-evaluation-harness) into one tar, cut into three chunks
# under .dev/c1 .. .dev/c3, because one device call carries at most 64 MiB. Each chunk goes with its own call
# (carry .dev/c1, then .dev/c2, then .dev/c3 with `bash benchmarks/device/setup.sh`), within the machine's warm
# window, since /tmp is kept only while the machine is held.
#
#   bash benchmarks/device/make_bundle.sh          # run from the repository root, needs pip and network to PyPI
set -euo pipefail
ROOT=$(pwd)
DATA=${DGQ_DATA:-$ROOT/../shared/data}
GGUF=$(python3 -c "from dgq.loading import resolve_model; s = resolve_model('smollm2-135m'); print(s.path + '/' + s.gguf_file)")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# What lm-eval imports on our path, pinned to the versions the tables were made with; the device's own torch,
# transformers, numpy, huggingface_hub and the like are used as they are.
PACKAGES="lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 sacrebleu==2.6.0
portalocker==4.4.2 lxml==6.1.3 colorama==0.4.6 tabulate==0.10.0 gguf==0.19.0 pandas==3.1.1 pyarrow==26.0.1
more-itertools==11.2.1 evaluate==0.4.6"
mkdir -p "$WORK/wheels" "$WORK/site"
for p in $PACKAGES; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WORK/wheels" "$p"
done
for w in "$WORK"/wheels/*.whl; do unzip -q -o "$w" -d "$WORK/site"; done
# Trimmed to fit the calls: lm-eval's bundled task folders (dgq defines its own tasks), test suites, headers, and
# the pyarrow libraries no import on our path loads (Flight, S3); libarrow_substrait stays, most modules link it.
rm -rf "$WORK"/site/lm_eval/tasks/*/ "$WORK"/site/pyarrow/include "$WORK"/site/pyarrow/tests "$WORK"/site/pandas/tests
rm -f "$WORK"/site/pyarrow/libarrow_flight.so* "$WORK"/site/pyarrow/libarrow_python_flight.so* \
  "$WORK"/site/pyarrow/libarrow_s3.so* "$WORK"/site/pyarrow/_flight*.so "$WORK"/site/pyarrow/_s3fs*.so
tar -C "$WORK/site" -cf - . | xz -T0 -6 > "$WORK/site.tar.xz"
tar -C "$(dirname "$DATA")" -cf - "$(basename "$DATA")" | xz -T0 -6 > "$WORK/data.tar.xz"
cp "$GGUF" "$WORK/model.gguf"
tar -C "$WORK" -cf "$WORK/bundle.tar" model.gguf data.tar.xz site.tar.xz
rm -rf .dev && mkdir -p .dev/c1 .dev/c2 .dev/c3
split -n 3 -d "$WORK/bundle.tar" "$WORK/part."
mv "$WORK/part.00" .dev/c1/ && mv "$WORK/part.01" .dev/c2/ && mv "$WORK/part.02" .dev/c3/
sha256sum "$WORK/bundle.tar" | cut -d' ' -f1 > .dev/c3/sha256
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.dev/' >> .git/info/exclude; }
du -sh .dev/c1 .dev/c2 .dev/c3
