"""cmscale: distributed training of diffusion consistency models (CD, CT, iCT)."""
from setuptools import find_packages, setup

# Versions are the ones tested on our CPU CI machines (Debian 12, Python 3.11); the
# lower bounds are what the code needs. On a CUDA cluster install the torch wheel that
# matches the cluster's driver first (see the README), then this package.
install_requires = [
    "torch>=2.3",
    "torchvision>=0.18",
    "numpy>=1.24",
    "scipy>=1.10",
    "pillow>=9.5",
    "pyyaml>=6.0",
    "tqdm>=4.64",
    "tensorboard>=2.14",
    "webdataset>=0.2.86",
    "lpips>=0.1.4",
    "clean-fid>=0.1.35",
    "safetensors>=0.4",
]

extras_require = {
    # Multi-node launch paths: DeepSpeed ZeRO, the reference's MPI launch, submitit.
    "cluster": ["deepspeed>=0.14", "mpi4py>=3.1", "submitit>=1.5"],
    # Embedded datasets (quickstart, tests) and LSUN lmdb exports for make_shards.
    "data": ["scikit-learn>=1.3", "scikit-image>=0.21", "lmdb>=1.4"],
    # diffusers pipelines in and out (cmscale export --format diffusers, diffusers folders as
    # --checkpoint / loss.teacher): the folder format is tested with 0.42.1, so the minor is pinned.
    "diffusers": ["diffusers>=0.42.1,<0.43"],
}
extras_require["dev"] = sorted(
    set(extras_require["cluster"] + extras_require["data"] + extras_require["diffusers"]
        + ["pytest>=7.4", "mpich>=4.1", "piq>=0.8"])  # piq: the reference LPIPS, for parity tests
)

setup(
    name="cmscale",
    version="0.2.0",
    description="Distributed training of diffusion consistency models (CD, CT, iCT)",
    packages=find_packages(include=["cmscale", "cmscale.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["cmscale=cmscale.cli:main"]},
)
