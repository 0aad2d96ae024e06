"""mim_jax: masked image modeling (MAE, SimMIM, BEiT, data2vec, iBOT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="mim_jax",
    version="0.1.0",
    description="Masked image modeling pre-training and evaluation in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mim_jax", "mim_jax.*"]),
    python_requires=">=3.10",
    # Lower bounds only: GPU images ship their own (newer) jax/flax/optax/orbax.
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "tensorflow-datasets>=4.9.7",
        "ml-collections>=1.0",
        "chex>=0.1.88",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pillow>=10",
        "simplejpeg>=1.7",  # JPEG decoding at about twice PIL's speed (libjpeg-turbo)
        "tifffile>=2023.1",  # multi-channel and high-bit-depth TIFF images
        "tensorboardX>=2.6",
    ],
    extras_require={
        # torch + transformers run the parity test against HF ViTMAEForPreTraining on the CPU;
        # timm (>= 1.0.16 reads "local-dir:" exports; it needs torchvision) is the reference ViT
        # and BEiT of tests/test_convert.py;
        # scikit-image (which pulls in scipy) is the HOG reference in tests/test_hog.py;
        # scikit-learn's logistic regression is the converged probe's (tests/test_probe.py);
        # tests/test_gcs.py runs gs:// workdirs against gcp-storage-emulator; pytest-xdist runs
        # the suite in two processes (most tests are bound by one-threaded XLA compilation).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.4", "transformers>=4.57,<6", "safetensors>=0.4",
                 "timm>=1.0.16", "scikit-image>=0.19", "scikit-learn>=1.3", "gcsfs>=2024.2",
                 "gcp-storage-emulator>=2024.8"],
        # gs:// workdirs (etils.epath's Cloud Storage backend without TensorFlow).
        "gcs": ["gcsfs>=2024.2"],
        # Plots in docs/ (docs/plot_mask_ratio.py).
        "docs": ["matplotlib>=3.8"],
    },
)
