"""Bad input and interrupted runs: no lost sentences, no summary that looks complete, one line instead of a
traceback (README "Bad input and what you get"). Runs the stock tools on the bundled models."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from fairseq_moe_infer import fairseq_patches

from .helpers import ASSETS, LM_CKPT, MT_CKPT, TINY_LM, USER_DIR, run, tool, with_default_sigint


def _last_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_batch_by_size_keeps_every_sentence():
    """The installed fairseq drops a last batch whose size is not a multiple of --required-batch-size-multiple."""
    from fairseq.data import data_utils

    sizes = np.full(20, 10)
    unwrapped = data_utils.batch_by_size.__wrapped__
    assert sum(map(len, unwrapped(np.arange(20), lambda i: 10, max_tokens=1024, required_batch_size_multiple=8))) == 16
    assert len(unwrapped(np.arange(3), lambda i: 10, max_tokens=1024, required_batch_size_multiple=8)) == 0
    for n, kwargs in [(20, dict(max_tokens=1024)), (3, dict(max_tokens=1024)), (20, dict(max_sentences=3)),
                      (20, dict(max_tokens=35, num_tokens_vec=sizes))]:
        batches = data_utils.batch_by_size(np.arange(n), lambda i: 10, required_batch_size_multiple=8, **kwargs)
        assert np.concatenate(batches).tolist() == list(range(n)), kwargs  # every sentence, once, in order
    gen = (i for i in range(5))  # an iterator of indices, as fairseq allows
    assert np.concatenate(data_utils.batch_by_size(gen, lambda i: 1, max_sentences=2, required_batch_size_multiple=4)).tolist() \
        == [0, 1, 2, 3, 4]
    fairseq_patches.install()  # idempotent
    assert data_utils.batch_by_size.__wrapped__ is unwrapped


def test_static_gating_out_of_memory_is_one_line(monkeypatch):
    from fairseq_moe_infer.moe import MoELayer
    from fairseq_moe_infer.moe.dispatch import MoEOutOfMemoryError

    layer = MoELayer(16, 32, 4, k=2, gating="static", eval_capacity_token_fraction=1.0).eval()

    def no_memory(*args, **kwargs):  # what the allocator raises for the [T, E, C] tensors of a huge batch
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(torch, "bmm", no_memory)
    with pytest.raises(MoEOutOfMemoryError, match=r"a batch of 12 tokens builds \[tokens, experts, capacity\] = \[12, 4, 12\] "
                                                  r".*use --moe-gating dynamic .* or a smaller --max-tokens"):
        layer(torch.randn(12, 16))
    layer.train()  # in training fairseq's trainer handles OOM (skips the batch): the error passes through
    with pytest.raises(torch.OutOfMemoryError):
        layer(torch.randn(12, 16))


@pytest.mark.parametrize("break_mode,tokens_per_sample,fix", [
    ("none", 2000, "use --tokens-per-sample <= 256"),
    ("eos", 256, "use --sample-break-mode none with --tokens-per-sample <= 256")])
def test_eval_lm_refuses_samples_longer_than_the_model(break_mode, tokens_per_sample, fix):
    """fairseq-eval-lm skipped samples longer than the model's positions with a warning and printed the perplexity of
    the rest, exit 0: --tokens-per-sample 2000 on the 256-position bundled LM gave perplexity 1.00 over 0 tokens."""
    from fairseq import options, tasks
    from fairseq.data import data_utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_eval_lm_parser(), [
        ASSETS + "/lm", "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--tokens-per-sample",
        str(tokens_per_sample), "--sample-break-mode", break_mode])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset("test1")
    dataset = task.dataset("test1")
    lines = data_utils.load_indexed_dataset(ASSETS + "/lm/test1", None)
    if break_mode == "eos":  # no Multi30k line is longer than 256 tokens: the model's positions are made 20 here
        long = int((lines.sizes > 20).sum())  # counted independently of fairseq's filter
        max_positions, fix = 20, fix.replace("256", "20")
    else:
        long, max_positions = len(dataset), 256  # every 2000-token block (the last is shorter, but > 256)
    assert 0 < long <= len(dataset)
    with pytest.raises(SystemExit, match=rf"error: {long:,} of the set's {len(dataset):,} samples are longer than the "
                                         rf"model's {max_positions} positions: .*; {re.escape(fix)}$"):
        task.eval_lm_dataloader(dataset, max_tokens=4096, max_positions=max_positions)
    batches = task.eval_lm_dataloader(dataset, max_tokens=4096, max_positions=10_000, num_workers=0)
    assert sum(len(b["id"]) for b in batches) == len(dataset)  # all fit: every sample is batched, as before


def _empty_split(folder):
    from fairseq.data import indexed_dataset

    for name in ("dict.txt",):
        with open(os.path.join(TINY_LM, name)) as src, open(os.path.join(folder, name), "w") as dst:
            dst.write(src.read())
    indexed_dataset.make_builder(os.path.join(folder, "empty.bin"), impl="mmap", vocab_size=9000).finalize(
        os.path.join(folder, "empty.idx"))


@pytest.mark.slow  # fairseq tool start-ups (about 15 s each on the 2-core CPU machine)
@pytest.mark.parametrize("case", ["missing", "text", "empty_split", "mt_in_eval_lm", "nan_shard"])
def test_bad_inputs_give_one_line(case, tmp_path):
    data, path, subset = ASSETS + "/lm", LM_CKPT, "test1"
    if case == "missing":
        path, message = tmp_path / "nope.pt", f"checkpoint {tmp_path / 'nope.pt'} does not exist (check --path)"
    elif case == "text":
        path = tmp_path / "notes.txt"
        path.write_text("not a checkpoint\n")
        message = f"{path} is not a torch checkpoint"
    elif case == "empty_split":
        _empty_split(tmp_path)
        data, subset, message = tmp_path, "empty", f"split 'empty' of {tmp_path} holds no sentences"
    elif case == "mt_in_eval_lm":
        path, message = MT_CKPT, "holds a transformer_moe_small model (TransformerMoEModel), not a language model"
    else:
        src = os.path.dirname(LM_CKPT)
        for f in os.listdir(src):
            (tmp_path / f).write_bytes(open(os.path.join(src, f), "rb").read())
        shard = torch.load(tmp_path / "checkpoint.experts-0-of-2.pt", weights_only=True)
        shard["model"]["decoder.layers.3.moe_layer.experts.fc1_bias"][0, 0] = float("inf")
        torch.save(shard, tmp_path / "checkpoint.experts-0-of-2.pt")
        path = tmp_path / "checkpoint.pt"
        message = "checkpoint.experts-0-of-2.pt: decoder.layers.3.moe_layer.experts.fc1_bias holds NaN/Inf values"
    proc = run("eval-lm", [data, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", path,
                           "--gen-subset", subset, "--max-tokens", "2048", "--cpu"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]
    assert _last_line(proc).startswith("fairseq-eval-lm: error: ") and message in _last_line(proc), _last_line(proc)


@pytest.mark.slow  # fairseq tool start-ups (about 15 s each on the 2-core CPU machine)
def test_interactive_skips_non_utf8_lines_and_refuses_unknown_target_tags():
    args = [ASSETS + "/mt", "--user-dir", USER_DIR, "--task", "moe_translation", "--source-lang", "src", "--target-lang", "tgt",
            "--path", MT_CKPT, "--bpe", "sentencepiece", "--sentencepiece-model", ASSETS + "/mt/spm.model", "--beam", "1",
            "--moe-gating", "dynamic", "--cpu"]
    raw = ("<2de> A man is riding a bike.\n<2de> caf\xe9 noir\n<2fr> Two dogs play in the snow.\nA dog runs.\n"
           "<2es> A man is riding a bike.\n<2de> never reached\n").encode("latin-1")
    proc = subprocess.run(tool("interactive") + [str(a) for a in args], input=raw, capture_output=True, timeout=600)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "input line 2 is not UTF-8 (byte 9: invalid continuation byte); skipped" in err
    hyps = [line.split("\t")[2] for line in out.splitlines() if line.startswith("D-")]
    assert len(hyps) == 3 and hyps[1] == "Deux chiens jouent dans la neige.", hyps  # the valid lines before the bad tag
    assert "input line without a target tag (<2cs>, <2de>, <2fr>): the model picks the target language itself" in err
    last = [line for line in err.strip().splitlines() if line.strip()][-1]
    assert last == ("fairseq-interactive: error: unknown target tag <2es> in '<2es> A man is riding a bike.'; "
                    "the model knows <2cs>, <2de>, <2fr>")


@pytest.mark.slow  # fairseq tool start-ups (about 15 s each on the 2-core CPU machine)
def test_sigint_marks_the_summary_incomplete(tmp_path):
    stats = tmp_path / "stats.json"
    cmd = tool("eval-lm") + [ASSETS + "/lm", "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", LM_CKPT,
                             "--gen-subset", "test", "--max-tokens", "512", "--tokens-per-sample", "256", "--cpu",
                             "--moe-gating", "dynamic", "--moe-stats-json", str(stats)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=with_default_sigint)
    seen = ""
    while "creating new batches" not in seen:  # the model is loaded; the evaluation loop starts
        line = proc.stderr.readline()
        assert line or proc.poll() is None, seen[-2000:]
        seen += line
    time.sleep(12)  # a few of WikiText-2's ~1,000 batches (the whole set takes minutes on a CPU)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    summary = json.loads(stats.read_text())  # strict JSON
    assert summary["complete"] is False and summary["tokens"] < 245_000, summary["tokens"]  # a part of the set
    assert "MoE summary of an interrupted or failed run" in err


@pytest.mark.slow  # fairseq tool start-ups (about 15 s each on the 2-core CPU machine)
def test_summary_of_a_finished_run_is_complete_and_strict_json(tmp_path):
    stats = tmp_path / "stats.json"
    proc = run("eval-lm", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", LM_CKPT,
                           "--gen-subset", "test1", "--max-tokens", "2048", "--tokens-per-sample", "64", "--cpu",
                           "--moe-stats-json", stats])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(stats.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the stats JSON"))
    assert summary["complete"] is True and summary["tokens"] > 0
