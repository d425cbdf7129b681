#!/usr/bin/env python3
"""The main job: evaluate MoE translation and language models with the stock fairseq tools.

By default it uses the bundled models and data (``assets/``):

* translation: ``fairseq-generate --task moe_translation`` on Multi30k
  test_2016_flickr for English -> German, French and Czech, scored by
  ``scripts/bleu.py`` (sacreBLEU, cased, detokenized);
* language modelling: ``fairseq-eval-lm --task moe_language_modeling`` perplexity
  on WikiText-2 test, Multi30k test English and the held-out tail of tiny
  Shakespeare;

each run with the plugin's ``--moe-*`` flags and its MoE summary (tokens/s,
dropped tokens, tokens per expert). Give ``--mt-checkpoint/--mt-data`` or
``--lm-checkpoint/--lm-data`` to evaluate your own fairseq checkpoint and data
(a data folder holds the fairseq dictionaries, the binarized splits and a
``splits.json`` naming them; see ``scripts/prepare_mt.py`` / ``prepare_lm.py``).
Results go to ``--out-dir``; the last line printed is one JSON object.

Example:
    python scripts/evaluate.py                      # bundled default, CPU or GPU
    python scripts/evaluate.py --moe-gating static --moe-eval-capacity-token-fraction 1.0   # static, nothing dropped
    python scripts/evaluate.py --moe-gating static   # fairseq's default eval capacity 0.25: drops tokens
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))
from bleu import read_hypotheses, score  # noqa: E402

USER_DIR = os.path.join(REPO, "fairseq_moe_infer")
_ALL_RANKS = re.compile(r"expert parallel: this rank's loss .* all ranks [0-9.]+ on ([0-9,]+) tokens")
_PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
_EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's layout and show defaults."""


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def run_tool(module: str, args, stdout_path: str) -> str:
    """Run ``python -m fairseq_cli.<module>`` writing stdout+stderr to a file; returns the text.

    Raises:
        RuntimeError: the tool failed (its last lines are in the message).
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{module}"] + [str(a) for a in args]
    with open(stdout_path + ".cmd", "w") as f:
        f.write(" ".join(cmd) + "\n")
    with open(stdout_path, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    with open(stdout_path) as f:
        text = f.read()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise RuntimeError(f"fairseq_cli.{module} failed (exit {proc.returncode}); see {stdout_path}:\n{tail}")
    return text


def moe_flags(a, stats_path: str):
    # never report an earlier run's (a dense model writes none; an expert-parallel run adds one per rank r > 0)
    for old in glob.glob(glob.escape(stats_path)) + glob.glob(glob.escape(stats_path) + ".rank*"):
        os.remove(old)
    flags = ["--moe-gating", a.moe_gating, "--moe-stats-json", stats_path]
    if a.moe_eval_capacity_token_fraction is not None:
        flags += ["--moe-eval-capacity-token-fraction", a.moe_eval_capacity_token_fraction]
    return flags


def moe_brief(stats_path: str) -> dict:
    """tokens/s, drops and tokens per expert from a ``--moe-stats-json`` file (empty if dense).

    Under expert parallelism each rank r > 0 wrote ``<stats_path>.rank<r>`` with its own
    tokens: counts are summed over the ranks, tokens/s too (each rank's own rate, the ranks run
    side by side), peak memory is the largest rank's. A missing rank file is named in
    ``ranks_missing`` (the sums then cover the ranks found).
    """
    if not os.path.exists(stats_path):
        return {}
    with open(stats_path) as f:
        ranks = [json.load(f)]
    world, missing = int(ranks[0].get("world_size") or 1), []
    for r in range(1, world):
        if not os.path.exists(f"{stats_path}.rank{r}"):
            missing.append(r)
            continue
        with open(f"{stats_path}.rank{r}") as f:
            ranks.append(json.load(f))
    peaks = [s["peak_accelerator_memory_bytes"] for s in ranks if s["peak_accelerator_memory_bytes"] is not None]
    rates = [s["wall_tokens_per_s"] for s in ranks if s["wall_tokens_per_s"] is not None]
    layers = {}
    for s in ranks:
        for name, v in s["layers"].items():
            layers[name] = [a + b for a, b in zip(layers.get(name, [0] * len(v["expert_counts"])), v["expert_counts"])]
    brief = {
        "moe_tokens_per_s": round(sum(rates), 1) if rates else None,
        "moe_dropped": sum(s["dropped"] for s in ranks),
        "moe_routed": sum(s["routed"] for s in ranks),
        "peak_accelerator_memory_bytes": max(peaks) if peaks else None,
        "tokens_per_expert": layers,
    }
    if world > 1:
        brief["ranks"] = world
    if missing:
        brief["ranks_missing"] = missing
    return brief


def moe_line(r: dict) -> str:
    """'MoE <tokens/s> tokens/s, <dropped>/<routed> dropped' (or 'no MoE layer')."""
    if "moe_routed" not in r:
        return "no MoE layer"
    return f"MoE {r['moe_tokens_per_s']} tokens/s, {r['moe_dropped']}/{r['moe_routed']} choices dropped"


def load_splits(data: str) -> dict:
    path = os.path.join(data, "splits.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} not found; a data folder needs splits.json (see scripts/prepare_mt.py)")
    with open(path) as f:
        return json.load(f)


def evaluate_mt(a, out_dir: str) -> dict:
    splits = load_splits(a.mt_data)
    results = {}
    for i, lang in enumerate(a.langs, 1):
        if lang not in splits["splits"]:
            raise SystemExit(f"error: {a.mt_data}/splits.json has no target language '{lang}'")
        t0 = time.time()
        log(f"[MT {i}/{len(a.langs)}] fairseq-generate en->{lang} ({splits['splits'][lang]}) ...")
        stats = os.path.join(out_dir, f"moe.mt.{lang}.json")
        gen = os.path.join(out_dir, f"generate.{lang}.txt")
        args = [a.mt_data, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", a.mt_checkpoint,
                "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", splits["splits"][lang],
                "--beam", a.beam, "--max-tokens", a.max_tokens, "--post-process", "sentencepiece",
                "--required-batch-size-multiple", 1] + moe_flags(a, stats) + a.fairseq_args
        run_tool("generate", args, gen)
        with open(os.path.join(a.mt_data, splits["references"][lang]), encoding="utf-8") as f:
            refs = [line.rstrip("\n") for line in f]
        hyps = read_hypotheses(gen)
        r = score(hyps, refs)  # raises if generation lost sentences
        r.update(moe_brief(stats))
        r["seconds"] = round(time.time() - t0, 1)
        results[f"en-{lang}"] = r
        log(f"  en->{lang}: BLEU {r['bleu']:.2f} on {r['sentences']} sentences ({r['signature']}), {moe_line(r)}, "
            f"{r['seconds']}s")
    return results


def evaluate_lm(a, out_dir: str) -> dict:
    splits = load_splits(a.lm_data)["splits"]
    names = a.lm_sets or list(splits)
    results = {}
    for i, name in enumerate(names, 1):
        if name not in splits:
            raise SystemExit(f"error: {a.lm_data}/splits.json has no set '{name}' (has: {', '.join(splits)})")
        t0 = time.time()
        log(f"[LM {i}/{len(names)}] fairseq-eval-lm on {name} ({splits[name]}) ...")
        stats = os.path.join(out_dir, f"moe.lm.{name}.json")
        args = [a.lm_data, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", a.lm_checkpoint,
                "--gen-subset", splits[name], "--tokens-per-sample", a.tokens_per_sample,
                "--max-tokens", a.max_tokens] + moe_flags(a, stats) + a.fairseq_args
        text = run_tool("eval_lm", args, os.path.join(out_dir, f"eval_lm.{name}.txt"))
        m, n = _PPL.search(text), _EVALUATED.search(text)
        if not m:
            raise RuntimeError(f"no perplexity in the eval-lm output of {name}")
        tokens = int(n.group(1).replace(",", "")) if n else None
        every_rank = _ALL_RANKS.search(text)  # expert-parallel eval-lm: the tokens of all ranks
        if every_rank:
            tokens = int(every_rank.group(1).replace(",", ""))
        r = {"perplexity": float(m.group(2)), "loss_base2": float(m.group(1)), "tokens": tokens}
        r.update(moe_brief(stats))
        r["seconds"] = round(time.time() - t0, 1)
        results[name] = r
        log(f"  {name}: perplexity {r['perplexity']:.2f} over {r['tokens']} tokens, {moe_line(r)}, {r['seconds']}s")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    asset = os.path.join(REPO, "assets")
    p.add_argument("--mt-checkpoint", default=os.path.join(asset, "checkpoints", "mt_moe", "checkpoint.pt"),
                   help="translation checkpoint (default: the bundled MoE model)")
    p.add_argument("--mt-data", default=os.path.join(asset, "mt"), help="translation data folder with splits.json")
    p.add_argument("--langs", nargs="+", default=["de", "fr", "cs"], help="target languages to translate into")
    p.add_argument("--lm-checkpoint", default=os.path.join(asset, "checkpoints", "lm_moe", "checkpoint.pt"),
                   help="language-model checkpoint (default: the bundled MoE LM)")
    p.add_argument("--lm-data", default=os.path.join(asset, "lm"), help="LM data folder with splits.json")
    p.add_argument("--lm-sets", nargs="+", default=None, help="LM evaluation sets (default: all in splits.json)")
    p.add_argument("--skip-mt", action="store_true", help="do not evaluate translation")
    p.add_argument("--skip-lm", action="store_true", help="do not evaluate the language model")
    p.add_argument("--moe-gating", default="dynamic", choices=["static", "dynamic"], help="passed to the fairseq tools")
    p.add_argument("--moe-eval-capacity-token-fraction", type=float, default=None,
                   help="static gating's eval capacity fraction (default: the task's, 0.25)")
    p.add_argument("--beam", type=int, default=5, help="beam size for translation")
    p.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch")
    p.add_argument("--tokens-per-sample", type=int, default=256, help="LM evaluation block length")
    p.add_argument("--out-dir", default=os.path.join(REPO, "results", "main_job"), help="logs and outputs")
    p.add_argument("--fairseq-args", nargs=argparse.REMAINDER, default=[],
                   help="anything after this is passed to every fairseq tool (e.g. --cpu, --fp16)")
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    for flag, path in (("--mt-checkpoint", a.mt_checkpoint), ("--lm-checkpoint", a.lm_checkpoint)):
        skip = a.skip_mt if flag.startswith("--mt") else a.skip_lm
        if not skip and not os.path.exists(path):
            raise SystemExit(f"error: {flag} {path} does not exist")
    if a.moe_eval_capacity_token_fraction is not None and a.moe_eval_capacity_token_fraction < 0:
        p.error("--moe-eval-capacity-token-fraction must be >= 0")
    t0 = time.time()
    out = {"moe_gating": a.moe_gating}
    try:
        if not a.skip_mt:
            out["translation"] = evaluate_mt(a, a.out_dir)
        if not a.skip_lm:
            out["language_model"] = evaluate_lm(a, a.out_dir)
    except RuntimeError as e:  # a fairseq tool failed: its last lines are in the message
        raise SystemExit(f"error: {e}") from None
    out["seconds"] = round(time.time() - t0, 1)
    log("summary:")
    for pair, r in out.get("translation", {}).items():
        log(f"  {pair:8s} BLEU {r['bleu']:6.2f}   dropped {r.get('moe_dropped', 0)}")
    for name, r in out.get("language_model", {}).items():
        log(f"  {name:12s} perplexity {r['perplexity']:8.2f}   dropped {r.get('moe_dropped', 0)}")
    with open(os.path.join(a.out_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
