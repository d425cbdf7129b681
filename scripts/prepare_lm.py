"""Build the language-modelling data-bin (sentencepiece pieces, one line a sample).

Training corpus: Multi30k train en, de, fr, cs; WikiText-2 valid; tiny
Shakespeare without its last 10% of lines. Validation: Multi30k val English.
Evaluation sets, all kept out of training:
  test   WikiText-2 test
  test1  Multi30k test_2016_flickr English
  test2  the last 10% of the tiny Shakespeare lines
Blank lines are dropped everywhere (after the Shakespeare 90/10 cut, which is
made on the original line numbers).

Output folder (default <repo>/data-bin/lm):
  spm.model, spm.vocab   sentencepiece unigram model trained on the training
                         corpus only (or copied from --spm-model)
  dict.txt               fairseq dictionary (built from train, or --dict)
  train.*, valid.*, test.*, test1.*, test2.*   binarized splits
  splits.json            evaluation-set name -> split name

Example:
  python scripts/prepare_lm.py
  python scripts/prepare_lm.py --out data-bin/tiny/lm --max-train-lines 300 \\
      --max-valid-lines 50 --max-test-lines 50 \\
      --spm-model data-bin/lm/spm.model --dict data-bin/lm/dict.txt
"""

import tempfile
from pathlib import Path

import data_common as dc

PROG = "prepare_lm"
HELD_OUT_FRACTION = 10  # the last 1/10 of tiny Shakespeare is a test set
TEST_NAMES = ("wikitext2", "multi30k", "shakespeare")


def parse_args():
    """Parse the command line."""
    parser = dc.new_parser(__doc__)
    dc.add_common_args(parser, "data-bin/lm")
    return parser.parse_args()


def non_blank(lines, limit=None):
    """Drop blank lines, then keep the first ``limit`` lines."""
    kept = [line for line in lines if line.strip()]
    return kept[:limit] if limit is not None else kept


def shakespeare(args):
    """Return (training lines, held-out lines) of tiny Shakespeare, blanks included."""
    lines = dc.read_lines(args.data_root / "tinyshakespeare" / "input.txt")
    cut = len(lines) - len(lines) // HELD_OUT_FRACTION
    return lines[:cut], lines[cut:]


def corpora(args):
    """Return the train lines, valid lines and {test name: lines}, blank lines dropped."""
    root = args.data_root
    shakespeare_train, shakespeare_test = shakespeare(args)
    sources = [dc.read_lines(root / "multi30k" / f"train.{lang}.gz")
               for lang in ("en", "de", "fr", "cs")]
    sources += [dc.read_lines(root / "wikitext-2" / "valid.txt"), shakespeare_train]
    train = [line for source in sources for line in non_blank(source, args.max_train_lines)]
    valid = non_blank(dc.read_lines(root / "multi30k" / "val.en.gz"), args.max_valid_lines)
    tests = {
        "wikitext2": dc.read_lines(root / "wikitext-2" / "test.txt"),
        "multi30k": dc.read_lines(root / "multi30k" / "test_2016_flickr.en.gz"),
        "shakespeare": shakespeare_test,
    }
    tests = {name: non_blank(tests[name], args.max_test_lines) for name in TEST_NAMES}
    return train, valid, tests


def main():
    """Prepare the language-modelling data-bin."""
    args = parse_args()
    raw = [f"multi30k/train.{lang}.gz" for lang in ("en", "de", "fr", "cs")]
    raw += ["multi30k/val.en.gz", "multi30k/test_2016_flickr.en.gz", "wikitext-2/valid.txt", "wikitext-2/test.txt",
            "tinyshakespeare/input.txt"]
    dc.check_inputs(PROG, args, raw, "multi30k/ (Multi30k task 1 raw .gz), wikitext-2/ (valid.txt, test.txt) "
                    "and tinyshakespeare/input.txt")
    dc.prepare_out_dir(args.out)
    train, valid, tests = corpora(args)
    with tempfile.TemporaryDirectory(prefix="prepare_lm.") as tmp:
        workdir = Path(tmp)
        processor = dc.get_spm(args, PROG, train)
        texts = {"train": train, "valid": valid}
        splits = {}
        for index, name in enumerate(TEST_NAMES):
            splits[name] = dc.test_split_name(index)
            texts[f"test_{name}"] = tests[name]
        for name, lines in texts.items():
            dc.write_lines(workdir / name, dc.encode(processor, lines))
            dc.log(PROG, f"{name}: {len(lines)} encoded lines")
        dc.binarize(PROG, args, workdir, [workdir / f"test_{name}" for name in TEST_NAMES], ["--only-source"])
    dc.write_json(args.out / dc.OUTPUT_MARKER, {"splits": splits})
    dc.log(PROG, f"done: {args.out}")


if __name__ == "__main__":
    main()
