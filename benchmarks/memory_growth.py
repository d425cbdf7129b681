"""Host and device memory over a long ``fairseq-generate`` run with expert buffering (issue: no growth).

Runs fairseq's own ``fairseq_cli.generate`` in this process on a set of ``--sentences`` sentences
(the bundled Multi30k test sets, en-de/fr/cs, repeated until the count is reached) with the given
``--moe-*`` flags, and samples, every ``--sample-every`` MoE-layer forwards (a global forward hook on
the MoE layers; fairseq is not changed): the resident set size of the process (``/proc/self/statm``,
bytes) and, on CUDA, ``torch.cuda.memory_allocated`` / ``memory_reserved`` (bytes), with the number
of sentences started so far (the hook counts the first encoder MoE layer's batches).

Growth is judged on the second half of the run (after warm-up: the allocator's pools, the
buffered store's pinned copies and fairseq's caches are filled in the first batches): the
least-squares slope of each series against sentences, in bytes per 1,000 sentences, and the
difference between the last sample and the sample at mid-run.

Usage (CPU, the bundled model; on the H200 add ``--device cuda``)::

    python benchmarks/memory_growth.py --sentences 10000 --out benchmarks/results/memory_growth_cpu.json \\
        -- --moe-expert-buffer-size 4 --moe-buffer-policy lifo --moe-gating dynamic
"""

import argparse
import os
import sys
import tempfile
import tracemalloc

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import REPO, run_info, write_json  # noqa: E402

ASSETS = os.path.join(REPO, "assets")
MT = os.path.join(ASSETS, "mt")
CKPT = os.path.join(ASSETS, "checkpoints", "mt_moe", "checkpoint.pt")


def repeated_test_set(folder: str, sentences: int) -> str:
    """Binarized ``test.src-tgt.{src,tgt}`` of ``sentences`` sentences: the bundled test, test1 and
    test2 sets in turn, repeated. Returns the data folder (with the bundled dictionaries)."""
    import shutil

    from fairseq.data import data_utils, indexed_dataset

    sets = {side: [data_utils.load_indexed_dataset(os.path.join(MT, f"{split}.src-tgt.{side}"), None)
                   for split in ("test", "test1", "test2")] for side in ("src", "tgt")}
    pool = [(k, i) for k, ds in enumerate(sets["src"]) for i in range(len(ds))]
    for side in ("src", "tgt"):
        out = indexed_dataset.make_builder(os.path.join(folder, f"test.src-tgt.{side}.bin"), impl="mmap", vocab_size=10000)
        for n in range(sentences):
            k, i = pool[n % len(pool)]
            out.add_item(sets[side][k][i])
        out.finalize(os.path.join(folder, f"test.src-tgt.{side}.idx"))
        shutil.copy(os.path.join(MT, f"dict.{side}.txt"), folder)
    return folder


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemorySampler:
    """Global forward hook on the MoE layers: a memory sample every ``every`` MoE forwards."""

    def __init__(self, every: int, python_heap: bool = False):
        from fairseq_moe_infer.moe import MoELayer

        self.every, self.calls, self.sentences, self.samples = every, 0, 0, []
        self.python_heap, self.snapshots = python_heap, []
        self._cls, self._first = MoELayer, None
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if not isinstance(module, self._cls) or module.training:
            return
        if self._first is None:
            self._first = module
        if module is self._first and args and args[0].dim() == 3:  # [B, T, d]: one encoder batch of B sentences
            self.sentences += int(args[0].shape[0])
        self.calls += 1
        if self.calls % self.every == 0:
            s = {"moe_forwards": self.calls, "sentences_started": self.sentences, "rss_bytes": _rss_bytes()}
            if torch.cuda.is_available():
                s.update(cuda_allocated_bytes=torch.cuda.memory_allocated(), cuda_reserved_bytes=torch.cuda.memory_reserved())
            if self.python_heap:
                s["python_heap_bytes"] = tracemalloc.get_traced_memory()[0]
                self.snapshots.append(tracemalloc.take_snapshot())
                del self.snapshots[1:-1]  # keep the first and the latest
            self.samples.append(s)

    def close(self):
        self._handle.remove()


def _short_path(path: str) -> str:
    """``path`` relative to the repository, or from ``site-packages/`` on: no machine's folders in results."""
    if path.startswith(REPO + os.sep):
        return os.path.relpath(path, REPO)
    marker = os.sep + "site-packages" + os.sep
    return "site-packages/" + path.split(marker, 1)[1] if marker in path else path


def heap_growth(first, last, top: int = 15) -> list:
    """The ``top`` source lines whose live Python allocations grew most between two tracemalloc
    snapshots: ``where`` (file:line), ``size_diff_bytes``, ``count_diff``, ``size_bytes``."""
    stats = last.compare_to(first, "lineno")
    stats.sort(key=lambda d: d.size_diff, reverse=True)
    return [{"where": f"{_short_path(d.traceback[0].filename)}:{d.traceback[0].lineno}", "size_diff_bytes": d.size_diff,
             "count_diff": d.count_diff, "size_bytes": d.size} for d in stats[:top]]


def growth(samples: list, key: str) -> dict:
    """Slope (bytes per 1,000 sentences, least squares) and last - mid difference of ``key`` over the
    second half of the samples."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return {"slope_bytes_per_1k_sentences": None, "last_minus_mid_bytes": None}
    x = np.array([s["sentences_started"] for s in half], dtype=np.float64)
    y = np.array([s[key] for s in half], dtype=np.float64)
    slope = float(np.polyfit(x, y, 1)[0]) * 1000 if np.ptp(x) > 0 else None
    return {"slope_bytes_per_1k_sentences": None if slope is None else round(slope, 1),
            "last_minus_mid_bytes": int(y[-1] - y[0]), "mid_bytes": int(y[0]), "last_bytes": int(y[-1]),
            "max_bytes": int(y.max()), "sentences_from": int(x[0]), "sentences_to": int(x[-1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sample-every", type=int, default=200, help="MoE-layer forwards between samples")
    p.add_argument("--checkpoint", default=CKPT)
    p.add_argument("--python-heap", action="store_true",
                   help="also trace Python allocations (tracemalloc; slower): their size at each sample, and the source "
                        "lines that grew most between the first and the last sample")
    p.add_argument("--out", required=True)
    p.add_argument("generate_args", nargs="*", help="extra fairseq-generate flags (after --)")
    a = p.parse_args(argv)
    if a.sentences < 1 or a.batch_size < 1 or a.sample_every < 1:
        p.error("--sentences, --batch-size and --sample-every must be >= 1")

    import fairseq_cli.generate as generate
    from fairseq import options

    with tempfile.TemporaryDirectory() as tmp:
        data = repeated_test_set(tmp, a.sentences)
        args = [data, "--user-dir", os.path.join(REPO, "fairseq_moe_infer"), "--task", "moe_translation",
                "--path", a.checkpoint, "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "test",
                "--beam", str(a.beam), "--batch-size", str(a.batch_size), "--required-batch-size-multiple", "1",
                "--num-workers", "0", "--quiet"]
        args += ["--cpu"] if a.device == "cpu" else ["--fp16"]
        args += a.generate_args
        parser = options.get_generation_parser()
        if a.python_heap:
            tracemalloc.start()
        sampler = MemorySampler(a.sample_every, a.python_heap)
        generate.main(options.parse_args_and_arch(parser, input_args=args))
        sampler.close()

    keys = ["rss_bytes"] + (["cuda_allocated_bytes", "cuda_reserved_bytes"] if a.device == "cuda" else [])
    keys += ["python_heap_bytes"] if a.python_heap else []
    result = {**run_info(), "sentences": a.sentences, "batch_size": a.batch_size, "beam": a.beam,
              "generate_args": a.generate_args, "samples": sampler.samples,
              "growth_second_half": {k: growth(sampler.samples, k) for k in keys}}
    if len(sampler.snapshots) == 2:
        result["python_heap_growth_first_to_last_sample"] = heap_growth(*sampler.snapshots)
    write_json(a.out, result)
    for k, g in result["growth_second_half"].items():
        print(f"{k}: mid {g.get('mid_bytes', 0) / 2**20:.1f} MiB -> last {g.get('last_bytes', 0) / 2**20:.1f} MiB "
              f"(slope {g['slope_bytes_per_1k_sentences']} B per 1k sentences, sentences {g.get('sentences_from')}"
              f"-{g.get('sentences_to')})")
    return result


if __name__ == "__main__":
    main()
