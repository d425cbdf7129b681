"""The four stock fairseq tools with ``--user-dir`` on real (bundled) Multi30k / WikiText / Shakespeare lines.

A tiny MoE LM and a tiny MoE translation model are trained for a few dozen
updates with ``fairseq-train`` (loss must fall), then loaded by
``fairseq-eval-lm``, ``fairseq-generate`` and ``fairseq-interactive`` with the
plugin's flags; static gating with capacity 1.0 and dynamic gating must agree.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from fairseq_moe_infer.checkpoint import fairseq_checkpoint_globals

from .helpers import ASSETS, TINY_LM, TINY_MT, USER_DIR, ok, run

TINY_MODEL = ["--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128", "--decoder-attention-heads", "2",
              "--moe-expert-count", "4", "--moe-expert-ffn-dim", "64"]
COMMON = ["--user-dir", USER_DIR, "--optimizer", "adam", "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
          "--warmup-updates", "5", "--log-format", "simple", "--log-interval", "5", "--no-epoch-checkpoints",
          "--num-workers", "0", "--seed", "3", "--moe-gating-use-fp32"]
_LOSS = re.compile(r"train_inner .*? loss=([0-9.]+)")


def _losses(text):
    return [float(v) for v in _LOSS.findall(text)]


@pytest.fixture(scope="module")
def lm_checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("lm")
    text = ok(run("train", [TINY_LM, "--task", "moe_language_modeling", "--arch", "transformer_lm_moe_small",
                            "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "1024",
                            "--max-update", "40", "--decoder-layers", "2", "--save-dir", save] + TINY_MODEL + COMMON))
    return save / "checkpoint_last.pt", text


@pytest.fixture(scope="module")
def mt_checkpoint(tmp_path_factory):
    save = tmp_path_factory.mktemp("mt")
    enc = [a.replace("decoder", "encoder") for a in TINY_MODEL[:6]]
    text = ok(run("train", [TINY_MT, "--task", "moe_translation", "--arch", "transformer_moe_small",
                            "--source-lang", "src", "--target-lang", "tgt", "--criterion",
                            "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--max-tokens", "1024",
                            "--max-update", "30", "--encoder-layers", "2", "--decoder-layers", "2", "--save-dir", save]
                  + TINY_MODEL + enc + COMMON))
    return save / "checkpoint_last.pt", text


def test_train_lm_loss_falls_and_logs_moe_metrics(lm_checkpoint):
    _, text = lm_checkpoint
    losses = _losses(text)
    assert len(losses) >= 6 and losses[-1] < losses[0] - 1.0, losses
    assert "moe_gate_loss=" in text and "moe_dropped_pct=" in text and "inner_loss=" in text


def test_eval_lm_static_and_dynamic_agree(lm_checkpoint):
    ckpt, _ = lm_checkpoint
    ppl = {}
    for flags in (["--moe-gating", "dynamic"], ["--moe-gating", "static", "--moe-eval-capacity-token-fraction", "1.0"],
                  ["--moe-gating", "static", "--moe-eval-capacity-token-fraction", "0.05"]):
        text = ok(run("eval-lm", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", ckpt,
                                  "--gen-subset", "test1", "--tokens-per-sample", "64", "--max-tokens", "1024"] + flags))
        ppl[flags[-1]] = float(re.search(r"Perplexity: ([0-9.]+)", text).group(1))
        summary = re.search(r"moe_summary (.*)", text).group(1)
        assert '"wall_tokens_per_s"' in summary and '"expert_counts"' in summary
        if flags[-1] == "0.05":
            assert '"dropped": 0,' not in summary  # a tiny capacity drops tokens, and says so
    assert ppl["dynamic"] == ppl["1.0"]
    assert ppl["0.05"] != ppl["dynamic"]


def test_mt_train_generate_interactive(mt_checkpoint, tmp_path):
    ckpt, text = mt_checkpoint
    assert _losses(text)[-1] < _losses(text)[0]
    # the checkpoint holds argparse.Namespace: torch's weights-only load must accept it via our allow-list
    probe = subprocess.run([sys.executable, "-c", "import sys, torch; "
                            "print(*torch.serialization.get_unsafe_globals_in_checkpoint(sys.argv[1]))", str(ckpt)],
                           capture_output=True, text=True, check=True)  # a fresh process: torch's own allow-list only
    unsafe = set(probe.stdout.split())
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in fairseq_checkpoint_globals()}
    assert "argparse.Namespace" in unsafe and unsafe <= allowed
    assert torch.load(str(ckpt), weights_only=True)["cfg"]["model"].moe_expert_count == 4
    hyps = {}
    for gating in ("dynamic", "static"):
        out = ok(run("generate", [TINY_MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", ckpt,
                                  "--source-lang", "src", "--target-lang", "tgt", "--gen-subset", "test", "--beam", "2",
                                  "--max-tokens", "2048", "--post-process", "sentencepiece", "--moe-gating", gating,
                                  "--moe-eval-capacity-token-fraction", "1.0"]))
        hyps[gating] = sorted(line.split("\t") for line in out.splitlines() if line.startswith("D-"))
    # every sentence of the 50 (the installed fairseq's batch_by_size dropped the last batch: see fairseq_patches)
    assert sorted(int(h[0][2:]) for h in hyps["dynamic"]) == list(range(50))
    # same translations; scores equal up to float32 summation order (one-hot matmuls vs grouped GEMM)
    assert [(h[0], h[2]) for h in hyps["dynamic"]] == [(h[0], h[2]) for h in hyps["static"]]
    for d, s in zip(hyps["dynamic"], hyps["static"]):
        assert float(d[1]) == pytest.approx(float(s[1]), abs=1e-4)
    out = ok(run("interactive", [TINY_MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", ckpt,
                                 "--source-lang", "src", "--target-lang", "tgt", "--bpe", "sentencepiece",
                                 "--sentencepiece-model", f"{TINY_MT}/spm.model", "--beam", "2", "--moe-gating", "dynamic"],
                 stdin="<2de> A man is riding a bike.\n<2fr> Two dogs play in the snow.\n"))
    assert len([line for line in out.splitlines() if line.startswith("H-")]) == 2
    assert "S-0\t▁ <2de> ▁A ▁man" in out  # the tag is one token, as in the training data


@pytest.mark.parametrize("tool,flags,message", [
    ("eval-lm", ["--moe-gating", "fast"], "unknown --moe-gating 'fast'"),
    ("eval-lm", ["--moe-eval-capacity-token-fraction", "-0.5"], "--moe-eval-capacity-token-fraction must be a finite number in"),
    ("eval-lm", ["--moe-eval-capacity-token-fraction", "nan"],
     "--moe-eval-capacity-token-fraction must be a finite number in [0.0, 1.0], got nan"),
    ("eval-lm", ["--moe-eval-capacity-token-fraction", "inf"], "got inf"),
    ("eval-lm", ["--moe-stats-json", "/nonexistent-folder/stats.json"],
     "--moe-stats-json: folder /nonexistent-folder does not exist"),
    ("eval-lm", ["--moe-stats-json", "run.out", "--moe-record-trace", "./run.out"],  # the trace replaced the summary
     "--moe-stats-json and --moe-record-trace are the same file"),
    ("train", ["--arch", "transformer_lm_moe_small", "--moe-capacity-factor", "nan"],
     "--moe-capacity-factor must be a finite number"),
    ("train", ["--arch", "transformer_lm_moe_small", "--moe-expert-count", "1"], "--moe-top1-expert"),
    ("train", ["--arch", "transformer_lm_moe_small", "--moe-second-expert-policy", "best"], "--moe-second-expert-policy"),
    ("train", ["--arch", "transformer_lm_moe_small", "--criterion", "moe_cross_entropy",
               "--moe-gate-loss-combine-method", "max"], "fairseq-train: error: unknown --moe-gate-loss-combine-method"),
    ("train", ["--task", "language_modeling", "--arch", "transformer_lm_moe_small", "--criterion", "moe_cross_entropy",
               "--tokens-per-sample", "64", "--moe-gating", "fast"], "fairseq-train: error: unknown --moe-gating 'fast'"),
    ("eval-lm", ["--path", f"{ASSETS}/checkpoints/lm_moe/checkpoint.pt", "--model-overrides", "{'moe_expert_count': 8}"],
     "the checkpoint holds 16 experts but the model was built with 8"),
])
def test_bad_flags_exit_with_one_clear_line(tool, flags, message, tmp_path):
    args = [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling"] + flags
    if tool == "train":
        args += ["--save-dir", tmp_path, "--max-update", "1", "--max-tokens", "1024"]
    elif "--path" not in flags:
        args += ["--path", tmp_path / "none.pt"]
    proc = run(tool, args)
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.strip().splitlines() if "tensorboardX" not in line and line.strip()]
    assert "Traceback" not in proc.stderr
    assert message in err_lines[-1], proc.stderr[-2000:]


def test_missing_expert_shard_exits_with_one_clear_line(tmp_path):
    import shutil

    src = os.path.join(ASSETS, "checkpoints", "lm_moe")
    for name in ("checkpoint.pt", "checkpoint.experts-0-of-2.pt"):  # shard 1 of 2 left behind
        shutil.copy(os.path.join(src, name), tmp_path / name)
    proc = run("eval-lm", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling",
                           "--path", tmp_path / "checkpoint.pt", "--cpu"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1]
    assert last.startswith("fairseq-eval-lm: error:") and "checkpoint.experts-1-of-2.pt, which is missing" in last, last


@pytest.mark.parametrize("gating", ["static", "dynamic"])
def test_moe_gating_as_model_option_with_fairseqs_stock_task(gating, tmp_path):
    """--moe-gating is also a model option: fairseq's own language_modeling task (no moe_* task options)
    trains the MoE LM with the gating asked for; static gating at capacity factor 1.0 drops some top-2
    choices in training, dynamic none (the criterion logs moe_dropped_pct per update)."""
    out = ok(run("train", [TINY_LM, "--user-dir", USER_DIR, "--task", "language_modeling", "--arch",
                           "transformer_lm_moe_small", "--decoder-layers", "2", "--decoder-embed-dim", "64",
                           "--decoder-ffn-embed-dim", "128", "--moe-expert-ffn-dim", "64", "--moe-expert-count", "4",
                           "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "1024",
                           "--optimizer", "adam", "--lr", "3e-3", "--max-update", "3", "--cpu", "--no-save",
                           "--log-format", "simple", "--log-interval", "1", "--save-dir", tmp_path,
                           "--moe-gating", gating]))
    dropped = [float(x) for x in re.findall(r"moe_dropped_pct ([0-9.]+)", out)]
    assert dropped, out[-2000:]
    assert (max(dropped) == 0) == (gating == "dynamic"), dropped


@pytest.mark.parametrize("batch", [["--batch-size", "3"], ["--batch-size", "16", "--required-batch-size-multiple", "8"]])
def test_generate_translates_every_sentence_whatever_the_batch_settings(mt_checkpoint, batch):
    """50 sentences in batches of 3 (or 16) with fairseq's default --required-batch-size-multiple 8: the installed
    fairseq dropped the last batch (48 or 32 hypotheses, exit 0)."""
    ckpt, _ = mt_checkpoint
    out = ok(run("generate", [TINY_MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", ckpt, "--source-lang",
                              "src", "--target-lang", "tgt", "--gen-subset", "test", "--beam", "1", "--moe-gating", "dynamic"]
                 + batch))
    assert sorted(int(line.split("\t")[0][2:]) for line in out.splitlines() if line.startswith("H-")) == list(range(50))


def test_eval_lm_eos_break_mode_and_interactive_lm(lm_checkpoint):
    """numpy 2 removed np.compat, which fairseq uses in both (the plugin puts np.compat.long back); every sentence is scored
    even in batches of 3 (50 sentences: the last batch of 2 was dropped)."""
    from fairseq.data import data_utils

    ckpt, _ = lm_checkpoint
    text = ok(run("eval-lm", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", ckpt,
                              "--gen-subset", "test1", "--sample-break-mode", "eos", "--batch-size", "3",
                              "--moe-gating", "dynamic"]))
    # keep the dataset alive while reading its sizes: they are a view of its memory map (a segfault otherwise)
    dataset = data_utils.load_indexed_dataset(os.path.join(TINY_LM, "test1"), None)
    total = int(dataset.sizes.sum())  # tokens incl. </s> per line
    assert int(re.search(r"Evaluated ([0-9,]+) tokens", text).group(1).replace(",", "")) == total
    out = ok(run("interactive", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", ckpt,
                                 "--moe-gating", "dynamic", "--beam", "1", "--max-len-b", "5"], stdin="the man\n"))
    assert len([line for line in out.splitlines() if line.startswith("H-0")]) == 1


def _built_from_command_line(argv):
    """fairseq-train's own parsing (``options.parse_args_and_arch`` + the config conversion its ``cli_main`` does)
    and the model the task builds from it."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    return cfg, tasks.setup_task(cfg.task).build_model(cfg.model)


@pytest.mark.parametrize("model", ["lm", "mt"])
def test_use_moe_pad_mask_takes_true_or_false_on_the_command_line(model, capsys):
    """fairseq's MoE branch's --use-moe-pad-mask: bare or True masks padding out of routing, False routes it (the
    branch's default); unset is this plugin's default, masked. fairseq made the bool field a bare store_true flag, so
    '--use-moe-pad-mask False' ended in 'unrecognized arguments: False'."""
    from fairseq_moe_infer.moe import moe_layers

    if model == "lm":
        base = [TINY_LM, "--task", "moe_language_modeling", "--arch", "transformer_lm_moe_small"]
    else:
        base = [TINY_MT, "--task", "moe_translation", "--arch", "transformer_moe_small", "--source-lang", "src",
                "--target-lang", "tgt"]
    base += ["--user-dir", USER_DIR, "--moe-expert-count", "4", "--moe-freq", "2"]
    # (flags, value stored in cfg.model, padding routed)
    for flag, stored, routed in (([], None, False), (["--use-moe-pad-mask"], True, False),
                                 (["--use-moe-pad-mask", "False"], False, True), (["--use-moe-pad-mask", "true"], True, False)):
        cfg, built = _built_from_command_line(base + flag)
        assert cfg.model.use_moe_pad_mask == stored, flag  # what fairseq-train saves in the checkpoint's cfg
        layers = moe_layers(built)
        assert layers and all(m.route_padding is routed for m in layers), flag
    with pytest.raises(SystemExit):
        _built_from_command_line(base + ["--use-moe-pad-mask", "maybe"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --use-moe-pad-mask: expected True or False, got 'maybe'" in last, last
