#!/usr/bin/env python3
"""Print shell ``export`` lines that let torch CUDA extensions (the peers of bench_peers.py) build and
load against the CUDA pip wheels beside torch, for ``benchmarks/build_peers.sh``.

A CUDA toolkit assembled from pip wheels may lack headers or unversioned libraries that the peers'
setup.py files expect (``cublas_v2.h`` through torch's ``ATen/cuda/CUDAContext.h``, ``nvrtc.h`` and
``-lnvrtc`` / ``-lcuda`` for Tutel, ``nccl.h`` for Tutel's optional NCCL part). This adds the wheels'
``nvidia/*/include`` to CPATH (searched after torch's ``-I CUDA_HOME/include``, so the toolkit's own
headers win) and ``nvidia/*/lib`` plus a folder of unversioned links (``libnvrtc.so`` ->
``libnvrtc.so.13``; ``libcuda.so`` -> the toolkit's stub or the driver's ``libcuda.so.1``) to
LIBRARY_PATH, and writes ``ENV_FILE`` setting LD_LIBRARY_PATH to the same library folders for the runs.

Usage: eval "$(python3 benchmarks/peer_cuda_env.py LINK_DIR ENV_FILE)"
"""

import glob
import os
import subprocess
import sys


def main(links: str, env_file: str) -> None:
    os.makedirs(links, exist_ok=True)
    try:
        import nvidia

        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    inc = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "include")))]
    lib = [d for r in roots for d in sorted(glob.glob(os.path.join(r, "*", "lib")))]
    for d in lib:
        for f in sorted(glob.glob(os.path.join(d, "lib*.so.*"))):
            name = os.path.basename(f).split(".so")[0] + ".so"
            if not os.path.exists(os.path.join(d, name)) and not os.path.lexists(os.path.join(links, name)):
                os.symlink(f, os.path.join(links, name))
    from torch.utils.cpp_extension import CUDA_HOME

    home = CUDA_HOME or "/nonexistent"
    stubs = glob.glob(os.path.join(home, "lib*", "stubs", "libcuda.so")) + glob.glob(
        os.path.join(home, "targets", "*", "lib", "stubs", "libcuda.so"))
    if not stubs and not os.path.lexists(os.path.join(links, "libcuda.so")):
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
        driver = [line.split("=>")[-1].strip() for line in out.splitlines() if "libcuda.so.1 " in line]
        if driver:
            os.symlink(driver[0], os.path.join(links, "libcuda.so"))
    with open(env_file, "w") as f:
        f.write('export LD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' % ":".join(lib))
    libs = [links] + lib + [os.path.dirname(p) for p in stubs[:1]]
    print('export CPATH="%s${CPATH:+:$CPATH}" LIBRARY_PATH="%s${LIBRARY_PATH:+:$LIBRARY_PATH}"' % (":".join(inc), ":".join(libs)))


if __name__ == "__main__":
    main(*sys.argv[1:3])
