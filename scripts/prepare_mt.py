"""Build the multilingual translation data-bin English -> German, French, Czech.

One data set for all three directions: every source line starts with a
target-language tag (<2de>, <2fr>, <2cs>) followed by the sentencepiece pieces
of the English sentence; the target is the pieces of the translation. Data:
Multi30k task 1 (raw, cased).

Output folder (default <repo>/data-bin/mt):
  spm.model, spm.vocab        sentencepiece unigram model (trained on Multi30k
                              train en+de+fr+cs, or copied from --spm-model)
  dict.src.txt, dict.tgt.txt  joined fairseq dictionary (identical files)
  train.src-tgt.*             87,000 pairs (29,000 per language)
  valid.src-tgt.*             the three Multi30k val sets (3 x 1,014)
  test.*, test1.*, test2.*    test_2016_flickr for de, fr, cs
  raw/                        untokenized test_2016_flickr source and references
  splits.json                 language -> split name, and the raw file names

Example:
  python scripts/prepare_mt.py
  python scripts/prepare_mt.py --out data-bin/tiny/mt --max-train-lines 300 \\
      --max-valid-lines 50 --max-test-lines 50 \\
      --spm-model data-bin/mt/spm.model --dict data-bin/mt/dict.src.txt
"""

import tempfile
from pathlib import Path

import data_common as dc

PROG = "prepare_mt"
SOURCE_LANG = "en"
TARGET_LANGS = ("de", "fr", "cs")
TEST_SET = "test_2016_flickr"


def tag(lang):
    """Return the target-language tag put in front of each source line."""
    return f"<2{lang}>"


def parse_args():
    """Parse the command line."""
    parser = dc.new_parser(__doc__)
    dc.add_common_args(parser, "data-bin/mt")
    return parser.parse_args()


def multi30k(args, split, lang, limit):
    """Read Multi30k ``split`` in language ``lang``, keeping the first ``limit`` lines."""
    return dc.read_lines(args.data_root / "multi30k" / f"{split}.{lang}.gz", limit)


def write_pairs(processor, workdir, name, pairs):
    """Encode (lang, English lines, target lines) ``pairs`` into ``name``.src/.tgt.

    Returns the number of written lines.
    """
    src, tgt = [], []
    for lang, en_lines, tgt_lines in pairs:
        if len(en_lines) != len(tgt_lines):
            raise SystemExit(f"{name}: {len(en_lines)} English vs {len(tgt_lines)} {lang} lines")
        src += dc.encode(processor, en_lines, prefix=tag(lang))
        tgt += dc.encode(processor, tgt_lines)
    dc.write_lines(workdir / f"{name}.src", src)
    dc.write_lines(workdir / f"{name}.tgt", tgt)
    return len(src)


def read_split(args, split, limit):
    """Return [(lang, English lines, target lines)] for every target language."""
    english = multi30k(args, split, SOURCE_LANG, limit)
    return [(lang, english, multi30k(args, split, lang, limit)) for lang in TARGET_LANGS]


def copy_raw_test(args, limit):
    """Write the raw test source and references to ``<out>/raw/``.

    Returns {"source": path, "references": {lang: path}} relative to ``<out>``.
    """
    names = {}
    for lang in (SOURCE_LANG, *TARGET_LANGS):
        name = f"raw/{TEST_SET}.{lang}.txt"
        dc.write_lines(args.out / name, multi30k(args, TEST_SET, lang, limit))
        names[lang] = name
    source = names.pop(SOURCE_LANG)
    return {"source": source, "references": names}


def write_tests(args, processor, workdir):
    """Encode one test set per target language into ``workdir``.

    Returns ({lang: split name}, [text prefixes in split order], {split: lines}).
    """
    splits, prefixes, counts = {}, [], {}
    for index, pair in enumerate(read_split(args, TEST_SET, args.max_test_lines)):
        lang, split = pair[0], dc.test_split_name(index)
        splits[lang] = split
        prefixes.append(workdir / f"test_{lang}")
        counts[split] = write_pairs(processor, workdir, prefixes[-1].name, [pair])
    return splits, prefixes, counts


def main():
    """Prepare the translation data-bin."""
    args = parse_args()
    dc.check_inputs(PROG, args, [f"multi30k/{split}.{lang}.gz" for split in ("train", "val", TEST_SET)
                                 for lang in (SOURCE_LANG, *TARGET_LANGS)],
                    "multi30k/ with Multi30k task 1's raw {train,val,test_2016_flickr}.{en,de,fr,cs}.gz")
    dc.prepare_out_dir(args.out)
    train = read_split(args, "train", args.max_train_lines)
    with tempfile.TemporaryDirectory(prefix="prepare_mt.") as tmp:
        workdir = Path(tmp)
        corpus = train[0][1] + [line for _, _, target in train for line in target]
        processor = dc.get_spm(args, PROG, corpus, [tag(lang) for lang in TARGET_LANGS])
        counts = {"train": write_pairs(processor, workdir, "train", train)}
        valid = read_split(args, "val", args.max_valid_lines)
        counts["valid"] = write_pairs(processor, workdir, "valid", valid)
        splits, test_prefixes, test_counts = write_tests(args, processor, workdir)
        counts.update(test_counts)
        for split, count in counts.items():
            dc.log(PROG, f"{split}: {count} encoded lines")
        dc.binarize(PROG, args, workdir, test_prefixes,
                    ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary"])
    dc.write_json(args.out / dc.OUTPUT_MARKER,
                  {"splits": splits, **copy_raw_test(args, args.max_test_lines)})
    dc.log(PROG, f"done: {args.out}")


if __name__ == "__main__":
    main()
