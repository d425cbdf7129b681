#!/usr/bin/env python3
"""Download the peer MoE implementations' public sources into ``.peers/`` (git-ignored).

``benchmarks/build_peers.sh`` builds them on a GPU machine that has no network
(``benchmarks/bench_peers.py`` then measures them beside this plugin's MoE layer). Nothing
downloaded here is committed: the folder is in ``.gitignore``.

What it fetches (pinned; see ``SDISTS`` and ``WHEELS``):

* PyPI source distributions, with pip: MegaBlocks (``megablocks``), its ``stanford-stk`` and
  ``grouped_gemm`` (the sdist carries CUTLASS's headers under ``third_party/cutlass``; checked
  here), and DeepSpeed (built on the device with ``DS_BUILD_OPS=0``: no prebuilt ops);
* wheels of DeepSpeed's pure-Python needs that the device image lacks (``hjson``, ``pydantic``
  and its parts), for CPython 3.12 on manylinux x86-64;
* Tutel, which is not on PyPI: ``--tutel-src`` names a git checkout of ``microsoft/tutel``
  (e.g. a mirror made by the search tool's ``fetch github:microsoft/tutel``, or
  ``git clone https://github.com/microsoft/tutel``); its HEAD is archived with ``git archive``.
  Without it the Tutel tarball already in ``.peers/`` is kept (or Tutel is reported missing).

It ends with the sizes: a device call carries at most 64 MiB of working tree in all
(tracked files + carried folders such as ``.whl`` and ``.peers``), so the room left is printed.

Example:
    python scripts/fetch_peers.py --tutel-src /path/to/tutel.git
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDISTS = [("megablocks", "0.10.0"), ("stanford-stk", "0.7.1"), ("grouped_gemm", "0.3.0"), ("deepspeed", "0.19.8")]
# DeepSpeed's requirements missing from the device image (its einops, msgpack, ninja, numpy, packaging,
# psutil, py-cpuinfo, tqdm are there); one version each (two stop pip's install)
WHEELS = [("hjson", "3.1.0"), ("pydantic", "2.14.3"), ("pydantic-core", "2.50.4"), ("annotated-types", "0.8.0"),
          ("typing-inspection", "0.4.5"), ("typing-extensions", "4.16.0")]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
DEVICE_TREE_LIMIT_MIB = 64


def pip(args, env=None) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"] + args
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


# pip prepares an sdist's metadata by running its setup.py. grouped_gemm's builds a CUDAExtension there,
# which a torch without CUDA refuses (CUDA_HOME is None); for that step alone it gets this stand-in torch
# (the names its setup.py imports). The sdist downloaded is the registry's file, unchanged.
METADATA_TORCH_STUB = {
    "torch/__init__.py": "__version__ = '0+metadata-stub'\n",
    "torch/utils/__init__.py": "",
    "torch/utils/cpp_extension.py": (
        "from setuptools import Extension\n"
        "from setuptools.command.build_ext import build_ext as BuildExtension  # noqa: F401\n"
        "CUDA_HOME = None\n\n"
        "def CUDAExtension(name, sources, *args, **kwargs):\n"
        "    return Extension(name, sources)\n\n"
        "CppExtension = CUDAExtension\n"),
}
NEEDS_TORCH_STUB = {"grouped_gemm"}


def fetch_sdists(out: str) -> None:
    # no build isolation: their build requirements pin torch 2.7; TORCH_CUDA_ARCH_LIST set so that
    # megablocks/grouped_gemm do not ask torch for the GPU's compute capability
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="9.0", DS_BUILD_OPS="0")
    with tempfile.TemporaryDirectory() as stub:
        for rel, text in METADATA_TORCH_STUB.items():
            os.makedirs(os.path.dirname(os.path.join(stub, rel)), exist_ok=True)
            with open(os.path.join(stub, rel), "w") as f:
                f.write(text)
        for name, version in SDISTS:
            env_i = dict(env, PYTHONPATH=os.pathsep.join([stub, env.get("PYTHONPATH", "")])) if name in NEEDS_TORCH_STUB else env
            pip(["--no-binary", ":all:", "--no-build-isolation", "-d", out, f"{name}=={version}"], env_i)


def fetch_wheels(out: str) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pip(["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", *plat, "-d", out]
        + [f"{n}=={v}" for n, v in WHEELS])


def archive_tutel(src: str, out: str) -> str:
    sha = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    for old in glob.glob(os.path.join(out, "tutel-*.tar.gz")):
        os.remove(old)
    path = os.path.join(out, f"tutel-{sha[:12]}.tar.gz")
    subprocess.run(["git", "-C", src, "archive", "--format=tar.gz", "--prefix=tutel/", "-o", os.path.abspath(path), "HEAD"],
                   check=True)
    return path


def check_grouped_gemm_has_cutlass(out: str) -> None:
    """grouped_gemm's CUDA sources include CUTLASS headers from third_party/cutlass (a git submodule
    in its repository); the PyPI sdist must carry them, or the device build fails."""
    (path,) = glob.glob(os.path.join(out, "grouped_gemm-*.tar.gz"))
    with tarfile.open(path) as t:
        names = t.getnames()
    if not any(n.endswith("third_party/cutlass/include/cutlass/cutlass.h") for n in names):
        sys.exit(f"fetch_peers: {path} lacks third_party/cutlass/include; fetch CUTLASS's include/ folder "
                 "(github:NVIDIA/cutlass) and unpack it there before building")
    print(f"{os.path.basename(path)}: CUTLASS headers included ({sum('cutlass/include/' in n for n in names)} files)")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tracked_bytes() -> int:
    out = subprocess.run(["git", "-C", REPO, "ls-files", "-z"], check=True, capture_output=True).stdout
    return sum(os.path.getsize(os.path.join(REPO, p)) for p in out.decode().split("\0") if p and
               os.path.isfile(os.path.join(REPO, p)))


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else 0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, ".peers"), help="download folder (git-ignored)")
    p.add_argument("--tutel-src", help="git checkout (or bare mirror) of microsoft/tutel to archive")
    p.add_argument("--skip-pip", action="store_true", help="only archive Tutel and print the sizes")
    a = p.parse_args(argv)
    os.makedirs(os.path.join(a.out, "wheels"), exist_ok=True)
    if not a.skip_pip:
        fetch_sdists(a.out)
        fetch_wheels(os.path.join(a.out, "wheels"))
    if a.tutel_src:
        archive_tutel(a.tutel_src, a.out)
    check_grouped_gemm_has_cutlass(a.out)
    files = sorted(glob.glob(os.path.join(a.out, "*.tar.gz")) + glob.glob(os.path.join(a.out, "wheels", "*.whl")))
    if not glob.glob(os.path.join(a.out, "tutel-*.tar.gz")):
        print("fetch_peers: no Tutel source: pass --tutel-src (see --help); build_peers.sh will report Tutel missing",
              file=sys.stderr)
    manifest = [{"file": os.path.relpath(f, a.out), "bytes": os.path.getsize(f), "sha256": sha256(f)} for f in files]
    with open(os.path.join(a.out, "MANIFEST.json"), "w") as f:
        json.dump({"sdists": SDISTS, "wheels": WHEELS, "files": manifest}, f, indent=1)
    mib = 2**20
    peers, whl, tracked = folder_bytes(a.out), folder_bytes(os.path.join(REPO, ".whl")), tracked_bytes()
    for m in manifest:
        print(f"{m['bytes'] / mib:8.2f} MiB  {m['file']}")
    total = peers + whl + tracked
    print(f".peers {peers / mib:.1f} MiB + .whl {whl / mib:.1f} MiB + tracked files {tracked / mib:.1f} MiB = "
          f"{total / mib:.1f} MiB of the device call's {DEVICE_TREE_LIMIT_MIB} MiB")
    if total > DEVICE_TREE_LIMIT_MIB * mib:
        sys.exit("fetch_peers: too large for one device call")


if __name__ == "__main__":
    main()
