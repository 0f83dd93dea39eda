"""fairseq-expire: Expire-Span (Sukhbaatar et al., ICML 2021) as a fairseq plugin."""

import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

COMPAT_PTH = "fairseq_expire_compat.pth"


class BuildPyWithCompatHook(build_py):
    """Ship the start-up hook that activates :mod:`fairseq_expire_compat` in every Python process.

    A ``.pth`` file in site-packages is the only way to fix fairseq before the real console scripts import it.
    Editable installs do not carry it: install with ``pip install .`` (``make install`` does).
    """

    def run(self):
        super().run()
        self.copy_file(COMPAT_PTH, os.path.join(self.build_lib, COMPAT_PTH), preserve_mode=0)


setup(
    name="fairseq-expire",
    version="0.1.0",
    description="Expire-Span attention (learned memory expiration) for fairseq language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_expire", "fairseq_expire.*"]),
    py_modules=["fairseq_expire_compat"],
    cmdclass={"build_py": BuildPyWithCompatHook},
    install_requires=[
        # Any torch >= 2.0 works; keeping the bound open lets a cluster keep its own CUDA build.
        "torch>=2.0",
        "fairseq==0.12.2",
        "numpy",
        "sentencepiece",
        "submitit",
        "pyyaml",
    ],
    extras_require={
        "test": ["pytest", "tensorboardX", "black", "isort"],
        "viz": ["matplotlib"],
    },
)
