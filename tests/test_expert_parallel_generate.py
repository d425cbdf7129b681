"""Expert-parallel ``fairseq-generate`` / ``fairseq-interactive`` print what one process prints.

The bundled MT model (16 experts, 2 MoE layers in the encoder and 2 in the decoder) on a few
sentences of the bundled test set, experts over 2 (and 4) gloo CPU ranks started by hand.
Beam searches of different batches end after different step counts (the sentences are 10 to
38 tokens long); the ranks' lockstep must keep their all-to-alls matched and the output must be
one process's: same lines, same order, same BLEU line. Scores (H-/D-) agree to float32 rounding
only: the experts multiply other row counts (both ranks' tokens at once), so the last bits of a
GEMM differ; the test compares them to 1e-5 and everything else exactly.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from fairseq_moe_infer.trace import read_trace

from .helpers import ASSETS, USER_DIR, free_port, tool

MT = os.path.join(ASSETS, "mt")
CKPT = os.path.join(ASSETS, "checkpoints", "mt_moe", "checkpoint.pt")
LENGTHS_NOTE = "sentences 0-6 of assets/mt test: 15, 24, 17, 26, 13, 36, 17 source tokens"



def _subset(folder, ids):
    """A binarized copy of sentences ``ids`` of the bundled test set (both sides, with dictionaries)."""
    import shutil

    from fairseq.data import data_utils, indexed_dataset

    os.makedirs(folder, exist_ok=True)
    for side in ("src", "tgt"):
        ds = data_utils.load_indexed_dataset(os.path.join(MT, f"test.src-tgt.{side}"), None)
        out = indexed_dataset.make_builder(os.path.join(folder, f"test.src-tgt.{side}.bin"), impl="mmap", vocab_size=10000)
        for i in ids:
            out.add_item(ds[i])
        out.finalize(os.path.join(folder, f"test.src-tgt.{side}.idx"))
        shutil.copy(os.path.join(MT, f"dict.{side}.txt"), folder)
    return str(folder)


def _generate_args(data, extra):
    return [data, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", CKPT, "--source-lang", "src",
            "--target-lang", "tgt", "--gen-subset", "test", "--beam", "2", "--post-process", "sentencepiece",
            "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0"] + extra


def _ranks(name, args, world, stdin=None, timeout=300):
    """Start ``world`` ranks of fairseq-<name> by hand (gloo), return their outputs (rank order)."""
    port = free_port()
    procs = [subprocess.Popen(tool(name) + args + [
        "--distributed-world-size", str(world), "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(input=stdin, timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"expert-parallel fairseq-{name} on {world} ranks hung")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _one(name, args, stdin=None):
    p = subprocess.run(tool(name) + args, input=stdin, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout + p.stderr


_RESULT = re.compile(r"^([STHDPW])-(\d+)\t(.*)$")


def _results(text):
    """(kind, id, fields) of every S-/T-/H-/D-/P- line in printed order, and the BLEU line."""
    lines = [m.groups() for m in map(_RESULT.match, text.splitlines()) if m and m.group(1) != "W"]
    bleu = [line for line in text.splitlines() if line.startswith("Generate test with beam=")]
    return lines, bleu


def _assert_same_output(one, many):
    a, bleu_a = _results(one)
    b, bleu_b = _results(many)
    assert [x[:2] for x in a] == [x[:2] for x in b], "lines or their order differ"
    for (kind, sid, fa), (_, _, fb) in zip(a, b):
        if kind in "HD":  # score \t text: text exact, score to float32 rounding
            sa, ta = fa.split("\t", 1)
            sb, tb = fb.split("\t", 1)
            assert ta == tb, (kind, sid)
            assert float(sa) == pytest.approx(float(sb), abs=1e-5), (kind, sid)
        elif kind == "P":
            assert [float(x) for x in fa.split()] == pytest.approx([float(x) for x in fb.split()], abs=2e-4)
        else:
            assert fa == fb, (kind, sid)
    assert bleu_a == bleu_b
    return a


@pytest.fixture(scope="module")
def seven(tmp_path_factory):
    return _subset(tmp_path_factory.mktemp("seven"), range(7))


@pytest.mark.parametrize("batch,gating", [("3", "dynamic"), ("2", "static")])
def test_generate_two_ranks_equals_one_process(seven, tmp_path, batch, gating):
    """7 sentences (not divisible by 2). --batch-size 3: batches of 3, 3, 1, so rank 1 translates one batch and then
    gets fairseq's empty padding batch while rank 0's second beam search still runs (it serves rank 0's MoE
    layers). --batch-size 2 with static gating at capacity fraction 1.0 (nothing dropped, so the capacity
    taken from the largest batch over the ranks cannot change a result)."""
    extra = ["--batch-size", batch, "--moe-gating", gating, "--moe-eval-capacity-token-fraction", "1.0"]
    one = _one("generate", _generate_args(seven, extra + ["--moe-stats-json", str(tmp_path / "one.json")]))
    outs = _ranks("generate", _generate_args(seven, extra + ["--moe-stats-json", str(tmp_path / "ep.json")]), 2)
    lines = _assert_same_output(one, outs[0])
    assert sorted(int(sid) for kind, sid, _ in lines if kind == "H") == list(range(7))
    assert _results(outs[1]) == ([], [])  # printed once
    assert "BLEU4 = " in one
    # the zero-token forwards of a rank that waits leave its MoE counters alone: the ranks' tokens add up
    ref = json.loads((tmp_path / "one.json").read_text())
    ranks = [json.loads((tmp_path / name).read_text()) for name in ("ep.json", "ep.json.rank1")]
    for key in ("tokens", "routed"):
        assert sum(r[key] for r in ranks) == ref[key], key
    assert ranks[0]["dropped"] == ranks[1]["dropped"] == ref["dropped"] == 0
    _assert_all_ranks_gpu_load(ref, ranks)


def _assert_all_ranks_gpu_load(ref, ranks):
    """Every rank's summary has the per-GPU load of all ranks (collected before the process group went,
    not this rank's only), equal to the one-process run's tokens per expert summed per GPU (contiguous
    placement: GPU g holds experts g*E/W .. (g+1)*E/W - 1)."""
    world = len(ranks)
    for name, layer in ref["layers"].items():
        counts, per = layer["expert_counts"], len(layer["expert_counts"]) // world
        expected = [sum(counts[g * per:(g + 1) * per]) for g in range(world)]
        for r in ranks:
            load = r["layers"][name]["gpu_load"]
            assert load["all_ranks"] and load["tokens_per_gpu"] == expected, (name, r.get("rank"), load)


def test_generate_one_sentence_on_two_ranks(tmp_path):
    """A one-sentence set: rank 1 has no batch at all (fairseq's generate would divide by its zero time)."""
    data = _subset(tmp_path / "one", [5])
    extra = ["--batch-size", "4", "--moe-gating", "dynamic", "--results-path", str(tmp_path / "res")]
    one = _one("generate", _generate_args(data, extra[:-2] + ["--moe-stats-json", str(tmp_path / "one.json")]))
    _ranks("generate", _generate_args(data, extra + ["--moe-stats-json", str(tmp_path / "ep.json")]), 2)
    printed = (tmp_path / "res" / "generate-test.txt").read_text()  # --results-path: rank 0 writes the merged file
    lines = _assert_same_output(one, printed)
    assert [kind for kind, _, _ in lines] == ["S", "T", "H", "D", "P"]
    # rank 1 only served rank 0's tokens: it writes its summary too (it wrote none before), 0 tokens of its own
    ref = json.loads((tmp_path / "one.json").read_text())
    ranks = [json.loads((tmp_path / name).read_text()) for name in ("ep.json", "ep.json.rank1")]
    assert ranks[1]["tokens"] == ranks[1]["routed"] == 0 and ranks[1]["rank"] == 1 and ranks[1]["complete"]
    assert [r["tokens"] for r in ranks] == [ref["tokens"], 0] and ranks[0]["routed"] == ref["routed"]
    _assert_all_ranks_gpu_load(ref, ranks)


@pytest.mark.slow
def test_generate_four_ranks_equals_one_process(seven):
    """4 ranks, 7 batches of one sentence: ranks 0-2 translate two each, rank 3 one, then it serves."""
    extra = ["--batch-size", "1", "--moe-gating", "dynamic"]
    one = _one("generate", _generate_args(seven, extra))
    outs = _ranks("generate", _generate_args(seven, extra), 4)
    _assert_same_output(one, outs[0])
    assert all(_results(o) == ([], []) for o in outs[1:])


INPUT = ("<2de> A man is riding a bike.\n<2fr> Two dogs play in the snow.\n"
         "<2de> A group of people standing in front of a big old house with many windows and a red door.\n")


def test_interactive_two_ranks_equals_one_process():
    """Rank 0 reads stdin and broadcasts each buffer (rank 1's stdin, different, is not read), only rank 0 prints."""
    args = [MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", CKPT, "--source-lang", "src",
            "--target-lang", "tgt", "--bpe", "sentencepiece", "--sentencepiece-model", os.path.join(MT, "spm.model"),
            "--beam", "2", "--moe-gating", "dynamic", "--cpu", "--buffer-size", "2", "--batch-size", "2"]
    one = _one("interactive", args, stdin=INPUT)
    port = free_port()
    procs = [subprocess.Popen(tool("interactive") + args + [
        "--distributed-world-size", "2", "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(input=INPUT if r == 0 else "<2cs> Another line.\n", timeout=300)[0] for r, p in enumerate(procs)]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    lines = _assert_same_output(one, outs[0])
    assert [sid for kind, sid, _ in lines if kind == "H"] == ["0", "1", "2"]
    assert _results(outs[1]) == ([], [])


# ----------------------------------------------------------------------------- the lockstep alone

def _layers(world, rank):
    """Two static-gated MoE layers (d=8, f=16, E=4) with seeded weights; rank r of ``world`` keeps its slice
    of the experts."""
    from fairseq_moe_infer.moe import MoELayer

    layers = torch.nn.ModuleList([MoELayer(8, 16, 4, gating="static", eval_capacity_token_fraction=0.25,
                                           second_expert_policy="all") for _ in range(2)]).eval()
    for i, m in enumerate(layers):
        for j, (name, p) in enumerate(sorted(m.named_parameters())):
            expert = getattr(p, "expert", False)
            shape = (p.shape[0] * world,) + tuple(p.shape[1:]) if expert else p.shape
            full = torch.randn(shape, generator=torch.Generator().manual_seed(100 * i + j))
            n = p.shape[0]
            p.data.copy_(full[rank * n:(rank + 1) * n] if expert else full)
    return layers


def _lockstep_worker(rank, init, results):
    import torch.distributed as dist

    from fairseq_moe_infer.expert_parallel_generate import MoELockstep

    dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
    layers = _layers(world=2, rank=rank)
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        if rank == 0:  # three "decoder steps" through both layers; rank 1 has nothing to do
            with MoELockstep([layers]):
                ys, caps = [], []
                for _ in range(3):
                    y = x
                    for m in layers:
                        y = m(y)
                        caps.append(m.last_stats.capacity)
                    ys.append(y)
            MoELockstep([layers]).serve(final=True)  # every rank ends so
            results.put((rank, torch.stack(ys).tolist(), caps))
        else:
            served = MoELockstep([layers]).serve(final=True)
            results.put((rank, served, [m.eval_totals()["tokens"] for m in layers]))
    dist.destroy_process_group()


def test_lockstep_serves_a_busy_rank_without_changing_its_capacity_or_output(tmp_path):
    """Rank 0 runs 3 steps through 2 static-gated MoE layers; rank 1, which has no tokens, serves them with
    zero-token forwards. Rank 0's capacity is one process's ceil(0.25 * 15) = 4 (a dummy batch must not raise
    the max over ranks) and its output equals one process holding all 4 experts; rank 1 counts no tokens."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp_path / 'init'}"
    procs = [ctx.Process(target=_lockstep_worker, args=(r, init, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (a, b)) for r, a, b in (results.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ys, caps = got[0]
    assert caps == [math.ceil(0.25 * 15)] * 6
    served, tokens = got[1]
    assert served == 6 and tokens == [0, 0]

    ref = _layers(world=1, rank=0)
    x = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = x
        for m in ref:
            y = m(y)
    for step in torch.tensor(ys):
        torch.testing.assert_close(step, y, rtol=1e-5, atol=1e-6)



# ----------------------------------------------------------------------------- bounded waits

@pytest.mark.parametrize("how", [signal.SIGSTOP, signal.SIGKILL], ids=["stopped", "killed"])
def test_a_lost_rank_makes_the_other_exit_with_one_line(seven, how, tmp_path):
    """--moe-collective-timeout 6: rank 1 is stopped (or killed) once the model is built; rank 0 must leave its
    collective within the timeout plus the heartbeat check, with one line naming rank 1, exit status 1; what it
    recorded is written, marked incomplete (before: the routing trace and the summary were lost, os._exit skipping
    the atexit writers): the summary with "complete": false, the trace with the calls done and stopped_by
    "lost rank"."""
    stats = tmp_path / "stats.json"
    trace = tmp_path / "routing.npz"
    args = _generate_args(seven, ["--batch-size", "1", "--moe-gating", "dynamic", "--moe-collective-timeout", "6",
                                  "--moe-stats-json", str(stats), "--moe-record-trace", str(trace)])
    port = free_port()
    procs = [subprocess.Popen(tool("generate") + args + [
        "--distributed-world-size", "2", "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for line in procs[0].stderr:  # rank 0 logs this once the model (and the timeout) is set up
            if "expert parallelism over 2 ranks" in line:
                break
        time.sleep(1.0)
        os.kill(procs[1].pid, how)
        start = time.time()
        err = procs[0].communicate(timeout=60)[1]
        elapsed = time.time() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert re.search(r"error: expert-parallel rank 0 of 2: rank 1 stopped taking part", last), err[-2000:]
    assert "Traceback" not in err
    assert elapsed < 6 + 2 * 4 + 10 + 5
    summary = json.loads(stats.read_text())
    assert summary["complete"] is False and summary["rank"] == 0  # (tokens: 0 when it stopped inside the 1st batch)
    assert not (tmp_path / "stats.json.rank1").exists()  # rank 1 was stopped or killed: it wrote nothing
    recorded = read_trace(str(trace), allow_incomplete=True)  # rank 0's file (rank_path keeps the name for rank 0)
    assert not recorded.complete and recorded.stopped_by == "lost rank"


# ----------------------------------------------------------------------------- validation with beam search

@pytest.mark.slow
def test_train_eval_bleu_with_sharded_experts_finishes():
    """fairseq-train --eval-bleu on 2 ranks: validation runs a beam search per batch (max length = source length
    + 1, so batches of different source lengths end at different steps); this hung on both ranks before the
    lockstep. It must finish and log the whole set's BLEU."""
    from .helpers import TINY_MT

    small = ["--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim",
             "128", "--encoder-attention-heads", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
             "--decoder-attention-heads", "2", "--moe-expert-count", "4", "--moe-expert-ffn-dim", "64"]
    args = [TINY_MT, "--task", "moe_translation", "--arch", "transformer_moe_small", "--source-lang", "src",
            "--target-lang", "tgt", "--criterion", "moe_label_smoothed_cross_entropy", "--max-tokens", "1024",
            "--max-update", "1", "--user-dir", USER_DIR, "--optimizer", "adam", "--lr", "3e-3", "--log-format", "simple",
            "--num-workers", "0", "--seed", "3", "--moe-gating", "dynamic", "--cpu", "--no-save", "--eval-bleu",
            "--eval-bleu-args", '{"beam": 2, "max_len_a": 1, "max_len_b": 1}', "--batch-size-valid", "40",
            "--required-batch-size-multiple", "1", "--ddp-backend", "legacy_ddp", "--moe-collective-timeout", "120",
            "--validate-interval", "1"] + small
    outs = _ranks("train", args, 2, timeout=600)
    assert re.search(r"valid on 'valid' subset .*\| bleu [0-9.]+ ", outs[0]), outs[0][-2000:]


# ----------------------------------------------------------------------------- fairseq's own launcher

_SPAWN = ("import runpy, sys, torch; torch.cuda.device_count = lambda: 2; sys.argv[0] = 'fairseq-{0}'; "
          "runpy.run_module('fairseq_cli.{0}', run_name='__main__', alter_sys=True)")


def _spawned(name, args, stdin=None):
    """``python -m fairseq_cli.<name> --distributed-world-size 2`` without ranks given: fairseq spawns the
    workers itself (the parent claims two GPUs so that it does; the workers run on the CPU with gloo)."""
    proc = subprocess.run([sys.executable, "-c", _SPAWN.format(name)] + args + [
        "--distributed-world-size", "2", "--distributed-backend", "gloo"], input=stdin, capture_output=True,
        text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    return text


@pytest.mark.slow
def test_generate_and_interactive_under_fairseqs_launcher(seven, tmp_path):
    """The workers fairseq spawns must find the plugin's worker (pickled by name), and interactive's rank 0,
    whose stdin multiprocessing replaced by /dev/null, must read its launcher's stdin."""
    extra = ["--batch-size", "3", "--moe-gating", "dynamic"]
    stats = [f"--moe-stats-json={tmp_path / name}" for name in ("one.json", "ep.json")]
    _assert_same_output(_one("generate", _generate_args(seven, extra + stats[:1])),
                        _spawned("generate", _generate_args(seven, extra + stats[1:])))
    ranks = [json.loads((tmp_path / name).read_text()) for name in ("ep.json", "ep.json.rank1")]
    _assert_all_ranks_gpu_load(json.loads((tmp_path / "one.json").read_text()), ranks)  # spawned workers too
    args = [MT, "--user-dir", USER_DIR, "--task", "moe_translation", "--path", CKPT, "--source-lang", "src",
            "--target-lang", "tgt", "--bpe", "sentencepiece", "--sentencepiece-model", os.path.join(MT, "spm.model"),
            "--beam", "2", "--moe-gating", "dynamic", "--cpu", "--buffer-size", "2", "--batch-size", "2"]
    lines = _assert_same_output(_one("interactive", args, stdin=INPUT), _spawned("interactive", args, stdin=INPUT))
    assert [sid for kind, sid, _ in lines if kind == "H"] == ["0", "1", "2"]
