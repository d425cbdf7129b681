#!/usr/bin/env python3
"""``fairseq-generate`` itself on the NLLB-shaped MoE model, on 1 GPU and expert-parallel on N GPUs.

Builds the model of ``bench_end_to_end.py --model mt`` (d=2048, FFN 8192, 16 heads, MoE every
4th layer, E=128, top-2, vocabulary 32k; ``--layers`` per side, default 4 so the checkpoint
stays near 17 GB) with random weights through the plugin's task, saves it as a fairseq
checkpoint, binarizes a test set of random 64-token sources, then runs the stock tool

    python -m fairseq_cli.generate DATA --path CKPT --task moe_translation --fp16 --beam 4
        --max-len-a 0 --max-len-b 32 --min-len 32 --batch-size B [--distributed-world-size N]

once per world size (N ranks through fairseq's own launcher, experts sharded, the set split
between ranks). Every GPU gets the same work: ``--batches`` batches of B sentences per GPU
(the first of them is the warm-up: it is inside fairseq's timer, which the JSON says).
Reported per world size, per GPU: generated tokens/s (rank 0's ``Translated ... tokens in T s``
line: its own share and its own generation time), decoder step time (that time over its
batches x 33 decoder steps), peak memory per GPU (every rank's ``--moe-stats-json``), and the
wall time of the run. Compare with ``bench_end_to_end.py --model mt --layers L --workloads
mt-generate`` (same generator, same shapes, timed with CUDA events without fairseq's data
pipeline and output).

Example (2 GPUs; or one world size per command, sharing --workdir so the checkpoint is built once):
    python benchmarks/bench_generate_ep.py --world-sizes 1 2 --out benchmarks/results/generate_ep_2xh200.json
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_end_to_end import SHAPES, USER_DIR, build  # noqa: E402
from benchmarks.common import REPO, run_info, write_json  # noqa: E402

TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")


def save_checkpoint(folder: str, experts: int, layers: int) -> str:
    """A fairseq checkpoint of the random-weight model (bf16 tensors; fairseq-generate --fp16 loads it)."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    from benchmarks.bench_end_to_end import model_argv, write_dict

    write_dict(folder, ["dict.src.txt", "dict.tgt.txt"], SHAPES["mt"]["vocab"])
    model, _ = build("mt", experts, layers)
    args = options.parse_args_and_arch(options.get_training_parser(),
                                       model_argv("mt", experts, layers, folder) + ["--user-dir", USER_DIR])
    cfg = convert_namespace_to_omegaconf(args)
    cfg.task.data = "."  # no machine path in the checkpoint; generate is given the data folder
    cfg.common.user_dir = None
    state = {"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "args": None,
             "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "optimizer_name": "none",
                                    "lr_scheduler_state": {}, "num_updates": 0}], "extra_state": {}}
    del model
    torch.cuda.empty_cache()
    path = os.path.join(folder, "checkpoint.pt")
    torch.save(state, path)
    return path


def write_test_set(folder: str, sentences: int, seed: int = 0) -> None:
    """``test.src-tgt.{src,tgt}`` of random in-vocabulary tokens (64-token sources, 32-token references)."""
    from fairseq.data import Dictionary, indexed_dataset

    d = Dictionary.load(os.path.join(folder, "dict.src.txt"))
    g = torch.Generator().manual_seed(seed)
    for side, length in (("src", SHAPES["mt"]["seq"]), ("tgt", SHAPES["mt"]["out_len"])):
        if side == "tgt":
            shutil.copy(os.path.join(folder, "dict.src.txt"), os.path.join(folder, "dict.tgt.txt"))
        out = indexed_dataset.make_builder(os.path.join(folder, f"test.src-tgt.{side}.bin"), impl="mmap",
                                           vocab_size=len(d))
        for _ in range(sentences):
            toks = torch.randint(d.nspecial, len(d), (length - 1,), generator=g)
            out.add_item(torch.cat([toks, torch.tensor([d.eos()])]).to(torch.int32))
        out.finalize(os.path.join(folder, f"test.src-tgt.{side}.idx"))


def run_generate(data: str, ckpt: str, world: int, batch: int, gating: str, out_dir: str, timeout: int) -> dict:
    s = SHAPES["mt"]
    stats = os.path.join(out_dir, f"stats_w{world}.json")
    cmd = [sys.executable, "-m", "fairseq_cli.generate", data, "--path", ckpt, "--user-dir", USER_DIR,
           "--task", "moe_translation", "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "test",
           "--fp16", "--beam", str(s["beam"]), "--max-len-a", "0", "--max-len-b", str(s["out_len"]),
           "--min-len", str(s["out_len"]), "--batch-size", str(batch), "--required-batch-size-multiple", "1",
           "--moe-gating", gating, "--moe-stats-json", stats, "--quiet", "--num-workers", "0"]
    cmd += ["--distributed-world-size", str(world)]  # fairseq's default is every visible GPU
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.time() - t0
    text = p.stdout + p.stderr
    row = {"world_size": world, "command": " ".join(cmd[1:]), "returncode": p.returncode, "wall_s": round(wall, 1)}
    if p.returncode != 0:
        row["error_tail"] = text[-3000:]
        return row
    m = TRANSLATED.search(text)
    sentences, tokens, seconds = int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")), float(m.group(3))
    batches = -(-sentences // batch)
    peaks = []
    for r in range(world):
        path = stats if r == 0 else f"{stats}.rank{r}"
        with open(path) as f:
            peaks.append(json.load(f).get("peak_accelerator_memory_bytes"))
    row.update({
        "rank0_sentences": sentences, "rank0_generated_tokens": tokens, "rank0_generation_s": seconds,
        "batches_per_gpu": batches, "sentences_per_batch": batch,
        "generated_tokens_per_s_per_gpu": round(tokens / seconds, 1),
        "generated_tokens_per_s_all_gpus": round(world * tokens / seconds, 1),
        "decoder_step_ms": round(1000 * seconds / (batches * (s["out_len"] + 1)), 2),
        "peak_memory_GiB_per_gpu": [round(b / 2**30, 2) if b else None for b in peaks],
        "timer_note": "fairseq's generation timer: sum of task.inference_step times, first (warm-up) batch included",
    })
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each (MoE every 4th)")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=512, help="sentences per batch (x32 generated tokens, x4 beams)")
    p.add_argument("--batches", type=int, default=5, help="batches per GPU (the first warms up)")
    p.add_argument("--gating", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--workdir", default=None,
                   help="where the checkpoint and data go, kept afterwards; a checkpoint already there is reused "
                   "(default: a temporary folder, removed)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per fairseq-generate run")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="bench_generate_ep_")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    ckpt = os.path.join(work, "checkpoint.pt")
    if not os.path.exists(ckpt):  # --workdir of an earlier run: reuse its checkpoint (same --experts/--layers)
        ckpt = save_checkpoint(work, a.experts, a.layers)
    build_s = time.time() - t0
    info = {"benchmark": "generate_expert_parallel", "run": run_info(), "experts": a.experts, "layers_per_side": a.layers,
            "shape": SHAPES["mt"], "gating": a.gating, "checkpoint_GB": round(os.path.getsize(ckpt) / 1e9, 2),
            "build_and_save_s": round(build_s, 1), "rows": []}
    info["run"]["gpus"] = torch.cuda.device_count()
    for world in a.world_sizes:
        data = os.path.join(work, f"data_w{world}")
        os.makedirs(data, exist_ok=True)
        shutil.copy(os.path.join(work, "dict.src.txt"), data)
        write_test_set(data, world * a.batch * a.batches)
        row = run_generate(data, ckpt, world, a.batch, a.gating, work, a.timeout)
        info["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "command"}), flush=True)
        write_json(a.out, info)
    base = next((r for r in info["rows"] if r["world_size"] == 1 and r["returncode"] == 0), None)
    key = "generated_tokens_per_s_per_gpu"
    for r in info["rows"]:
        if base and r["returncode"] == 0:
            r["per_gpu_throughput_vs_1_gpu"] = round(r[key] / base[key], 3)
    write_json(a.out, info)
    if not a.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
