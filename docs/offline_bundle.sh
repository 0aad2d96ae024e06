#!/usr/bin/env bash
# What a machine without internet needs to run mim_jax and the GPU scripts beside a JAX stack
# it already has (jax, flax, optax, orbax-checkpoint, chex, numpy, pillow, absl, etils,
# protobuf, as in common CUDA images): the wheels of the other runtime dependencies, for that
# machine's Python, and the Fashion-MNIST files. Run it on a machine with pip access:
#
#   bash docs/offline_bundle.sh DIR [PYTHON_VERSION=3.12]
#
# (the Fashion-MNIST files come from this machine's Debian package dataset-fashion-mnist),
# then on the machine without internet, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/wheels/*.whl
#   export PYTHONPATH=/tmp/site FMNIST_DIR=DIR/fashion-mnist
#   bash docs/fmnist_gpu.sh            # or docs/gpu_benchmarks.sh
#
# About 35 MB (30 of them Fashion-MNIST). Checked with jax 0.11.2, flax 0.12.10, optax 0.2.8
# and orbax-checkpoint 0.12.8 on Python 3.12 (docs/benchmarks.md, "On one H200 GPU").
set -eu
DIR=${1:?usage: bash docs/offline_bundle.sh DIR [PYTHON_VERSION]}
PYVER=${2:-3.12}
# grain and its dependencies outside that stack (array-record, portpicker, cloudpickle), the
# config library, the JPEG decoder, the TIFF reader and the metric writer: setup.py's
# install_requires less the stack (tensorflow-datasets only for TFDS sources, not needed here).
PACKAGES=(grain array-record portpicker cloudpickle ml-collections simplejpeg tifffile
          tensorboardX)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
mkdir -p "$DIR/wheels" "$DIR/fashion-mnist"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${PLATFORMS[@]}" -d "$DIR/wheels" "${PACKAGES[@]}"
cp /usr/share/datasets/fashion-mnist/*-ubyte.gz "$DIR/fashion-mnist/"
ls -l "$DIR/wheels"
du -sh "$DIR"
