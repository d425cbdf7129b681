"""Install fairseq_moe_infer, a fairseq plugin for fast Mixture-of-Experts inference.

The fairseq registrations live in the top-level ``criterions/`` and ``tasks/``
folders; they are installed inside the package as ``fairseq_moe_infer.criterions``
and ``fairseq_moe_infer.tasks`` so one ``--user-dir`` loads everything.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fairseq_moe_infer", "fairseq_moe_infer.*"])
packages += ["fairseq_moe_infer.criterions", "fairseq_moe_infer.tasks"]

setup(
    name="fairseq_moe_infer",
    version="0.1.0",
    description="Fast, lean Mixture-of-Experts inference for fairseq: dynamic gating, expert buffering, load balancing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={
        "fairseq_moe_infer.criterions": "criterions",
        "fairseq_moe_infer.tasks": "tasks",
    },
    install_requires=[
        # PyPI fairseq 0.12.2 does not import on Python >= 3.11 nor with numpy >= 1.24;
        # ve-fairseq 0.12.3 is a wheel build of fairseq's main branch for 3.11 / 3.12.
        # With your own fairseq checkout, install with `pip install --no-deps -e .` instead.
        "ve-fairseq==0.12.3; python_version >= '3.11'",
        "fairseq==0.12.2; python_version < '3.11'",
        "numpy<1.24; python_version < '3.11'",  # fairseq 0.12.2 uses np.float (untested here)
        "torch>=2.1",
        "sentencepiece>=0.1.99",
        "sacrebleu>=2.0",
        "hydra-core>=1.0.7",
        # fairseq (ve-fairseq 0.12.3 too) calls np.compat.long, which numpy 2 removed: the plugin puts
        # that one name back (fairseq_moe_infer/fairseq_patches.py). Pinning numpy<2 instead crashed
        # (segfault) next to scipy/scikit-learn wheels built for numpy 2.
        "numpy>=1.24; python_version >= '3.11'",
        "tqdm",
        "matplotlib",  # scripts/evaluate.py's tokens-per-expert heat map
    ],
    # triton: its CPU interpreter runs the fused-kernel test (tests/test_kernels.py) without a GPU
    extras_require={"dev": ["pytest", "ruff", "scipy",  # scipy: the placement bound (HiGHS MILP)
                            "triton; sys_platform == 'linux' and platform_machine == 'x86_64'"]},
)
