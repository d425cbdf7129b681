#!/usr/bin/env python3
"""Train the bundled models (MoE and dense baselines) with ``fairseq-train``.

Recipes (the same optimiser, schedule and budget for MoE and dense of a kind):

* ``mt_moe``   -- ``transformer_moe_small``: multilingual en->{de,fr,cs}, 16 experts
  every 2nd layer in encoder and decoder, top-2, gating from ``--moe-gating``;
* ``mt_dense`` -- the same with ``--moe-freq 0`` (same active parameters);
* ``mt_moe64`` -- ``mt_moe`` with 64 experts per MoE layer (expert buffering's traces: with
  ``--record-traces DIR`` its routing on the three test sets is recorded after training);
* ``lm_moe``   -- ``transformer_lm_moe_small``: 16 experts every 2nd layer;
* ``lm_dense`` -- the same with ``--moe-freq 0``.

The selected runs go in parallel (on one GPU, or one per GPU with ``--gpus``) and
each writes ``<save-root>/<name>/model_card.json`` with its exact command, wall
time, updates reached and device. ``--export-dir`` then averages the last interval
checkpoints into a serving checkpoint (fp16, experts in shard files); with
``--match-updates`` every run is exported at the same update.

The device runs that made the bundled models (model cards in assets/checkpoints/):
    python scripts/train_models.py --models lm_moe lm_dense --stop-minutes 8.55 \
        --export-dir exported --evaluate
    python scripts/train_models.py --models mt_moe mt_dense --gpus 2 --moe-gating dynamic \
        --mt-max-tokens 16384 --mt-updates 20000 --stop-minutes 7.7 --keep-interval-updates 40 \
        --match-updates --save-root /tmp/ck --export-dir /tmp/exp
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DIR = os.path.join(REPO, "fairseq_moe_infer")

COMMON = [
    "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3", "--lr-scheduler", "inverse_sqrt",
    "--warmup-updates", "600", "--dropout", "0.3", "--attention-dropout", "0.1", "--fp16",
    "--moe-gating-use-fp32", "--seed", "1", "--num-workers", "2", "--log-format", "simple",
    "--log-interval", "100", "--no-epoch-checkpoints", "--validate-interval", "5",
]
MT = ["--task", "moe_translation", "--arch", "transformer_moe_small", "--source-lang", "src", "--target-lang", "tgt",
      "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--weight-decay", "0.0001"]
LM = ["--task", "moe_language_modeling", "--arch", "transformer_lm_moe_small", "--criterion", "moe_cross_entropy",
      "--tokens-per-sample", "256", "--sample-break-mode", "none", "--weight-decay", "0.01"]
RECIPES = {
    "mt_moe": ("mt", MT),
    "mt_dense": ("mt", MT + ["--moe-freq", "0"]),
    "mt_moe64": ("mt", MT + ["--moe-expert-count", "64"]),
    "lm_moe": ("lm", LM),
    "lm_dense": ("lm", LM + ["--moe-freq", "0"]),
}


def is_moe(name: str) -> bool:
    return "_moe" in name


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as e:  # the card still records that the name was unavailable
        return f"unknown ({e})"


def command(name: str, a) -> list:
    kind, flags = RECIPES[name]
    updates = a.mt_updates if kind == "mt" else a.lm_updates
    tokens = a.mt_max_tokens if kind == "mt" else a.lm_max_tokens
    common = [f for f in COMMON if f != "--fp16"] + ["--cpu"] if a.cpu else COMMON
    gating = ["--moe-gating", a.moe_gating] if is_moe(name) else []
    return [
        sys.executable, "-m", "fairseq_cli.train", os.path.join(a.data_bin, kind), "--user-dir", USER_DIR,
        *flags, "--max-tokens", str(tokens), *gating, *common, "--save-interval-updates", str(a.save_interval_updates),
        "--keep-interval-updates", str(a.keep_interval_updates),
        "--max-update", str(updates),
        "--stop-time-hours", f"{a.stop_minutes / 60:.4f}", "--save-dir", os.path.join(a.save_root, name),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="runs to start")
    p.add_argument("--data-bin", default=os.path.join(REPO, "data-bin"), help="folder with mt/ and lm/ data-bins")
    p.add_argument("--save-root", default=os.path.join(REPO, "checkpoints"), help="checkpoint folders go here")
    p.add_argument("--mt-updates", type=int, default=2600, help="--max-update of the translation runs")
    p.add_argument("--lm-updates", type=int, default=2600, help="--max-update of the LM runs")
    p.add_argument("--mt-max-tokens", type=int, default=12288, help="--max-tokens of the translation runs")
    p.add_argument("--lm-max-tokens", type=int, default=16384, help="--max-tokens of the LM runs")
    p.add_argument("--moe-gating", default="static", choices=["static", "dynamic"],
                   help="gating of the MoE runs during training (dynamic drops nothing and is faster)")
    p.add_argument("--gpus", type=int, default=1,
                   help="spread the runs round-robin over this many GPUs (CUDA_VISIBLE_DEVICES per run)")
    p.add_argument("--stop-minutes", type=float, default=60.0, help="wall-clock limit of each run")
    p.add_argument("--export-dir", default=None, help="write averaged fp16 serving checkpoints here")
    p.add_argument("--average", type=int, default=4, help="interval checkpoints to average on export")
    p.add_argument("--save-interval-updates", type=int, default=250, help="updates between interval checkpoints")
    p.add_argument("--keep-interval-updates", type=int, default=None,
                   help="interval checkpoints each run keeps (default 4; with --match-updates all: -1)")
    p.add_argument("--match-updates", action="store_true",
                   help="export (and evaluate) every run at the last interval checkpoint all runs reached, so "
                        "MoE and dense are compared at the same number of updates when a run stops on --stop-minutes")
    p.add_argument("--cpu", action="store_true", help="train on the CPU in float32 (smoke tests)")
    p.add_argument("--record-traces", default=None, metavar="DIR",
                   help="after training, record each MT MoE run's routing (fairseq-generate --moe-record-trace, beam 4, "
                        "64 sentences a batch, dynamic gating) on the test sets into DIR/<name>_en-<lang>.npz")
    p.add_argument("--evaluate", action="store_true",
                   help="run scripts/evaluate.py on each exported model as soon as its training ends")
    a = p.parse_args(argv)
    if a.keep_interval_updates is None:
        a.keep_interval_updates = -1 if a.match_updates else 4  # a faster run must not delete the common update

    procs = {}
    for i, name in enumerate(a.models):
        os.makedirs(os.path.join(a.save_root, name), exist_ok=True)
        cmd = command(name, a)
        env = dict(os.environ)
        if a.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % a.gpus)
        log = open(os.path.join(a.save_root, name, "train.log"), "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cmd, time.time())
        print(f"[train] started {name} (GPU {i % a.gpus})", file=sys.stderr, flush=True)
    cards, evals = {}, {}
    while len(cards) < len(procs):
        for name, (proc, cmd, t0) in procs.items():
            if name in cards or proc.poll() is None:
                continue
            cards[name] = finish(name, proc.returncode, cmd, time.time() - t0, a, export_now=not a.match_updates)
            if a.evaluate and proc.returncode == 0 and "export" in cards[name]:
                evals[name] = start_evaluation(name, a)
        time.sleep(2)
    if a.match_updates and a.export_dir:
        done = [n for n, c in cards.items() if c["returncode"] == 0]
        common = min((max(interval_checkpoints(os.path.join(a.save_root, n)), default=0) for n in done), default=0)
        if not common:
            sys.exit("[train] error: --match-updates: no update with an interval checkpoint in every finished run "
                     f"({', '.join(done) or 'no run finished'}); nothing exported")
        missing = {n: m for n in done if (m := missing_for_export(os.path.join(a.save_root, n), common, a))}
        if missing:  # checked for every run before any export or evaluation starts
            sys.exit(f"[train] error: --match-updates: interval checkpoints to average at update {common} are gone: "
                     f"{missing}; raise --keep-interval-updates (-1 keeps all)")
        print(f"[train] exporting {', '.join(done)} at update {common}", file=sys.stderr, flush=True)
        for name in done:
            cards[name]["export"] = export(name, a, upto=common)
            cards[name]["exported_at_update"] = common
            write_card(cards[name], a)
            if a.evaluate:
                evals[name] = start_evaluation(name, a)
    if a.record_traces:
        for name, card in cards.items():
            if card["returncode"] == 0 and is_moe(name) and RECIPES[name][0] == "mt":
                card["traces"] = record_traces(name, a)
                write_card(card, a)
    for name, proc in evals.items():
        cards[name]["evaluation_returncode"] = proc.wait()
    print(json.dumps(cards))
    if any(c["returncode"] for c in cards.values()):
        sys.exit(1)


def finish(name: str, rc: int, cmd: list, wall: float, a, export_now: bool = True) -> dict:
    """Write the model card of a finished run (and export it unless ``export_now`` is False)."""
    with open(os.path.join(a.save_root, name, "train.log")) as f:
        lines = f.read().splitlines()
    last = [ln for ln in lines if "| train |" in ln or "| valid |" in ln][-2:]
    card = {"name": name, "returncode": rc, "wall_seconds": round(wall, 1), "device": device_name(),
            "command": "fairseq-train " + " ".join(cmd[3:]).replace(REPO + "/", ""), "last_log_lines": last}
    if a.export_dir and rc == 0 and export_now:
        card["export"] = export(name, a)
    write_card(card, a)
    print(f"[train] {name}: exit {rc} after {wall:.0f}s; {last[-1] if last else ''}", file=sys.stderr, flush=True)
    return card


def record_traces(name: str, a) -> list:
    """Record the routing of run ``name`` (its last checkpoint) on the MT test sets with
    ``fairseq-generate --moe-record-trace`` (beam 4, 64 sentences a batch, dynamic gating);
    returns the trace files written."""
    data = os.path.join(a.data_bin, "mt")
    with open(os.path.join(data, "splits.json")) as f:
        splits = json.load(f)["splits"]
    os.makedirs(a.record_traces, exist_ok=True)
    written = []
    for lang, split in sorted(splits.items()):
        out = os.path.join(a.record_traces, f"{name}_en-{lang}.npz")
        cmd = [sys.executable, "-m", "fairseq_cli.generate", data, "--user-dir", USER_DIR, "--task", "moe_translation",
               "--path", os.path.join(a.save_root, name, "checkpoint_last.pt"), "--source-lang", "src",
               "--target-lang", "tgt", "--gen-subset", split, "--beam", "4", "--batch-size", "64",
               "--required-batch-size-multiple", "1", "--moe-gating", "dynamic", "--moe-record-trace", out]
        cmd += ["--cpu"] if a.cpu else ["--fp16"]
        with open(os.path.join(a.save_root, name, f"generate.{lang}.log"), "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"[train] {name}: routing trace en-{lang} -> {out} (exit {rc})", file=sys.stderr, flush=True)
        if rc == 0:
            written.append(out)
    return written


def write_card(card: dict, a) -> None:
    with open(os.path.join(a.save_root, card["name"], "model_card.json"), "w") as f:
        json.dump(card, f, indent=1)


def interval_checkpoints(folder: str) -> dict:
    """{update: file name} of fairseq's ``checkpoint_<epoch>_<update>.pt`` files in ``folder``."""
    return {
        int(f.split("_")[-1][:-3]): f
        for f in os.listdir(folder)
        if f.startswith("checkpoint_") and f.endswith(".pt") and f.count("_") == 2 and f.split("_")[-1][:-3].isdigit()
    }


def start_evaluation(name: str, a) -> subprocess.Popen:
    """Run scripts/evaluate.py on an exported model in the background (results in its folder)."""
    ckpt = os.path.join(a.export_dir, name, "checkpoint.pt")
    kind = "--skip-lm" if name.startswith("mt") else "--skip-mt"
    flag = "--mt-checkpoint" if name.startswith("mt") else "--lm-checkpoint"
    out = os.path.join(a.save_root, name, "evaluation")
    cmd = [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), flag, ckpt, kind, "--out-dir", out]
    log = open(os.path.join(a.save_root, name, "evaluate.log"), "w")
    print(f"[train] evaluating {name}", file=sys.stderr, flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def missing_for_export(folder: str, upto: int, a) -> list:
    """Updates among the last ``--average`` intervals up to ``upto`` (``upto``, ``upto`` -
    interval, ..., > 0) whose checkpoint is not in ``folder`` (a run deletes old ones beyond
    ``--keep-interval-updates``; a short run simply has fewer intervals, which is fine)."""
    wanted = [u for u in range(upto, 0, -a.save_interval_updates)][: a.average]
    found = interval_checkpoints(folder)
    return [u for u in wanted if u not in found]


def export(name: str, a, upto: int = None) -> dict:
    """Average the last ``--average`` interval checkpoints (at most update ``upto``) into fp16 serving files."""
    sys.path.insert(0, REPO)
    from fairseq_moe_infer.checkpoint import export_checkpoint

    folder = os.path.join(a.save_root, name)
    found = interval_checkpoints(folder)
    ckpts = [found[u] for u in sorted(found) if upto is None or u <= upto][-a.average:]
    if not ckpts:
        ckpts = ["checkpoint_last.pt"]
    out = os.path.join(a.export_dir, name, "checkpoint.pt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shards = 2 if is_moe(name) else 0
    written = export_checkpoint([os.path.join(folder, c) for c in ckpts], out, shards)
    return {"averaged": ckpts, "files": [os.path.basename(w) for w in written]}


if __name__ == "__main__":
    main()
