"""Make the small data assets that are committed under assets/.

Run prepare_mt.py and prepare_lm.py first (full data in data-bin/mt and
data-bin/lm). This script then
  1. copies the sentencepiece models, dictionaries, binarized test splits,
     splits.json and (MT) raw test texts into assets/mt and assets/lm;
  2. builds tiny complete data-bins (train, valid, test splits) with the same
     sentencepiece models and dictionaries into data-bin/tiny/{mt,lm} and
     copies them into assets/tiny/{mt,lm}.
assets/mt, assets/lm and assets/tiny are replaced; other files under assets/
(such as README.md) are left alone.

Example:
  python scripts/bundle_assets.py
"""

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import data_common as dc

PROG = "bundle_assets"
SCRIPTS = Path(__file__).resolve().parent
FULL_FILES = {
    "mt": ["spm.model", "spm.vocab", "dict.src.txt", "dict.tgt.txt", "splits.json",
           "raw/*", "test*.src-tgt.*"],
    "lm": ["spm.model", "dict.txt", "splits.json", "test*.bin", "test*.idx"],
}
TINY_FILES = {
    "mt": ["spm.model", "dict.src.txt", "dict.tgt.txt", "splits.json", "raw/*", "*.src-tgt.*"],
    "lm": ["spm.model", "dict.txt", "splits.json", "*.bin", "*.idx"],
}
MAIN_DICT = {"mt": "dict.src.txt", "lm": "dict.txt"}
SHARED_FILES = {"mt": ["spm.model", "dict.src.txt", "dict.tgt.txt"], "lm": ["spm.model", "dict.txt"]}


def parse_args():
    """Parse the command line."""
    parser = dc.new_parser(__doc__)
    parser.add_argument(
        "--data-bin", type=Path, default=dc.REPO_ROOT / "data-bin",
        help="folder holding the full mt/ and lm/ data-bins; tiny/ is built in it "
             "(default: <repo>/data-bin)")
    parser.add_argument(
        "--assets", type=Path, default=dc.REPO_ROOT / "assets",
        help="assets folder to fill (default: <repo>/assets)")
    parser.add_argument(
        "--data-root", type=Path, default=dc.DEFAULT_DATA_ROOT,
        help=f"raw data folder passed to the prepare scripts (default: {dc.DEFAULT_DATA_ROOT})")
    parser.add_argument(
        "--tiny-train-lines", type=int, default=300,
        help="training lines per source in the tiny data-bins (default: 300)")
    parser.add_argument(
        "--tiny-eval-lines", type=int, default=50,
        help="lines per valid source and per test set in the tiny data-bins (default: 50)")
    return parser.parse_args()


def copy_selected(src, dst, patterns):
    """Replace ``dst`` by the files of ``src`` matching the glob ``patterns``."""
    if dst.exists():
        shutil.rmtree(dst)
    files = sorted({path for pattern in patterns for path in src.glob(pattern)})
    if not files:
        raise SystemExit(f"nothing to copy from {src}; run the prepare scripts first")
    for path in files:
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    dc.log(PROG, f"{dst}: {len(files)} files, {sum(p.stat().st_size for p in files)} bytes")


def build_tiny(args, kind):
    """Build the tiny data-bin ``kind`` (mt or lm) from the full one's spm model and dict."""
    full, tiny = args.data_bin / kind, args.data_bin / "tiny" / kind
    command = [
        sys.executable, str(SCRIPTS / f"prepare_{kind}.py"),
        "--data-root", args.data_root, "--out", tiny,
        "--max-train-lines", args.tiny_train_lines,
        "--max-valid-lines", args.tiny_eval_lines,
        "--max-test-lines", args.tiny_eval_lines,
        "--spm-model", full / "spm.model", "--dict", full / MAIN_DICT[kind],
    ]
    dc.log(PROG, "running " + " ".join(map(str, command)))
    subprocess.run(list(map(str, command)), check=True)
    for name in SHARED_FILES[kind]:
        if not filecmp.cmp(full / name, tiny / name, shallow=False):
            raise SystemExit(f"{tiny / name} differs from {full / name}")
    return tiny


def main():
    """Copy the full-set assets, then build and copy the tiny data-bins."""
    args = parse_args()
    for kind in ("mt", "lm"):
        copy_selected(args.data_bin / kind, args.assets / kind, FULL_FILES[kind])
    if (args.assets / "tiny").exists():
        shutil.rmtree(args.assets / "tiny")
    for kind in ("mt", "lm"):
        tiny = build_tiny(args, kind)
        copy_selected(tiny, args.assets / "tiny" / kind, TINY_FILES[kind])
    dc.log(PROG, "done")


if __name__ == "__main__":
    main()
