#!/usr/bin/env python3
"""The main job: evaluate MoE translation and language models with the stock fairseq tools.

By default it uses the bundled models and data (``assets/``):

* translation: ``fairseq-generate --task moe_translation`` on Multi30k
  test_2016_flickr for English -> German, French and Czech, scored with sacreBLEU
  (BLEU cased 13a, and chrF; detokenized);
* language modelling: ``fairseq-eval-lm --task moe_language_modeling`` perplexity
  on WikiText-2 test, Multi30k test English and the held-out tail of tiny
  Shakespeare;

each run with the plugin's ``--moe-*`` flags and its MoE summary (tokens/s,
dropped top-k choices, tokens per expert). Every sentence / token of a set must be
scored: a set that lost sentences or tokens (e.g. skipped as longer than the
model's positions) is an error, never a score.

Your own test set, from raw text (plain or .gz, one sentence a line, any order and
number): ``--src FILE --ref FILE [FILE ...] --lang de`` (translation) and/or
``--lm-text FILE [FILE ...]`` (perplexity). The text is encoded with the data
folder's sentencepiece model, binarized into a temporary folder by
fairseq-preprocess with the folder's dictionaries, and scored as above; only the
given sets are evaluated. Give ``--mt-checkpoint/--mt-data`` or
``--lm-checkpoint/--lm-data`` for your own fairseq checkpoint and data folder (it
holds spm.model, the fairseq dictionaries and, for the bundled sets, the binarized
splits with a ``splits.json``; see ``scripts/prepare_mt.py`` / ``prepare_lm.py``).

Results go to ``--out-dir`` (one run at a time per folder: a second run is refused):
``results.json``, ``report.md`` with a tokens-per-expert heat map
(``tokens_per_expert.png``), and the tools' logs. The last line printed is the JSON.
The fairseq tools' start-up messages stay in their logs unless ``--verbose``.

Example:
    python scripts/evaluate.py                      # bundled default, CPU or GPU
    python scripts/evaluate.py --moe-gating static --moe-eval-capacity-token-fraction 1.0   # static, nothing dropped
    python scripts/evaluate.py --moe-gating static   # fairseq's default eval capacity 0.25: drops tokens
    python scripts/evaluate.py --src newstest.en --ref newstest.de --lang de   # your own test set
    python scripts/evaluate.py --lm-text my_corpus.txt.gz
"""

import argparse
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))
from bleu import read_hypotheses, read_lines, score  # noqa: E402
from eval_report import write_report  # noqa: E402
from quiet import configure_logging  # noqa: E402

USER_DIR = os.path.join(REPO, "fairseq_moe_infer")
_ALL_RANKS = re.compile(r"expert parallel: this rank's loss .* all ranks [0-9.]+ on ([0-9,]+) tokens")
_PPL = re.compile(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)")
_EVALUATED = re.compile(r"Evaluated ([0-9,]+) tokens in ([0-9.]+)s")
_SKIPPED = re.compile(r"([0-9,]+) samples have invalid sizes and will be skipped, max_positions=(\S+?),")
_TOO_LONG = re.compile(r"Size of sample #\d+ is invalid .* since max_positions=\((\d+), \d+\)")
LOCK_NAME = ".evaluate.lock"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keep the description's layout; show a default once, where the help text does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class EvalError(Exception):
    """A bad input or a failed step: ends the script with one ``evaluate.py: error: ...`` line."""


def log(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


def run_tool(module: str, args, stdout_path: str, verbose: bool = False) -> str:
    """Run ``python -m fairseq_cli.<module>`` writing stdout+stderr to a file (also to stderr if
    ``verbose``); returns the text.

    Raises:
        EvalError: the tool failed: its one error line (``fairseq-<tool>: error: ...``, the plugin's) or
        its last lines.
    """
    cmd = [sys.executable, "-m", f"fairseq_cli.{module}"] + [str(a) for a in args]
    with open(stdout_path + ".cmd", "w") as f:
        f.write(shlex.join(cmd) + "\n")
    with open(stdout_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        for line in proc.stdout:
            out.write(line)
            if verbose:
                sys.stderr.write(line)
        proc.wait()
    with open(stdout_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if proc.returncode != 0:
        last = (text.strip().splitlines() or [""])[-1]
        if re.match(r"fairseq-[\w-]+: error: ", last):  # the tool ended with one line naming the fix: pass it on
            raise EvalError(f"{last.replace(': error: ', ': ', 1)} (see {stdout_path})")
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise EvalError(f"fairseq_cli.{module} failed (exit {proc.returncode}); see {stdout_path}:\n{tail}")
    return text


def split_sizes(data: str, split: str, lang: str = None):
    """Token counts (numpy int array, one per sentence, end-of-sentence included) of a binarized split.

    ``lang`` given: the translation split ``<split>.src-tgt.<lang>``; else the LM split ``<split>``.
    Read with fairseq's own ``MMapIndexedDataset``.

    Raises:
        EvalError: the split is not in ``data``.
    """
    from fairseq.data.indexed_dataset import MMapIndexedDataset  # quiet: main() configured logging first
    prefix = os.path.join(data, f"{split}.src-tgt.{lang}" if lang else split)
    if not MMapIndexedDataset.exists(prefix):
        raise EvalError(f"{prefix}.idx/.bin not found")
    dataset = MMapIndexedDataset(prefix)
    return dataset.sizes.copy()  # a view into the index's mmap, which closes with the dataset


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
        raise EvalError(f"{path} not found; a data folder needs splits.json (see scripts/prepare_mt.py), "
                        "or evaluate raw text with --src/--ref/--lang or --lm-text")
    with open(path) as f:
        return json.load(f)


def file_stem(name: str) -> str:
    """A set's name as a plain file-name part: 'news.en->de' -> 'news.en.de' (log and stats file names)."""
    return re.sub(r"[^\w.+-]+", "_", name.replace("->", "."))


def need_file(folder: str, name: str, flag: str) -> str:
    """``folder/name``, which must exist (``flag`` names the option that chose ``folder``)."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise EvalError(f"{path} not found; {flag} must be a data folder with {name} (the model's)")
    return path


def binarize(a, text_dir: str, prefixes, dictionary: str, dest: str, out_dir: str, name: str, mt: bool) -> None:
    """fairseq-preprocess (``--only-source``, with the model's dictionary) of the encoded files
    ``prefixes`` (in ``text_dir``) into ``dest`` as the test splits test, test1, ..."""
    args = ["--only-source", "--srcdict", dictionary, "--testpref", ",".join(os.path.join(text_dir, p) for p in prefixes),
            "--destdir", dest, "--workers", 1]
    if mt:
        args += ["--source-lang", "src", "--target-lang", "tgt"]
    run_tool("preprocess", args, os.path.join(out_dir, f"preprocess.{name}.txt"), a.verbose)


def encode_lines(spm_model: str, lines, prefix: str = ""):
    """Sentencepiece pieces of each line, space-joined (as fairseq-interactive's ``--bpe sentencepiece``)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    return [" ".join(pieces) for pieces in sp.encode([f"{prefix} {x}" if prefix else x for x in lines], out_type=str)]


def check_blank(lines, flag: str, path: str) -> None:
    blank = [i for i, x in enumerate(lines, 1) if not x.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:5])) + (" ..." if len(blank) > 5 else "")
        raise EvalError(f"{flag} {path} has {len(blank)} empty line(s) (line {shown}); a test set has one sentence a line: "
                        "remove them from the source and every reference")


def prepare_raw_mt(a, tmp: str, out_dir: str):
    """Binarize ``--src`` for ``--lang`` into ``tmp``; returns (data folder, split, reference streams)."""
    src = read_lines(a.src, "--src")
    if not src:
        raise EvalError(f"--src {a.src} is empty")
    check_blank(src, "--src", a.src)
    refs = []
    for path in a.ref:
        ref = read_lines(path, "--ref")
        if len(ref) != len(src):
            raise EvalError(f"--ref {path} has {len(ref)} lines but --src {a.src} has {len(src)}; "
                            "they must be line-aligned, one sentence a line")
        check_blank(ref, "--ref", path)
        refs.append(ref)
    spm_model = need_file(a.mt_data, "spm.model", "--mt-data")
    src_dict = need_file(a.mt_data, "dict.src.txt", "--mt-data")
    tgt_dict = need_file(a.mt_data, "dict.tgt.txt", "--mt-data")
    tag = f"<2{a.lang}>" if a.tag is None else a.tag
    if tag:
        with open(src_dict, encoding="utf-8") as f:
            tags = [line.split()[0] for line in f if re.match(r"<2\S+>\s", line)]
        if tag not in tags:
            raise EvalError(f"the model's dictionary has no target tag {tag}; it knows {', '.join(tags) or 'none'} "
                            "(--lang picks <2LANG>; --tag '' for a model without tags)")
    with open(os.path.join(tmp, "test.src"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in encode_lines(spm_model, src, tag))
    data = os.path.join(tmp, "mt")
    binarize(a, tmp, ["test"], src_dict, data, out_dir, "mt", mt=True)
    shutil.copyfile(tgt_dict, os.path.join(data, "dict.tgt.txt"))
    n = len(split_sizes(data, "test", "src"))
    if n != len(src):
        raise EvalError(f"fairseq-preprocess wrote {n} sentences for the {len(src)} lines of --src {a.src}")
    return data, "test", refs


def too_long_lines(a, data: str, split: str, max_source: int) -> str:
    """The error message for source sentences longer than the model's ``max_source`` positions, which
    fairseq-generate refuses (a traceback telling to skip them); names the first and counts them."""
    sizes = split_sizes(data, split, "src")  # sentencepiece tokens with the tag and end of sentence
    long = [i for i, n in enumerate(sizes) if n > max_source]
    if not long:  # fairseq's limit is on something else (e.g. a target side): keep its own message
        return f"fairseq-generate refused a sentence of {data} split {split} as longer than max_positions (see its log)"
    where, what = (f"--src {a.src}", "line") if a.src else (f"{data} split {split}", "sentence")
    count = f"{len(long)} {what}{'s' if len(long) > 1 else ''}"
    return (f"{where}: {count} longer than the model's {max_source:,} source positions "
            f"({what} {long[0] + 1}: {sizes[long[0]]:,} tokens with the tag and end of sentence); "
            f"split {'them' if len(long) > 1 else 'it'} into sentences")


def translate(a, data: str, split: str, name: str, refs, lang: str, out_dir: str) -> dict:
    """fairseq-generate on ``split`` of ``data`` into ``lang`` and sacreBLEU of its D- lines against ``refs``."""
    stats = os.path.join(out_dir, f"moe.mt.{name}.json")
    gen = os.path.join(out_dir, f"generate.{name}.txt")
    args = [data, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", a.mt_checkpoint,
            "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", split,
            "--beam", a.beam, "--max-tokens", a.max_tokens, "--post-process", "sentencepiece",
            "--required-batch-size-multiple", 1] + moe_flags(a, stats) + a.fairseq_args
    try:
        run_tool("generate", args, gen, a.verbose)
    except EvalError as e:
        too_long = _TOO_LONG.search(str(e))
        if too_long:
            raise EvalError(too_long_lines(a, data, split, int(too_long.group(1)))) from None
        raise
    expected = len(split_sizes(data, split, "src"))
    try:
        hyps = read_hypotheses(gen)
    except ValueError as e:
        raise EvalError(f"{name}: {e}") from None
    if len(hyps) != expected:
        raise EvalError(f"{name}: fairseq-generate translated {len(hyps)} of {expected} sentences (see {gen})")
    r = score(hyps, refs)  # raises if generation lost sentences
    r["target_language"] = lang
    r["references"] = len(refs) if refs and not isinstance(refs[0], str) else 1
    r.update(moe_brief(stats))
    return r


def evaluate_mt(a, out_dir: str, tmp: str) -> dict:
    results = {}
    if a.src:
        name = f"{os.path.basename(a.src)}->{a.lang}"
        t0 = time.time()
        log(f"[MT] {name}: sentencepiece + fairseq-preprocess + fairseq-generate ...")
        data, split, refs = prepare_raw_mt(a, tmp, out_dir)
        jobs = [(name, file_stem(name), data, split, refs, a.lang, t0)]
    else:
        splits = load_splits(a.mt_data)
        jobs = []
        for lang in a.langs:
            if lang not in splits["splits"]:
                raise EvalError(f"{a.mt_data}/splits.json has no target language '{lang}'")
            jobs.append((f"en-{lang}", lang, a.mt_data, splits["splits"][lang], None, lang, None))
    for i, (name, stem, data, split, refs, lang, t0) in enumerate(jobs, 1):
        t0 = t0 or time.time()
        if refs is None:
            log(f"[MT {i}/{len(jobs)}] fairseq-generate {name} ({split}) ...")
            refs = read_lines(os.path.join(a.mt_data, splits["references"][lang]), "reference")
        r = translate(a, data, split, stem, refs, lang, out_dir)
        r["seconds"] = round(time.time() - t0, 1)
        results[name] = r
        log(f"  {name}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f} on {r['sentences']} sentences ({r['signature']}), "
            f"{moe_line(r)}, {r['seconds']}s")
    return results


def prepare_raw_lm(a, tmp: str, out_dir: str):
    """Binarize each ``--lm-text`` file (blank lines dropped) into ``tmp``; returns (data folder, {name: split}, info)."""
    spm_model = need_file(a.lm_data, "spm.model", "--lm-data")
    dictionary = need_file(a.lm_data, "dict.txt", "--lm-data")
    prefixes, splits, info = [], {}, {}
    for i, path in enumerate(a.lm_text):
        lines = read_lines(path, "--lm-text")
        kept = [x for x in lines if x.strip()]
        if not kept:
            raise EvalError(f"--lm-text {path} has no non-empty line")
        name = os.path.basename(path)
        if name in splits:
            name = f"{name}#{i}"
        with open(os.path.join(tmp, f"lm{i}"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in encode_lines(spm_model, kept))
        prefixes.append(f"lm{i}")
        splits[name] = f"test{i or ''}"
        info[name] = {"lines": len(kept), "blank_lines_dropped": len(lines) - len(kept)}
    data = os.path.join(tmp, "lm")
    binarize(a, tmp, prefixes, dictionary, data, out_dir, "lm", mt=False)
    for name, split in splits.items():
        n = len(split_sizes(data, split))
        if n != info[name]["lines"]:
            raise EvalError(f"fairseq-preprocess wrote {n} lines for the {info[name]['lines']} of --lm-text {name}")
    return data, splits, info


def evaluate_lm(a, out_dir: str, tmp: str) -> dict:
    if a.lm_text:
        log(f"[LM] sentencepiece + fairseq-preprocess of {len(a.lm_text)} file(s) ...")
        data, splits, info = prepare_raw_lm(a, tmp, out_dir)
        names = list(splits)
    else:
        data, splits, info = a.lm_data, load_splits(a.lm_data)["splits"], {}
        names = a.lm_sets or list(splits)
    results = {}
    for i, name in enumerate(names, 1):
        if name not in splits:
            raise EvalError(f"{a.lm_data}/splits.json has no set '{name}' (has: {', '.join(splits)})")
        t0 = time.time()
        log(f"[LM {i}/{len(names)}] fairseq-eval-lm on {name} ({splits[name]}) ...")
        safe = file_stem(name)
        stats = os.path.join(out_dir, f"moe.lm.{safe}.json")
        args = [data, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", a.lm_checkpoint,
                "--gen-subset", splits[name], "--tokens-per-sample", a.tokens_per_sample,
                "--max-tokens", a.max_tokens] + moe_flags(a, stats) + a.fairseq_args
        log_path = os.path.join(out_dir, f"eval_lm.{safe}.txt")
        text = run_tool("eval_lm", args, log_path, a.verbose)
        m, n = _PPL.search(text), _EVALUATED.search(text)
        if not m or not n:
            raise EvalError(f"no perplexity in the eval-lm output of {name} (see {log_path})")
        tokens = int(n.group(1).replace(",", ""))
        every_rank = _ALL_RANKS.search(text)  # expert-parallel eval-lm: the tokens of all ranks
        if every_rank:
            tokens = int(every_rank.group(1).replace(",", ""))
        expected = int(split_sizes(data, splits[name]).sum())
        if tokens != expected:
            skipped = _SKIPPED.search(text)
            why = (f": fairseq skipped {skipped.group(1)} blocks longer than the model's {skipped.group(2)} positions; "
                   f"use --tokens-per-sample <= {skipped.group(2)}") if skipped else f" (see {log_path})"
            raise EvalError(f"{name}: fairseq-eval-lm scored {tokens:,} of the set's {expected:,} tokens{why}")
        r = {"perplexity": float(m.group(2)), "loss_base2": float(m.group(1)), "tokens": tokens, **info.get(name, {})}
        r.update(moe_brief(stats))
        r["seconds"] = round(time.time() - t0, 1)
        results[name] = r
        log(f"  {name}: perplexity {r['perplexity']:.2f} over {r['tokens']} tokens, {moe_line(r)}, {r['seconds']}s")
    return results


def lock_out_dir(out_dir: str):
    """Create ``out_dir`` if needed and take its lock (held until the process ends).

    The lock file also proves the folder is writable, before minutes of work.

    Raises:
        EvalError: the path is a file, cannot be created or written (the OS's reason is named),
            or another evaluate.py run holds the folder.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise EvalError(f"cannot create --out-dir {out_dir}: {e.strerror}") from None
    path = os.path.join(out_dir, LOCK_NAME)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise EvalError(f"cannot write in --out-dir {out_dir}: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EvalError(f"--out-dir {out_dir} is in use by another evaluate.py run ({holder}); "
                        "wait for it or give another --out-dir") from None
    try:
        f.seek(0)
        if stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            f.truncate()
        f.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise EvalError(f"cannot write in --out-dir {out_dir}: {e.strerror}") from None
    return f


def write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` under a temporary name, then move it into place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("models and bundled test sets")
    g.add_argument("--mt-checkpoint", default=None,
                   help="translation checkpoint (default: the bundled assets/checkpoints/mt_moe/checkpoint.pt)")
    g.add_argument("--mt-data", default=None,
                   help="translation data folder: spm.model, dict.src.txt, dict.tgt.txt, and splits.json for its "
                        "binarized test sets (default: the bundled assets/mt)")
    g.add_argument("--langs", nargs="+", default=["de", "fr", "cs"],
                   help="bundled target languages to translate into (default: de fr cs)")
    g.add_argument("--lm-checkpoint", default=None,
                   help="language-model checkpoint (default: the bundled assets/checkpoints/lm_moe/checkpoint.pt)")
    g.add_argument("--lm-data", default=None,
                   help="LM data folder: spm.model, dict.txt, and splits.json for its binarized test sets "
                        "(default: the bundled assets/lm)")
    g.add_argument("--lm-sets", nargs="+", default=None, help="LM evaluation sets (default: all in splits.json)")
    g.add_argument("--skip-mt", action="store_true", help="do not evaluate translation")
    g.add_argument("--skip-lm", action="store_true", help="do not evaluate the language model")
    r = p.add_argument_group("your own test set from raw text (only these sets are then evaluated)")
    r.add_argument("--src", default=None, metavar="FILE", help="source sentences, one a line (plain or .gz)")
    r.add_argument("--ref", nargs="+", default=None, metavar="FILE",
                   help="reference translation(s) of --src, line-aligned (several: multi-reference BLEU/chrF)")
    r.add_argument("--lang", default=None, help="target language of --src, e.g. de (picks the model's <2de> tag)")
    r.add_argument("--tag", default=None,
                   help="source prefix instead of <2LANG> (default: <2LANG>; '' for a model without target tags)")
    r.add_argument("--lm-text", nargs="+", default=None, metavar="FILE",
                   help="text(s) for perplexity, one sentence or paragraph a line (plain or .gz; empty lines dropped)")
    o = p.add_argument_group("decoding and scoring")
    o.add_argument("--moe-gating", default="dynamic", choices=["static", "dynamic"], help="passed to the fairseq tools")
    o.add_argument("--moe-eval-capacity-token-fraction", type=float, default=None,
                   help="static gating's eval capacity fraction (default: the task's, 0.25)")
    o.add_argument("--beam", type=int, default=5, help="beam size for translation")
    o.add_argument("--max-tokens", type=int, default=8192, help="tokens per batch")
    o.add_argument("--tokens-per-sample", type=int, default=256,
                   help="LM evaluation block length, at most the model's positions (default: 256, the bundled LM's)")
    o.add_argument("--out-dir", default=None,
                   help="results, report and logs (default: results/main_job, or results/raw for --src/--lm-text)")
    o.add_argument("--verbose", action="store_true", help="also print the fairseq tools' own output")
    o.add_argument("--fairseq-args", nargs=argparse.REMAINDER, default=[],
                   help="anything after this is passed to every fairseq tool (e.g. --cpu, --fp16)")
    a = p.parse_args(argv)
    asset = os.path.join(REPO, "assets")
    a.mt_checkpoint = a.mt_checkpoint or os.path.join(asset, "checkpoints", "mt_moe", "checkpoint.pt")
    a.mt_data = a.mt_data or os.path.join(asset, "mt")
    a.lm_checkpoint = a.lm_checkpoint or os.path.join(asset, "checkpoints", "lm_moe", "checkpoint.pt")
    a.lm_data = a.lm_data or os.path.join(asset, "lm")
    raw = bool(a.src or a.ref or a.lang or a.lm_text)
    a.out_dir = a.out_dir or os.path.join(REPO, "results", "raw" if raw else "main_job")
    if a.src or a.ref or a.lang:
        missing = [f for f, v in (("--src", a.src), ("--ref", a.ref), ("--lang", a.lang)) if not v]
        if missing:
            p.error(f"a raw translation test set needs --src, --ref and --lang (missing: {', '.join(missing)})")
    if raw:  # only the given raw sets
        a.skip_mt, a.skip_lm = not a.src, not a.lm_text
    if a.skip_mt and a.skip_lm:
        p.error("nothing to evaluate (both --skip-mt and --skip-lm)")
    if a.moe_eval_capacity_token_fraction is not None and not 0 <= a.moe_eval_capacity_token_fraction < float("inf"):
        p.error("--moe-eval-capacity-token-fraction must be a finite number >= 0")
    for flag, value in (("--beam", a.beam), ("--max-tokens", a.max_tokens), ("--tokens-per-sample", a.tokens_per_sample)):
        if value < 1:
            p.error(f"{flag} must be >= 1")
    return a


def run(a) -> dict:
    for flag, path, skip in (("--mt-checkpoint", a.mt_checkpoint, a.skip_mt), ("--lm-checkpoint", a.lm_checkpoint, a.skip_lm)):
        if not skip and not os.path.isfile(path):
            raise EvalError(f"{flag} {path} does not exist")
    lock = lock_out_dir(a.out_dir)
    try:
        t0 = time.time()
        out = {"moe_gating": a.moe_gating}
        with tempfile.TemporaryDirectory(prefix="evaluate.") as tmp:
            if not a.skip_mt:
                out["translation"] = evaluate_mt(a, a.out_dir, tmp)
            if not a.skip_lm:
                out["language_model"] = evaluate_lm(a, a.out_dir, tmp)
        out["seconds"] = round(time.time() - t0, 1)
        log("summary:")
        for pair, r in out.get("translation", {}).items():
            log(f"  {pair:8s} BLEU {r['bleu']:6.2f}   chrF {r['chrf']:6.2f}   dropped {r.get('moe_dropped', 0)}")
        for name, r in out.get("language_model", {}).items():
            log(f"  {name:12s} perplexity {r['perplexity']:8.2f}   dropped {r.get('moe_dropped', 0)}")
        write_json(os.path.join(a.out_dir, "results.json"), out)
        report = write_report(out, a.out_dir, shlex.join(["python", "scripts/evaluate.py"] + sys.argv[1:]))
        log(f"report: {report}")
        return out
    finally:
        lock.close()


def main(argv=None):
    a = parse_args(argv)
    configure_logging(a.verbose)
    try:
        out = run(a)
    except (EvalError, ValueError) as e:  # bad input, or a fairseq tool failed (its last lines are in the message)
        raise SystemExit(f"evaluate.py: error: {e}") from None
    except OSError as e:  # a full or read-only disk while writing the results
        raise SystemExit(f"evaluate.py: error: {e.filename or a.out_dir}: {e.strerror or e}") from None
    print(json.dumps(out))


if __name__ == "__main__":
    main()
