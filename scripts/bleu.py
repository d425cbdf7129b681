#!/usr/bin/env python3
"""Score ``fairseq-generate`` output with sacreBLEU (cased, detokenized hypotheses): BLEU and chrF.

Reads the generate log, takes the ``D-<id>`` lines (detokenized hypotheses; run
generate with ``--post-process sentencepiece``), orders them by sentence id and
scores them against the raw reference file(s) (plain or .gz, one sentence a line)
with sacreBLEU's defaults: BLEU with 13a tokenization, cased, and chrF. Prints the
scores with sacreBLEU's signatures, then one JSON line. Bad input (a missing or
non-UTF-8 file, missing sentence ids, a line-count mismatch) ends in one error line.

Example:
    python scripts/bleu.py gen.de.txt assets/mt/raw/test_2016_flickr.de.txt
"""

import argparse
import gzip
import json
import re
import sys
from typing import Dict, List, Sequence

import sacrebleu

_HYP = re.compile(r"^D-(\d+)\t[^\t]*\t(.*)$")


def read_lines(path: str, what: str = "file") -> List[str]:
    """The lines of a UTF-8 text file (gzip if the name ends in ``.gz``), without line ends.

    Lines are split on ``\\n`` only (a trailing ``\\r`` of CRLF files is removed), as fairseq
    and sacreBLEU's command line split them.

    Raises:
        ValueError: the file is missing or unreadable, or a line is not UTF-8 (its number is
            named); the message starts with ``what`` (e.g. the flag that named the file).
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise ValueError(f"{what} {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = []
    for number, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} {path}: line {number} is not UTF-8 ({e.reason} at byte {e.start}); "
                             "convert the file, e.g. iconv -f latin1 -t utf-8") from None
    return out


def read_hypotheses(path: str) -> List[str]:
    """Detokenized hypotheses of a fairseq-generate log, in sentence-id order.

    Raises:
        ValueError: an unreadable or non-UTF-8 file, no ``D-`` line, ids that are not 0..n-1
            (the first missing id is named), or sentencepiece pieces (``\u2581``) left in the hypotheses.
    """
    hyps: Dict[int, str] = {}
    for line in read_lines(path, "generate output"):
        m = _HYP.match(line)
        if m:
            hyps[int(m.group(1))] = m.group(2)
    if not hyps:
        raise ValueError(f"{path} has no D-<id> lines; is it fairseq-generate output (with --post-process)?")
    if sorted(hyps) != list(range(len(hyps))):
        gap = next(i for i in range(len(hyps) + 1) if i not in hyps)
        raise ValueError(f"{path}: sentence ids are not 0..{len(hyps) - 1} (first missing: {gap}); "
                         "was generation cut short?")
    pieces = next((i for i in sorted(hyps) if "\u2581" in hyps[i]), None)
    if pieces is not None:  # sacreBLEU would score the pieces: BLEU near 0, exit 0
        raise ValueError(f"{path}: hypothesis {pieces} holds sentencepiece pieces (\u2581); run fairseq-generate with "
                         "--post-process sentencepiece")
    return [hyps[i] for i in range(len(hyps))]


def score(hypotheses: List[str], references) -> dict:
    """sacreBLEU corpus BLEU (13a, cased) and chrF, with their signatures.

    Args:
        hypotheses: n detokenized strings.
        references: n strings (one reference), or a list of reference streams of n strings each.

    Raises:
        ValueError: a reference stream whose length differs from the hypotheses'.
    """
    streams: Sequence[List[str]] = [references] if references and isinstance(references[0], str) else references
    if not streams:
        streams = [references]
    for i, refs in enumerate(streams):
        if len(refs) != len(hypotheses):
            which = "references" if len(streams) == 1 else f"lines in reference {i + 1}"
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(refs)} {which}")
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hypotheses, list(streams)), chrf.corpus_score(hypotheses, list(streams))
    return {"bleu": round(b.score, 2), "chrf": round(c.score, 2), "signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "sentences": len(hypotheses)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generate_output", help="fairseq-generate stdout saved to a file")
    p.add_argument("reference", nargs="+", help="raw reference text(s), one sentence a line (plain or .gz)")
    p.add_argument("--first", type=int, default=None, help="score only the first N references (a cut test set)")
    a = p.parse_args(argv)
    try:
        hyps = read_hypotheses(a.generate_output)
        refs = [read_lines(path, "reference")[: a.first] for path in a.reference]
        result = score(hyps, refs)
    except ValueError as e:
        raise SystemExit(f"bleu.py: error: {e}") from None
    print(f"BLEU = {result['bleu']:.2f}  ({result['signature']})", file=sys.stderr)
    print(f"chrF = {result['chrf']:.2f}  ({result['chrf_signature']})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
