#!/usr/bin/env python3
"""Score ``fairseq-generate`` output with sacreBLEU (cased, detokenized hypotheses).

Reads the generate log, takes the ``D-<id>`` lines (detokenized hypotheses; run
generate with ``--post-process sentencepiece``), orders them by sentence id and
scores them against the raw reference file with sacreBLEU's default 13a
tokenization, cased. Prints the score with sacreBLEU's signature, then one JSON line.

Example:
    python scripts/bleu.py gen.de.txt assets/mt/raw/test_2016_flickr.de.txt
"""

import argparse
import json
import re
import sys
from typing import Dict, List

import sacrebleu

_HYP = re.compile(r"^D-(\d+)\t[^\t]*\t(.*)$")


def read_hypotheses(path: str) -> List[str]:
    """Detokenized hypotheses of a fairseq-generate log, in sentence-id order.

    Raises:
        ValueError: no ``D-`` line, or ids that are not 0..n-1.
    """
    hyps: Dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = _HYP.match(line.rstrip("\n"))
            if m:
                hyps[int(m.group(1))] = m.group(2)
    if not hyps:
        raise ValueError(f"{path} has no D-<id> lines; is it fairseq-generate output?")
    if sorted(hyps) != list(range(len(hyps))):
        raise ValueError(f"{path}: sentence ids are not 0..{len(hyps) - 1}; was generation cut short?")
    return [hyps[i] for i in range(len(hyps))]


def score(hypotheses: List[str], references: List[str]) -> dict:
    """sacreBLEU corpus BLEU (13a, cased) with its signature.

    Raises:
        ValueError: different numbers of hypotheses and references.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    metric = sacrebleu.metrics.BLEU()
    result = metric.corpus_score(hypotheses, [references])
    return {"bleu": round(result.score, 2), "signature": str(metric.get_signature()), "sentences": len(hypotheses)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("generate_output", help="fairseq-generate stdout saved to a file")
    p.add_argument("reference", help="raw reference text, one sentence per line")
    p.add_argument("--first", type=int, default=None, help="score only the first N references (a cut test set)")
    a = p.parse_args(argv)
    hyps = read_hypotheses(a.generate_output)
    with open(a.reference, encoding="utf-8") as f:
        refs = [line.rstrip("\n") for line in f]
    if a.first is not None:
        refs = refs[: a.first]
    result = score(hyps, refs)
    print(f"BLEU = {result['bleu']:.2f}  ({result['signature']})", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
