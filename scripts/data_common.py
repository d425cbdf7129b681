"""Helpers shared by the data-preparation scripts (prepare_mt.py, prepare_lm.py).

Everything here is deterministic and works offline: reading the raw corpora,
training or reusing a sentencepiece model, encoding text into pieces and
calling ``fairseq_cli.preprocess`` with the current interpreter.
"""

import argparse
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import sentencepiece as spm

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = (REPO_ROOT / ".." / "shared" / "data").resolve()
SPM_SEED = 1234
OUTPUT_MARKER = "splits.json"


def log(prog, message):
    """Print a progress message for script ``prog`` to stderr."""
    print(f"[{prog}] {message}", file=sys.stderr, flush=True)


def add_common_args(parser, default_out):
    """Add the options shared by both preparation scripts to ``parser``."""
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT,
        help="folder holding multi30k/, wikitext-2/ and tinyshakespeare/ "
             f"(default: {DEFAULT_DATA_ROOT})")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / default_out,
        help=f"output data-bin folder; replaced if it holds an earlier output "
             f"(default: <repo>/{default_out})")
    parser.add_argument(
        "--max-train-lines", type=int, default=None, metavar="N",
        help="use only the first N lines of each training source (tiny data)")
    parser.add_argument(
        "--max-valid-lines", type=int, default=None, metavar="N",
        help="use only the first N lines of each validation source")
    parser.add_argument(
        "--max-test-lines", type=int, default=None, metavar="N",
        help="use only the first N lines of each test set")
    parser.add_argument(
        "--spm-model", type=Path, default=None, metavar="PATH",
        help="reuse this sentencepiece model instead of training a new one")
    parser.add_argument(
        "--dict", type=Path, default=None, metavar="PATH",
        help="reuse this fairseq dictionary instead of building one from train")
    parser.add_argument(
        "--vocab-size", type=int, default=8000,
        help="sentencepiece vocabulary size when training (default: 8000)")
    parser.add_argument(
        "--workers", type=int, default=2,
        help="worker processes for fairseq-preprocess (default: 2)")
    parser.add_argument(
        "--verbose", action="store_true",
        help="print fairseq-preprocess's own log (default: kept in <out>/preprocess.log)")
    return parser


def fail(prog, message):
    """End script ``prog`` with the one line ``<prog>: error: <message>`` (exit status 1)."""
    raise SystemExit(f"{prog}: error: {message}")


def check_inputs(prog, args, raw_files, holds):
    """Check the inputs before any work: ``--data-root`` with every file of ``raw_files`` (relative
    to it), and ``--spm-model`` / ``--dict`` when given.

    ``holds`` describes what the data root should hold, for the message.

    Raises:
        SystemExit: one line naming the missing path and the flag to set.
    """
    root = args.data_root
    if not root.is_dir():
        fail(prog, f"--data-root {root} is not a folder; set --data-root to the folder holding {holds}")
    missing = [name for name in raw_files if not (root / name).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        fail(prog, f"--data-root {root} has no {missing[0]}{more}; set --data-root to the folder holding {holds}")
    for flag, path in (("--spm-model", args.spm_model), ("--dict", args.dict)):
        if path is not None and not path.is_file():
            fail(prog, f"{flag} {path} not found")


def new_parser(description):
    """Return an ArgumentParser that keeps the layout of ``description``."""
    return argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)


def read_lines(path, limit=None):
    """Read a UTF-8 text file (gzip if it ends in .gz) into a list of lines (``bleu.read_lines``: split on
    ``\\n``, line ends removed); ``limit`` keeps only the first lines.

    Raises:
        SystemExit: one line ``<script>: error: ...`` naming the file and, for text that is not UTF-8,
            the line (was: a UnicodeDecodeError traceback).
    """
    from bleu import read_lines as read_text  # scripts/ is on sys.path for every script importing this module

    try:
        lines = read_text(str(path), "input")
    except ValueError as e:
        fail(Path(sys.argv[0]).stem, str(e))
    return lines[:limit] if limit is not None else lines


def write_lines(path, lines):
    """Write ``lines`` to ``path`` as UTF-8, one per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)


def prepare_out_dir(out):
    """Create ``out``, first removing it if it holds an earlier output.

    Refuses to delete a non-empty folder that was not made by these scripts.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / OUTPUT_MARKER).exists():
            raise SystemExit(f"refusing to overwrite {out}: not empty and no {OUTPUT_MARKER}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train_spm(lines, model_path, vocab_size, user_symbols=()):
    """Train a unigram sentencepiece model on ``lines``; write it and its .vocab.

    Full character coverage, a fixed random seed and one thread; the text is
    streamed from memory so that no file path ends up inside the model, which
    keeps ``model_path`` reproducible byte for byte.
    """
    model = io.BytesIO()
    spm.set_random_generator_seed(SPM_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        user_defined_symbols=list(user_symbols),
        num_threads=1,
        minloglevel=2,
    )
    Path(model_path).write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    write_lines(Path(model_path).with_suffix(".vocab"),
                [f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}"
                 for i in range(processor.get_piece_size())])


def get_spm(args, prog, corpus_lines, user_symbols=()):
    """Train on ``corpus_lines`` (or reuse via ``--spm-model``) a sentencepiece model.

    The model, and its .vocab file when there is one, ends up as
    ``<out>/spm.model`` and ``<out>/spm.vocab``. Returns the loaded processor.
    """
    target = args.out / "spm.model"
    if args.spm_model is not None:
        log(prog, f"reusing sentencepiece model {args.spm_model}")
        shutil.copyfile(args.spm_model, target)
        vocab = args.spm_model.with_suffix(".vocab")
        if vocab.exists():
            shutil.copyfile(vocab, args.out / "spm.vocab")
    else:
        log(prog, f"training sentencepiece unigram model, vocab {args.vocab_size}, "
                  f"on {len(corpus_lines)} lines")
        train_spm(corpus_lines, target, args.vocab_size, user_symbols)
    processor = spm.SentencePieceProcessor(model_file=str(target))
    for symbol in user_symbols:
        if processor.piece_to_id(symbol) == processor.unk_id():
            raise SystemExit(f"sentencepiece model lacks the symbol {symbol}")
    return processor


def encode(processor, lines, prefix=None):
    """Encode ``lines`` into space-separated pieces, optionally led by ``prefix``.

    The prefix (a user-defined symbol such as ``<2de>``) is encoded together
    with the line, exactly as ``fairseq-interactive --bpe sentencepiece`` encodes
    a typed ``<2de> A man ...``, so interactive input matches the training data.
    """
    if prefix:
        lines = [f"{prefix} {line}" for line in lines]
    return [" ".join(line) for line in processor.encode(lines, out_type=str)]


def test_split_name(index):
    """Return the split name fairseq-preprocess gives the ``index``-th --testpref."""
    return f"test{index or ''}"


def binarize(prog, args, workdir, test_prefixes, mode_options):
    """Run fairseq-preprocess on the encoded train/valid/test text in ``workdir``.

    ``mode_options`` selects monolingual (``--only-source``) or translation data;
    ``args.dict`` (optional) reuses an existing dictionary.
    """
    options = [
        *mode_options,
        "--trainpref", workdir / "train", "--validpref", workdir / "valid",
        "--testpref", ",".join(str(prefix) for prefix in test_prefixes),
        "--destdir", args.out, "--workers", args.workers,
    ]
    if args.dict is not None:
        options += ["--srcdict", args.dict]
    run_preprocess(prog, options, args.out / "preprocess.log", args.verbose)


def run_preprocess(prog, options, log_path, verbose=False):
    """Run ``fairseq_cli.preprocess`` with ``options`` in the current interpreter.

    Its output (fairseq's and Hydra's start-up lines included) goes to ``log_path``, and also to
    the terminal if ``verbose``.

    Raises:
        SystemExit: fairseq-preprocess failed; one line naming the log, after its last lines.
    """
    command = [sys.executable, "-m", "fairseq_cli.preprocess", *map(str, options)]
    log(prog, f"running fairseq-preprocess (log: {log_path})")
    with open(log_path, "w", encoding="utf-8") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        proc = subprocess.run(command, stdout=None if verbose else out, stderr=subprocess.STDOUT if not verbose else None)
    if proc.returncode != 0:
        if not verbose:
            tail = Path(log_path).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-10:]
            print("\n".join(tail), file=sys.stderr)
        fail(prog, f"fairseq-preprocess failed (exit {proc.returncode}); see {log_path}")


def write_json(path, data):
    """Write ``data`` as indented, key-sorted JSON."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
