"""scripts/evaluate.py on raw test sets, scripts/bleu.py, and both scripts' bad-input lines.

The raw routes are checked against independent ones: translation against the README's manual
``fairseq-interactive`` route (same hypotheses, same sacreBLEU), perplexity against
``fairseq-eval-lm`` on the bundled binarized slice of the same sentences.
"""

import builtins
import fcntl
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
import sacrebleu

from .helpers import ASSETS, LM_CKPT, REPO, TINY_LM, USER_DIR, ok, run

EVALUATE = os.path.join(REPO, "scripts", "evaluate.py")
BLEU = os.path.join(REPO, "scripts", "bleu.py")
RAW = os.path.join(ASSETS, "mt", "raw", "test_2016_flickr.{}.txt")


def _module(name):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", os.path.join(REPO, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(lang, first, last=None):
    with open(RAW.format(lang), encoding="utf-8") as f:
        return f.read().split("\n")[first:last]


def _write(path, lines, gz=False):
    data = "".join(x + "\n" for x in lines).encode("utf-8")
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def _script(path, *args, timeout=600):
    return subprocess.run([sys.executable, path, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _one_error_line(proc, prog="evaluate.py"):
    """The single error line of a failed run (no traceback)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith(f"{prog}: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _main_error(capsys, argv, module=None):
    module = module or _module("evaluate")
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert isinstance(e.value.code, str), e.value.code
    assert "\n" not in e.value.code
    return e.value.code


def _readme_block(after):
    """The first ```bash block of README.md after the line starting with ``after``, comments removed."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = text[text.index("\n" + after):].split("```bash\n", 1)[1].split("```", 1)[0]
    return "\n".join(re.sub(r"\s+#.*$", "", line) for line in block.splitlines())


# --- the raw routes, against independent ones ------------------------------------------------

@pytest.mark.slow
def test_raw_translation_equals_manual_interactive_route(tmp_path):
    # 24 sentences in an order of their own, the source gzipped, two references (the second the first again)
    order = [5, 0, 23, 11, 2, 17, 8, 20, 14, 1, 9, 22, 3, 15, 6, 19, 12, 4, 21, 10, 7, 16, 13, 18]
    src_all, ref_all = _lines("en", 200, 224), _lines("de", 200, 224)
    src = _write(tmp_path / "src.en.gz", [src_all[i] for i in order], gz=True)
    refs = [ref_all[i] for i in order]
    ref = _write(tmp_path / "ref.de", refs)
    out = tmp_path / "out"
    proc = _script(EVALUATE, "--src", src, "--ref", ref, ref, "--lang", "de", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["translation"]["src.en.gz->de"]

    # the README's route, its commands as printed: tagged lines through fairseq-interactive, D- lines scored by sacrebleu
    plain = _write(tmp_path / "src.en", [src_all[i] for i in order])
    printed = _readme_block("Translate a file and score it")
    script = (printed.replace("translations", f"{tmp_path}/manual").replace("sacrebleu my_test.de ", f"sacrebleu {ref} {ref} ")
              .replace("my_test.en", plain))
    assert "my_test" not in script.replace(f"{tmp_path}/manual/my_test", ""), script
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", "-ec", script], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manual = (tmp_path / "manual" / "my_test.de").read_text(encoding="utf-8").splitlines()
    assert len(manual) == len(order)
    with open(out / "generate.src.en.gz.de.txt", encoding="utf-8") as f:
        ours = dict((int(m.group(1)), m.group(2)) for m in re.finditer(r"^D-(\d+)\t[^\t]*\t(.*)$", f.read(), re.M))
    assert [ours[i] for i in range(len(order))] == manual
    printed_scores = {m["name"]: m["score"] for m in json.loads(proc.stdout)}  # sacrebleu's JSON, as the README prints it
    assert printed_scores == {"BLEU": result["bleu"], "chrF2": result["chrf"]}
    expected = sacrebleu.corpus_bleu(manual, [refs, refs])
    assert result["bleu"] == round(expected.score, 2) and result["sentences"] == len(order) == 24
    assert result["chrf"] == round(sacrebleu.corpus_chrf(manual, [refs, refs]).score, 2)
    assert result["signature"].startswith("nrefs:2|case:mixed") and result["references"] == 2
    assert result["moe_dropped"] == 0 and result["moe_routed"] > 0
    assert (out / "report.md").read_text().count("src.en.gz->de") == 1 and (out / "tokens_per_expert.png").exists()


@pytest.mark.slow
def test_raw_lm_text_equals_bundled_split_and_refuses_a_second_run_on_its_folder(tmp_path):
    # the bundled tiny LM split test1 is the first 50 lines of Multi30k test English, binarized by prepare_lm.py
    lines = _lines("en", 0, 50)
    text = _write(tmp_path / "multi30k.en", lines[:20] + [""] + lines[20:])  # a blank line is dropped and counted
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, EVALUATE, "--lm-text", text, "--lm-data", TINY_LM, "--out-dir", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = out / ".evaluate.lock"
    deadline = time.time() + 120
    while not (lock.exists() and f"pid {first.pid}" in lock.read_text()) and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    second = _script(EVALUATE, "--lm-text", text, "--lm-data", TINY_LM, "--out-dir", out)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert all(line.startswith("[evaluate]") for line in stderr.splitlines()), stderr  # no fairseq/Hydra start-up lines
    assert "is in use by another evaluate.py run" in _one_error_line(second)
    ours = json.loads(stdout.strip().splitlines()[-1])["language_model"]["multi30k.en"]
    assert json.loads((out / "results.json").read_text())["language_model"]["multi30k.en"] == ours

    reference = ok(run("eval-lm", [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", LM_CKPT,
                                   "--gen-subset", "test1", "--tokens-per-sample", 256, "--max-tokens", 8192,
                                   "--moe-gating", "dynamic"]))
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", reference).group(1))
    tokens = int(re.search(r"Evaluated ([0-9,]+) tokens", reference).group(1).replace(",", ""))
    assert ours["perplexity"] == ppl and ours["tokens"] == tokens
    assert ours["lines"] == 50 and ours["blank_lines_dropped"] == 1


@pytest.mark.slow
def test_lm_blocks_past_the_model_positions_are_an_error_not_a_perplexity(tmp_path):
    # issue 10.7: eval-lm skips every 2000-token block of the 256-position model and printed perplexity 1.00
    proc = _script(EVALUATE, "--skip-mt", "--lm-sets", "multi30k", "--tokens-per-sample", 2000, "--out-dir", tmp_path)
    line = _one_error_line(proc)
    assert line.startswith("evaluate.py: error: fairseq-eval-lm: 8 of the set's 8 samples are longer than the model's 256 "
                           "positions") and line.endswith("use --tokens-per-sample <= 256 (see "
                                                          f"{tmp_path / 'eval_lm.multi30k.txt'})"), line
    assert not (tmp_path / "results.json").exists()


# --- bad inputs: one line each, before any tool runs ------------------------------------------

def test_raw_translation_bad_inputs(tmp_path, capsys):
    src = _write(tmp_path / "src.en", _lines("en", 0, 5))
    ref = _write(tmp_path / "ref.de", _lines("de", 0, 5))
    short = _write(tmp_path / "short.de", _lines("de", 0, 4))
    gapped = _write(tmp_path / "gapped.en", _lines("en", 0, 2) + [""] + _lines("en", 3, 5))
    latin1 = tmp_path / "latin1.en"
    latin1.write_bytes("A man\nA café\n".encode("latin-1"))
    out = str(tmp_path / "out")
    cases = {
        ("--src", src, "--ref", short, "--lang", "de"): "--ref " + short + " has 4 lines but --src " + src + " has 5",
        ("--src", gapped, "--ref", ref, "--lang", "de"): "has 1 empty line(s) (line 3)",
        ("--src", str(latin1), "--ref", ref, "--lang", "de"): "line 2 is not UTF-8",
        ("--src", src, "--ref", str(tmp_path / "nope.de"), "--lang", "de"): "nope.de: No such file or directory",
        ("--src", src, "--ref", ref, "--lang", "es"): "no target tag <2es>; it knows <2cs>, <2de>, <2fr>",
    }
    for argv, expected in cases.items():
        assert expected in _main_error(capsys, [*argv, "--out-dir", out]), argv


def test_a_line_longer_than_the_model_positions_is_one_error_line(tmp_path, capsys):
    # 100 captions on one line: over 1,024 sentencepiece tokens; fairseq-generate ended in its own traceback
    long_line = " ".join(_lines("en", 0, 100))
    src = _write(tmp_path / "src.en", _lines("en", 0, 2) + [long_line] + _lines("en", 2, 3))
    ref = _write(tmp_path / "ref.de", _lines("de", 0, 4))
    message = _main_error(capsys, ["--src", src, "--ref", ref, "--lang", "de", "--out-dir", str(tmp_path / "out")])
    import sentencepiece

    tokens = len(sentencepiece.SentencePieceProcessor(model_file=os.path.join(ASSETS, "mt", "spm.model")).encode(
        "<2de> " + long_line)) + 1  # the tag's pieces, the sentence's, end of sentence
    assert tokens > 1024
    assert message == (f"evaluate.py: error: --src {src}: 1 line longer than the model's 1,024 source positions "
                       f"(line 3: {tokens:,} tokens with the tag and end of sentence); split it into sentences")


def test_out_dir_that_is_a_file_full_or_read_only(tmp_path, capsys):
    src = _write(tmp_path / "src.en", _lines("en", 0, 2))
    ref = _write(tmp_path / "ref.de", _lines("de", 0, 2))
    raw = ["--src", src, "--ref", ref, "--lang", "de", "--out-dir"]
    assert _main_error(capsys, raw + [src]).endswith(f"--out-dir {src} is a file, not a folder")

    # a full disk: the lock file's probe write goes to /dev/full, which fails with the kernel's ENOSPC
    module = _module("evaluate")
    real_open = builtins.open

    def full_open(path, *args, **kwargs):
        return real_open("/dev/full" if str(path).endswith(".evaluate.lock") else path, *args, **kwargs)

    module.open = full_open
    out = str(tmp_path / "full")
    assert _main_error(capsys, raw + [out], module).endswith(f"cannot write in --out-dir {out}: No space left on device")

    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read_only"
        locked.mkdir(mode=0o500)
        assert _main_error(capsys, raw + [str(locked)]).endswith("Permission denied")


def test_results_written_to_a_full_disk_end_in_one_line(tmp_path, capsys, monkeypatch):
    module = _module("evaluate")
    monkeypatch.setattr(module, "evaluate_lm", lambda a, out_dir, tmp: {"x": {"perplexity": 2.0, "tokens": 3, "seconds": 0}})
    real_open = builtins.open
    module.open = lambda path, *a, **k: real_open("/dev/full" if ".tmp" in str(path) else path, *a, **k)
    out = tmp_path / "out"
    message = _main_error(capsys, ["--skip-mt", "--out-dir", str(out)], module)
    assert message.endswith("No space left on device") and str(out) in message
    assert not (out / "results.json").exists()


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".evaluate.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242, started now\n")
        held.flush()
        message = _main_error(capsys, ["--skip-mt", "--out-dir", str(out)])
    assert "is in use by another evaluate.py run (pid 4242" in message


def test_help_shows_each_default_once():
    text = _script(EVALUATE, "--help").stdout
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(options) > 20
    for option in options:
        assert option.count("default") <= 1, option
    assert "(default: ['" not in text and "(default: [])" not in text


def test_raw_flags_need_each_other():
    proc = _script(EVALUATE, "--src", "x.en", "--lang", "de")
    assert proc.returncode == 2 and "needs --src, --ref and --lang (missing: --ref)" in proc.stderr


# --- bleu.py ------------------------------------------------------------------------------------

def _generate_log(path, hyps, ids=None):
    ids = range(len(hyps)) if ids is None else ids
    path.write_text("".join(f"S-{i}\tx\nH-{i}\t-0.1\ty\nD-{i}\t-0.1\t{h}\n" for i, h in zip(ids, hyps)), encoding="utf-8")
    return str(path)


def test_bleu_script_scores_gz_and_several_references(tmp_path):
    hyps = ["Ein Mann fährt Fahrrad .", "Zwei Hunde spielen im Schnee."]
    ref1, ref2 = ["Ein Mann fährt ein Fahrrad.", "Zwei Hunde spielen im Schnee."], ["Ein Mann radelt.", "Hunde im Schnee."]
    gen = _generate_log(tmp_path / "gen.txt", [hyps[1], hyps[0]], ids=[1, 0])
    proc = _script(BLEU, gen, _write(tmp_path / "r1.gz", ref1, gz=True), _write(tmp_path / "r2", ref2))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bleu"] == round(sacrebleu.corpus_bleu(hyps, [ref1, ref2]).score, 2)
    assert result["chrf"] == round(sacrebleu.corpus_chrf(hyps, [ref1, ref2]).score, 2)
    assert result["signature"].startswith("nrefs:2") and "BLEU = " in proc.stderr and "chrF = " in proc.stderr


def test_bleu_script_bad_inputs(tmp_path):
    ref = _write(tmp_path / "ref", ["a b c", "d e f", "g h i"])
    latin1 = tmp_path / "latin1"
    latin1.write_bytes("a b c\nd é f\ng h i\n".encode("latin-1"))
    cases = {
        (_generate_log(tmp_path / "two.txt", ["a", "b"]), ref): "2 hypotheses but 3 references",
        (_generate_log(tmp_path / "gap.txt", ["a", "c"], ids=[0, 2]), ref): "sentence ids are not 0..1 (first missing: 1)",
        (_generate_log(tmp_path / "three.txt", ["a", "b", "c"]), str(latin1)): "line 2 is not UTF-8",
        (ref, ref): "has no D-<id> lines",
        (str(tmp_path / "missing.txt"), ref): "missing.txt: No such file or directory",
        # generate without --post-process: sacreBLEU scored the pieces (BLEU 0.28 on 20 Multi30k sentences, exit 0)
        (_generate_log(tmp_path / "pieces.txt", ["a b c", "\u2581d \u2581e", "g h i"]), ref):
            "pieces.txt: hypothesis 1 holds sentencepiece pieces (\u2581); run fairseq-generate with "
            "--post-process sentencepiece",
    }
    for argv, expected in cases.items():
        assert expected in _one_error_line(_script(BLEU, *argv), "bleu.py"), argv


# --- the report page ----------------------------------------------------------------------------

def test_report_page_tables_and_heat_map(tmp_path):
    report = _module("eval_report")
    results = {"moe_gating": "dynamic", "seconds": 3.0,
               "translation": {"en-de": {"bleu": 40.0, "chrf": 60.0, "sentences": 2, "signature": "nrefs:1|s",
                                         "chrf_signature": "nrefs:1|c", "moe_tokens_per_s": 10.0, "moe_dropped": 1,
                                         "moe_routed": 4, "seconds": 1.0,
                                         "tokens_per_expert": {"encoder.layers.1.moe_layer": [3, 1]}}},
               "language_model": {"wiki": {"perplexity": 20.0, "tokens": 8, "seconds": 2.0, "moe_tokens_per_s": None,
                                           "moe_dropped": 0, "moe_routed": 0,
                                           "tokens_per_expert": {"decoder.layers.1.moe_layer": [0, 0, 0]}}}}
    labels, rows = report.heatmap_rows(results)
    assert labels == ["en-de · enc 1", "wiki · dec 1"]
    assert rows[0][:2] == [75.0, 25.0] and rows[0][2] != rows[0][2] and rows[1] == [0.0, 0.0, 0.0]  # NaN pad
    path = report.write_report(results, str(tmp_path), "python scripts/evaluate.py")
    text = open(path, encoding="utf-8").read()
    assert "| en-de | **40.00** | 60.00 | 2 | 10.0 | 1 / 4 (25.0%) | 1.0 |" in text
    assert "| wiki | **20.00** | 8 | n/a | 0 / 0 (0.0%) | 2.0 |" in text
    assert (tmp_path / "tokens_per_expert.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["report.md", "tokens_per_expert.png"]  # no temporary file left


# --- data preparation -------------------------------------------------------------------------

PREPARE_MT = os.path.join(REPO, "scripts", "prepare_mt.py")
PREPARE_LM = os.path.join(REPO, "scripts", "prepare_lm.py")


def test_prepare_scripts_name_the_flag_for_missing_data(tmp_path):
    for script in (PREPARE_MT, PREPARE_LM):
        prog = os.path.basename(script)[:-3]
        line = _one_error_line(_script(script, "--data-root", tmp_path / "nowhere", "--out", tmp_path / "o"), prog)
        assert "--data-root" in line and "nowhere is not a folder; set --data-root to the folder holding multi30k/" in line
    (tmp_path / "root" / "multi30k").mkdir(parents=True)
    line = _one_error_line(_script(PREPARE_MT, "--data-root", tmp_path / "root", "--out", tmp_path / "o"), "prepare_mt")
    assert "has no multi30k/train.en.gz (and 11 more); set --data-root" in line
    assert not (tmp_path / "o").exists()  # checked before anything is written


def _small_corpus(tmp_path):
    """A corpus of one's own in the layout prepare_mt.py reads (60 lines per language); returns its multi30k/ folder."""
    root = tmp_path / "root" / "multi30k"
    root.mkdir(parents=True)
    for split, (first, last) in {"train": (0, 40), "val": (40, 50), "test_2016_flickr": (50, 60)}.items():
        for lang in ("en", "de", "fr", "cs"):
            _write(root / f"{split}.{lang}.gz", _lines(lang, first, last), gz=True)
    return root


def test_prepare_mt_names_the_line_of_a_file_that_is_not_utf8(tmp_path):
    root = _small_corpus(tmp_path)
    with gzip.open(root / "train.de.gz", "wb") as f:  # latin-1 text: not UTF-8 from line 2
        f.write("ein Haus\ngroße Straße\n".encode("latin-1"))
    line = _one_error_line(_script(PREPARE_MT, "--data-root", root.parent, "--out", tmp_path / "o", "--spm-model",
                                   os.path.join(ASSETS, "mt", "spm.model"), "--dict", os.path.join(ASSETS, "mt", "dict.src.txt"),
                                   "--workers", 1), "prepare_mt")
    assert "train.de.gz: line 2 is not UTF-8" in line and "iconv -f latin1 -t utf-8" in line


def test_prepare_mt_builds_a_quiet_data_folder_from_a_small_corpus(tmp_path):
    # a corpus of one's own in the layout prepare_mt.py reads, with the bundled sentencepiece model and dictionary
    root = _small_corpus(tmp_path)
    out = tmp_path / "mt"
    proc = _script(PREPARE_MT, "--data-root", root.parent, "--out", out, "--spm-model", os.path.join(ASSETS, "mt", "spm.model"),
                   "--dict", os.path.join(ASSETS, "mt", "dict.src.txt"), "--workers", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("DEBUG:hydra", "tensorboardX", "INFO:fairseq"):
        assert noise not in proc.stdout + proc.stderr
    assert "tensorboardX" in (out / "preprocess.log").read_text()  # kept in the log
    splits = json.loads((out / "splits.json").read_text())
    assert splits["splits"] == {"de": "test", "fr": "test1", "cs": "test2"}
    assert (out / "dict.src.txt").read_text() == open(os.path.join(ASSETS, "mt", "dict.src.txt")).read()


def test_plugin_scripts_keep_fairseq_start_up_lines_out_unless_verbose(tmp_path):
    ckpt = os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt")
    script = os.path.join(REPO, "scripts", "export_checkpoint.py")
    quiet = _script(script, ckpt, "--out", tmp_path / "a" / "checkpoint.pt")
    assert quiet.returncode == 0, quiet.stderr
    # the experts of the two shard files are in the exported main file (7.0 MiB shared + 2 x 4.0 MiB experts)
    assert quiet.stderr.strip().splitlines() == ["wrote checkpoint.pt: 15.0 MiB"]
    verbose = _script(script, ckpt, "--out", tmp_path / "b" / "checkpoint.pt", "--verbose")
    assert "Please install tensorboardX" in verbose.stderr  # fairseq's line, shown when asked


def test_importing_the_plugin_first_prints_nothing_and_leaves_logging_to_the_caller():
    # fairseq's import calls logging.basicConfig (INFO, then DEBUG): where the plugin imports fairseq first, that printed
    # 'INFO:fairseq.tasks.text_to_speech:Please install tensorboardX' from `python -m fairseq_moe_infer` (every README
    # example's --user-dir), plan_placement.py and simulate_buffering.py, and left the root logger at DEBUG
    user_dir = subprocess.run([sys.executable, "-m", "fairseq_moe_infer"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert (user_dir.returncode, user_dir.stdout, user_dir.stderr) == (0, USER_DIR + "\n", "")
    for script in ("plan_placement.py", "simulate_buffering.py"):
        proc = _script(os.path.join(REPO, "scripts", script), "--help")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    own = ("import logging, fairseq_moe_infer; root = logging.getLogger(); print(len(root.handlers), root.level); "
           "logging.basicConfig(level=logging.INFO); logging.getLogger('mine').info('shown')")
    proc = subprocess.run([sys.executable, "-c", own], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert (proc.stdout, proc.stderr) == ("0 30\n", "INFO:mine:shown\n")  # unconfigured (WARNING), the caller's to set


def test_gitignore_covers_the_folders_the_readme_examples_create():
    if not os.path.isdir(os.path.join(REPO, ".git")) and not os.path.isfile(os.path.join(REPO, ".git")):
        pytest.skip("not a git checkout")
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    made = re.compile(r"(?:mkdir -p|--save-dir|--destdir|--out-dir)\s+([\w.-]+)|>\s*([\w.-]+)/")
    folders = {m.group(1) or m.group(2) for block in blocks for m in made.finditer(block)} - {"benchmarks"}  # results kept
    assert {"my_data", "translations", "ckpt"} <= folders, folders
    for folder in sorted(folders):
        probe = subprocess.run(["git", "check-ignore", "-q", f"{folder}/x"], cwd=REPO)
        assert probe.returncode == 0, f"{folder}/ (made by a README example) is not in .gitignore"
