#!/usr/bin/env python3
"""Copy the cp312 wheels the device machine lacks into .whl/, slimming fairseq's.

The device machine (see ``../shared/device/README.md``) has no fairseq and no
internet; its wheels travel with each device call, and a call carries at most
64 MiB. fairseq's wheel is 20 MB, mostly extensions this project never loads
(``libnat``, ``libbase``, the simultaneous-translation binding) and example
assets; they are left out of the copy (and out of its RECORD).

Usage: python scripts/device_wheels.py [--src ../shared/device/wheels] [--dst .whl]
"""

import argparse
import os
import shutil
import zipfile

DROP_SUFFIXES = (".npy", ".flac", ".wav", ".png", ".jpg", ".ipynb", ".pdf")
DROP_NAMES = ("libnat.", "libbase.", "alignment_train_cpu_binding.", "libnat_cuda.")


def dropped(name: str) -> bool:
    base = os.path.basename(name)
    return base.startswith(DROP_NAMES) or name.endswith(DROP_SUFFIXES)


def slim(src: str, dst: str) -> None:
    """Rewrite wheel ``src`` to ``dst`` without the dropped members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if dropped(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if not dropped(ln.split(",")[0])]
                data = ("\n".join(lines) + "\n").encode()
            zout.writestr(info, data)


def main():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=os.path.join(here, "..", "shared", "device", "wheels"), help="wheel folder")
    p.add_argument("--dst", default=os.path.join(here, ".whl"), help="output folder (git-ignored)")
    a = p.parse_args()
    os.makedirs(a.dst, exist_ok=True)
    for name in sorted(os.listdir(a.src)):
        src, dst = os.path.join(a.src, name), os.path.join(a.dst, name)
        if name.startswith("ve_fairseq"):
            slim(src, dst)
        else:
            shutil.copy(src, dst)
        print(f"{name}: {os.path.getsize(dst) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
