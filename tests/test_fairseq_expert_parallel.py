"""Expert-parallel training under fairseq's own launcher equals single-process training.

Two ``fairseq-train`` processes (``--distributed-world-size 2``, gloo, CPU) each hold
half of the experts. fairseq hands rank r the batches r, r + 2, ...; one process
with ``--update-freq 2`` sees the same two batches per update. With dropout off,
deterministic top-2 routing, dynamic gating (nothing dropped) and plain SGD (so a
wrongly scaled expert gradient shows at full size), both runs must end with the
same weights, and the 2-process checkpoint must hold all experts.
"""

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from fairseq_moe_infer.moe import is_expert_key
from fairseq_moe_infer.training import check_training_setup

from .helpers import TINY_LM, USER_DIR, free_port, ok, tool

ARGS = [TINY_LM, "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--arch", "transformer_lm_moe_small",
        "--criterion", "moe_cross_entropy", "--tokens-per-sample", "64", "--max-tokens", "512", "--max-update", "6",
        "--decoder-layers", "2", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
        "--decoder-attention-heads", "2", "--moe-expert-count", "4", "--moe-expert-ffn-dim", "64",
        "--optimizer", "sgd", "--lr", "0.5", "--log-format", "simple", "--log-interval", "1",
        "--no-epoch-checkpoints", "--num-workers", "0", "--seed", "3", "--moe-gating-use-fp32", "--cpu",
        "--moe-gating", "dynamic", "--dropout", "0", "--moe-second-expert-policy", "all", "--disable-validation"]



def _model(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_two_process_expert_parallel_training_equals_one_process(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            tool("train") + [str(a) for a in ARGS] + [
                "--save-dir", str(tmp_path / "two"), "--distributed-world-size", "2", "--distributed-rank", str(r),
                "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--device-id", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    one = subprocess.run(tool("train") + [str(a) for a in ARGS] + ["--save-dir", str(tmp_path / "one"),
                                                                    "--update-freq", "2"],
                         capture_output=True, text=True, timeout=600)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    ok(one)
    assert "expert parallelism over 2 ranks" in outs[0]

    ref = _model(tmp_path / "one" / "checkpoint_last.pt")
    got = _model(tmp_path / "two" / "checkpoint_last.pt")
    assert set(got) == set(ref)
    expert_keys = [k for k in ref if is_expert_key(k)]
    assert expert_keys and all(got[k].shape[0] == 4 for k in expert_keys)  # all 4 experts, not rank 0's 2
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=0, atol=2e-5, msg=k)


def _train_two(tmp_path, port, extra):
    procs = [
        subprocess.Popen(
            tool("train") + [str(a) for a in ARGS] + [
                "--save-dir", str(tmp_path / "two"), "--distributed-world-size", "2", "--distributed-rank", str(r),
                "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn",
                "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp", "--device-id", "0"] + extra,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


def test_resume_without_optimizer_state_keeps_the_update_count(tmp_path):
    """A checkpoint without optimizer state (``--no-save-optimizer-state``; expert-parallel checkpoints of
    earlier versions) written by 2 ranks and resumed by ONE process must continue at its update with its
    learning-rate schedule (fairseq alone restarts at 0: '@ 0 updates', warm-up again, the full --max-update)."""
    _train_two(tmp_path, free_port(), ["--no-save-optimizer-state"])
    one = ok(subprocess.run(tool("train") + [str(a) for a in ARGS] + [
        "--save-dir", str(tmp_path / "two"), "--max-update", "8", "--update-freq", "2"],
        capture_output=True, text=True, timeout=600))
    # (fairseq's own 'Loaded checkpoint ... @ 0 updates' line comes before the count is restored)
    assert "resumed training at update 6 from a checkpoint without optimizer state" in one
    assert re.search(r"num_updates=7\b", one) and not re.search(r"num_updates=1\b", one)
    state = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 8


# Resume across world sizes, compared with an UNINTERRUPTED run. fairseq builds an epoch's batches from an index order
# seeded with the epoch the run (re)started in (fairseq_task.get_batch_iterator: numpy_seed(seed + epoch)) and keeps them
# for later epochs, so in general a resumed run batches its later epochs differently from an uninterrupted one (also on one
# process, without MoE). Here they cannot differ: the 'valid' split is 3 blocks of 320 tokens (320, 320, 170), each block
# is its own batch (--max-tokens 320) and world size x --update-freq is 4, so every update is the whole epoch (the same 3
# blocks in some order) on every world size, and nothing else depends on how blocks are grouped (one block per forward:
# the balancing loss too). 3 batches on 2 ranks: rank 1's update ends with fairseq's empty padding batch (zero weight); on
# 4 ranks rank 3's update is that batch alone. Adam (moments), an LR warm-up (update count) and --store-ema --ema-fp32.
RESUME_ARGS = [a for a in ARGS if a not in ("--no-epoch-checkpoints",)]
RESUME_ARGS = RESUME_ARGS[: RESUME_ARGS.index("--max-update")] + RESUME_ARGS[RESUME_ARGS.index("--max-update") + 2:]
RESUME_ARGS = [str(a) for a in RESUME_ARGS] + [
    "--train-subset", "valid", "--tokens-per-sample", "320", "--max-tokens", "320", "--optimizer", "adam", "--lr", "3e-3",
    "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "2", "--store-ema", "--ema-fp32", "--ema-decay", "0.5"]


def _launch(save_dir, world, max_epoch, port=None, args=RESUME_ARGS, stop=("--max-epoch",)):
    argv = tool("train") + args + ["--save-dir", str(save_dir), stop[0], str(max_epoch), "--update-freq", str(4 // world)]
    if world == 1:
        return [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    return [subprocess.Popen(argv + [
        "--distributed-world-size", str(world), "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo",
        "--ddp-backend", "legacy_ddp", "--device-id", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)]


def _finish(procs):
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs[0]


def _assert_same_training_state(got, ref, label):
    assert got["optimizer_history"][-1]["num_updates"] == ref["optimizer_history"][-1]["num_updates"], label
    for part in ("model", "ema", "ema_fp32_params"):
        a = got["model"] if part == "model" else got["extra_state"][part]
        b = ref["model"] if part == "model" else ref["extra_state"][part]
        assert set(a) == set(b), (label, part)
        # attention key biases get a gradient that is zero but for rounding (softmax ignores them), which Adam
        # turns into steps of +-lr: they differ by summation order alone
        for k in (k for k in b if not k.endswith("self_attn.k_proj.bias")):
            torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=2e-5, msg=f"{label} {part} {k}")
    sa, sb = got["last_optimizer_state"]["state"], ref["last_optimizer_state"]["state"]
    assert set(sa) == set(sb), label
    for i in sb:
        for name, v in sb[i].items():
            if torch.is_tensor(v) and v.dim():
                torch.testing.assert_close(sa[i][name].float(), v.float(), rtol=0, atol=2e-5, msg=f"{label} adam {i} {name}")


@pytest.mark.slow
def test_resume_on_other_world_sizes_equals_an_uninterrupted_run(tmp_path):
    """Train 1 epoch (1 update) on 1 or 2 gloo ranks, resume for 2 more epochs 1->1, 1->2, 2->1 and 2->4 (experts, their
    Adam moments and their fp32 EMA copy sliced or gathered): each ends where an uninterrupted 3-epoch run on 2 ranks
    ends, and that run where one on one process ends: weights, EMA (fp32 copy included), Adam moments, update count.
    Before: 1->2 crashed at the first step (moments of all experts), 2->1 restarted at update 0 and crashed in fairseq's
    ema.py, 2->4 gave ranks the wrong fp32 EMA experts and fresh moments; and every 2-rank update differed (fairseq
    dropped the sample size of rank 1's real batch because its update ended with a padding batch)."""
    first = {"one": _launch(tmp_path / "one", 1, 1), "two": _launch(tmp_path / "two", 2, 1, free_port())}
    runs = {"uninterrupted_1": _launch(tmp_path / "uninterrupted_1", 1, 3),
            "uninterrupted_2": _launch(tmp_path / "uninterrupted_2", 2, 3, free_port())}
    for procs in first.values():
        _finish(procs)
    resumes = {"one_to_one": ("one", 1), "one_to_two": ("one", 2), "two_to_one": ("two", 1), "two_to_four": ("two", 4)}
    for name, (src, world) in resumes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint_last.pt").write_bytes((tmp_path / src / "checkpoint_last.pt").read_bytes())
        runs[name] = _launch(tmp_path / name, world, 3, free_port() if world > 1 else None)
    outs = {name: _finish(procs) for name, procs in runs.items()}

    def state(name):
        return torch.load(tmp_path / name / "checkpoint_last.pt", map_location="cpu", weights_only=False)

    reference = state("uninterrupted_2")
    assert reference["optimizer_history"][-1]["num_updates"] == 3
    _assert_same_training_state(state("uninterrupted_1"), reference, "uninterrupted on 1 process")
    for name in resumes:
        assert "@ 1 updates" in outs[name] and "@ 0 updates" not in outs[name], (name, outs[name][-3000:])
        _assert_same_training_state(state(name), reference, name)


# Inside an epoch: 13 blocks of 64 tokens in 7 batches of up to 2 blocks, world size x --update-freq 4: 2 updates per
# epoch (batches 0-3, then 4-6). A run stopped after update 1 (--max-update 1) saves a checkpoint inside epoch 1, which
# fairseq resumes on the batches of the same epoch (built with the same seed): the resumed run must end where the
# uninterrupted one ends.
MID_EPOCH_ARGS = RESUME_ARGS + ["--tokens-per-sample", "64", "--max-tokens", "128", "--max-epoch", "1"]


@pytest.mark.slow
def test_resume_inside_an_epoch_on_other_world_sizes_equals_an_uninterrupted_run(tmp_path):
    """Saved inside epoch 1 on 2 ranks (2 batches done on each: the epoch's first 4), resumed on 1 process and on 4
    ranks: each rank skips 4 / M batches and the run ends where an uninterrupted 1-process run ends (weights, EMA,
    Adam moments, update count). Before: fairseq skipped 2 batches on each rank whatever the world size (on 1 process
    batches 2 and 3 were trained twice and 6 never; on 4 ranks 'dataloader mismatch')."""
    runs = {"uninterrupted": _launch(tmp_path / "uninterrupted", 1, 2, args=MID_EPOCH_ARGS, stop=("--max-update",)),
            "two": _launch(tmp_path / "two", 2, 1, free_port(), args=MID_EPOCH_ARGS, stop=("--max-update",))}
    _finish(runs.pop("two"))
    for name, world in (("two_to_one", 1), ("two_to_four", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "checkpoint_last.pt").write_bytes((tmp_path / "two" / "checkpoint_last.pt").read_bytes())
        runs[name] = _launch(tmp_path / name, world, 2, free_port() if world > 1 else None, args=MID_EPOCH_ARGS,
                             stop=("--max-update",))
    outs = {name: _finish(procs) for name, procs in runs.items()}
    reference = torch.load(tmp_path / "uninterrupted" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert reference["optimizer_history"][-1]["num_updates"] == 2
    for name, world in (("two_to_one", 1), ("two_to_four", 4)):
        assert f"resuming inside epoch 1 on {world} ranks (saved on 2): each rank skips {4 // world} batches" in outs[name]
        got = torch.load(tmp_path / name / "checkpoint_last.pt", map_location="cpu", weights_only=False)
        _assert_same_training_state(got, reference, name)


def test_resume_inside_an_epoch_on_a_world_size_not_dividing_the_batches_done_stops_with_one_line():
    """Hand-made: saved after 3 batches on each of 2 ranks (the epoch's first 6); 4 ranks cannot split 6."""
    import fairseq_moe_infer.training as training

    def trainer(world, reset=False):
        return types.SimpleNamespace(data_parallel_world_size=world,
                                     cfg=types.SimpleNamespace(checkpoint=types.SimpleNamespace(reset_dataloader=reset)))

    def saved(n, world=2):
        return lambda trainer, filename: {"train_iterator": {"epoch": 3, "iterations_in_epoch": n, "shuffle": True},
                                          training.SAVED_WORLD_SIZE_KEY: world}

    assert training.trainer_load_checkpoint(saved(3), trainer(1), "c.pt")["train_iterator"]["iterations_in_epoch"] == 6
    assert training.trainer_load_checkpoint(saved(3), trainer(3), "c.pt")["train_iterator"]["iterations_in_epoch"] == 2
    assert training.trainer_load_checkpoint(saved(3), trainer(2), "c.pt")["train_iterator"]["iterations_in_epoch"] == 3
    assert training.trainer_load_checkpoint(saved(3), trainer(4, reset=True), "c.pt")["train_iterator"][
        "iterations_in_epoch"] == 3  # --reset-dataloader: fairseq ignores the position
    with pytest.raises(SystemExit, match=r"c.pt was saved inside epoch 3 after 6 batches \(3 on each of 2 ranks\); 4 ranks "
                                         r"cannot resume exactly there: resume on a world size dividing 6"):
        training.trainer_load_checkpoint(saved(3), trainer(4), "c.pt")


def test_expert_parallel_ema_copy_is_saved_with_all_experts(tmp_path):
    """--store-ema deep-copies the model (the MoE layers' process group must survive the copy)
    and saves the copy: it must hold every rank's experts too."""
    _train_two(tmp_path, free_port(), ["--store-ema", "--ema-decay", "0.9"])
    state = torch.load(tmp_path / "two" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    ema, model = state["extra_state"]["ema"], state["model"]
    for k in (k for k in model if is_expert_key(k)):
        assert ema[k].shape == model[k].shape and ema[k].shape[0] == 4
        assert not torch.equal(ema[k][2:], ema[k][:2])  # rank 1's experts, not rank 0's twice


def test_training_setup_checks_exit_with_one_line(monkeypatch):
    import fairseq_moe_infer.training as training

    monkeypatch.setattr(training, "expert_parallel_world", lambda model: 2)
    flattened_fp16 = types.SimpleNamespace(fp32_params={0: torch.zeros(3)})
    with pytest.raises(SystemExit, match="--fp16-no-flatten-grads"):
        check_training_setup(torch.nn.Linear(2, 2), flattened_fp16)
    check_training_setup(torch.nn.Linear(2, 2), types.SimpleNamespace(fp32_params=[torch.zeros(3)]))  # no-flatten: fine


def _eval_lm(tmp_path, name, gating, world, port=None, extra=()):
    from .helpers import ASSETS

    args = list(extra) + [os.path.join(ASSETS, "lm"), "--path", os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt"),
            "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--gen-subset", "test1",
            "--tokens-per-sample", "256", "--max-tokens", "2560", "--cpu", "--moe-gating", gating,
            "--moe-eval-capacity-token-fraction", "1.0", "--moe-stats-json", str(tmp_path / f"{name}.json")]
    if world == 1:
        return [subprocess.Popen(tool("eval-lm") + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    return [subprocess.Popen(tool("eval-lm") + args + [
        "--distributed-world-size", str(world), "--distributed-rank", str(r), "--distributed-init-method",
        f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo", "--device-id", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def test_two_process_expert_parallel_eval_lm_equals_one_process(tmp_path):
    """fairseq-eval-lm with the bundled LM's 16 experts over 2 gloo ranks: 63 blocks in batches of 10 give 7
    batches, so one rank gets fairseq's empty padding batch (a dummy forward keeps the all-to-alls matched);
    the perplexity fairseq prints is that of all tokens, equal to one process's."""
    runs = {"one": _eval_lm(tmp_path, "one", "dynamic", 1), "dynamic": _eval_lm(tmp_path, "dyn", "dynamic", 2, free_port()),
            "static": _eval_lm(tmp_path, "static", "static", 2, free_port())}
    outs = {}
    for name, procs in runs.items():
        texts = [p.communicate(timeout=600)[0] for p in procs]
        for p, text in zip(procs, texts):
            assert p.returncode == 0, text[-3000:]
        outs[name] = texts[0]
    ppl = {name: float(re.search(r"Perplexity: ([0-9.]+)", text).group(1)) for name, text in outs.items()}
    assert ppl["dynamic"] == ppl["one"] == ppl["static"], ppl
    assert re.search(r"expert parallel: this rank's loss .* all ranks .* on 15,922 tokens", outs["dynamic"])
    one = json.loads((tmp_path / "one.json").read_text())
    rank0 = json.loads((tmp_path / "dyn.json").read_text())
    assert one["tokens"] == 15922 and 0 < rank0["tokens"] < 15922  # rank 0's share, no dummy tokens counted
    # scripts/evaluate.py sums the ranks' files: the whole set's routed choices and tokens per expert
    merged = _evaluate_script().moe_brief(str(tmp_path / "dyn.json"))
    assert merged["moe_routed"] == one["routed"] and merged["ranks"] == 2 and "ranks_missing" not in merged
    assert merged["tokens_per_expert"] == {k: v["expert_counts"] for k, v in one["layers"].items()}


def test_expert_parallel_eval_lm_refuses_context_window(tmp_path):
    """Over 2 ranks each rank would take its --context-window context from its own previous batch (ppl 27.07
    instead of one process's 27.05 on the bundled LM), and the rank with fairseq's empty padding batch crashed
    with KeyError 'net_input': refused with one line on every rank instead."""
    procs = _eval_lm(tmp_path, "cw", "dynamic", 2, free_port(), ["--context-window", "32"])
    for p in procs:
        text = p.communicate(timeout=600)[0]
        assert p.returncode != 0 and "Traceback" not in text, text[-3000:]
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        assert "--context-window with 2 ranks" in last and "one process" in last, last


def _evaluate_script():
    from .test_evaluate_script import _evaluate_module

    return _evaluate_module()


_SPAWN_AS_PYTHON_M = (
    "import runpy, sys, torch; torch.cuda.device_count = lambda: 2; sys.argv[0] = 'fairseq-eval-lm'; "
    "runpy.run_module('fairseq_cli.eval_lm', run_name='__main__', alter_sys=True)"
)


def test_eval_lm_workers_spawned_by_fairseq_from_python_m(tmp_path):
    """``python -m fairseq_cli.eval_lm --distributed-world-size 2`` without ranks given: fairseq spawns the
    workers itself and multiprocessing re-runs the module in each, copying its globals into a new module.
    The hook must reach that copy's ``main`` too, else the ranks' 4 + 3 batches (one empty) hang in an
    all-to-all and each rank prints its own perplexity (seen on 2 H200s). The parent here claims two
    GPUs so that fairseq spawns; the workers run on the CPU with gloo."""
    from .helpers import ASSETS

    args = [os.path.join(ASSETS, "lm"), "--path", os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt"),
            "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--gen-subset", "test1",
            "--tokens-per-sample", "256", "--max-tokens", "2560", "--cpu", "--moe-gating", "dynamic",
            "--distributed-world-size", "2", "--distributed-backend", "gloo"]
    proc = subprocess.Popen([sys.executable, "-c", _SPAWN_AS_PYTHON_M] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        text = proc.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail("spawned expert-parallel eval-lm hung (ranks' all-to-alls unmatched)")
    assert proc.returncode == 0, text[-3000:]
    one = _eval_lm(tmp_path, "one", "dynamic", 1)[0].communicate(timeout=600)[0]
    loss, ppl = re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", one).groups()
    assert re.search(rf"all ranks {loss} on 15,922 tokens", text), text[-3000:]
    assert f"Perplexity: {ppl}" in text


def test_non_finite_expert_gradients_skip_the_update_or_stop(monkeypatch):
    from fairseq.optim.dynamic_loss_scaler import DynamicLossScaler

    import fairseq_moe_infer.training as training

    monkeypatch.setattr(training, "expert_parallel_world", lambda model: 2)
    model = torch.nn.Linear(3, 3)
    model.weight.expert = True
    model.weight.grad = torch.zeros(3, 3)
    model.bias.grad = torch.full((3,), float("inf"))  # a shared parameter: fairseq's own norm check sees it
    training.check_expert_grads_finite(model, types.SimpleNamespace(scaler=None))  # experts finite: nothing
    model.weight.grad[1, 2] = float("nan")
    scaler = DynamicLossScaler(init_scale=128.0)
    with pytest.raises(OverflowError):
        training.check_expert_grads_finite(model, types.SimpleNamespace(scaler=scaler))
    assert scaler.loss_scale == 64.0
    with pytest.raises(FloatingPointError):
        training.check_expert_grads_finite(model, types.SimpleNamespace(scaler=None))


def test_padding_batches_move_to_the_front_of_an_update_and_weigh_nothing():
    """fairseq's ``Trainer.train_step`` zeroes a rank's summed sample size when its update ENDS with a padding batch
    (``{}``): the wrap hands the padding batches first, the moe_* tasks give them sample size 0 and zeroed logs.
    (The end-to-end effect: test_resume_on_other_world_sizes_equals_an_uninterrupted_run, marked slow.)"""
    import fairseq_moe_infer.training as training

    moe_task = types.SimpleNamespace(task=types.SimpleNamespace(weightless_dummy_batches=True))
    other_task = types.SimpleNamespace(task=types.SimpleNamespace())
    real_a, real_b = {"id": torch.tensor([0])}, {"id": torch.tensor([1])}
    handed = lambda trainer, samples, raise_oom: samples  # noqa: E731 (what fairseq's train_step would receive)
    assert training.train_step(handed, moe_task, [real_a, {}]) == [{}, real_a]
    assert training.train_step(handed, moe_task, [real_a, None, real_b, {}]) == [None, {}, real_a, real_b]
    assert training.train_step(handed, moe_task, [{}, {}]) == [{}, {}]  # padding only: fairseq's own handling
    assert training.train_step(handed, other_task, [real_a, {}]) == [real_a, {}]  # a task whose dummies weigh something
    size, log = training.weightless_dummy_batch(640, {"loss": torch.tensor(3.5), "ntokens": 320, "nsentences": 1,
                                                     "sample_size": 320, "moe_routed": torch.tensor(640), "note": "x"})
    assert size == 0 and log["ntokens"] == log["nsentences"] == log["sample_size"] == 0 and log["note"] == "x"
    assert log["loss"].item() == 0 and log["moe_routed"].item() == 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "eval-lm"])
def test_a_stopped_rank_makes_the_other_exit_with_one_line(tmp_path, name):
    """--moe-collective-timeout 6 under fairseq-train and fairseq-eval-lm (fairseq-generate: tests/
    test_expert_parallel_generate.py, stopped and killed): rank 1 is stopped (SIGSTOP) once the model is built; rank 0
    must leave its collective within the timeout plus the heartbeat check, with one last line naming rank 1."""
    import signal
    import time

    from .helpers import ASSETS

    if name == "train":
        args = [str(a) for a in ARGS] + ["--max-update", "100000", "--save-dir", str(tmp_path), "--no-save",
                                         "--ddp-backend", "legacy_ddp"]
    else:
        args = [os.path.join(ASSETS, "lm"), "--path", os.path.join(ASSETS, "checkpoints", "lm_moe", "checkpoint.pt"),
                "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--gen-subset", "test",
                "--tokens-per-sample", "64", "--max-tokens", "64", "--cpu", "--moe-gating", "dynamic"]
    port = free_port()
    procs = [subprocess.Popen(tool(name) + args + [
        "--moe-collective-timeout", "6", "--distributed-world-size", "2", "--distributed-rank", str(r),
        "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-no-spawn", "--distributed-backend", "gloo",
        "--device-id", "0"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)]
    seen = []
    try:
        for line in procs[0].stdout:  # rank 0 logs this once the model (and the timeout) is set up
            seen.append(line)
            if "expert parallelism over 2 ranks" in line:
                break
        time.sleep(2.0)
        os.kill(procs[1].pid, signal.SIGSTOP)
        start = time.time()
        out = procs[0].communicate(timeout=90)[0]
        elapsed = time.time() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, (seen + [out])[-30:]
    last = out.strip().splitlines()[-1]
    assert re.search(r"error: expert-parallel rank 0 of 2: rank 1 stopped taking part", last), out[-3000:]
    assert "Traceback" not in out
    assert elapsed < 6 + 2 * 4 + 10


_HEARTBEAT_AT_EXIT = """
import atexit, sys, threading
import torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
# registered before the plugin's own handler, so it runs after it (atexit is last-in, first-out)
atexit.register(lambda: print("heartbeat alive at exit:", any(t.name == "moe-heartbeat" and t.is_alive()
                                                                for t in threading.enumerate()), flush=True))
from fairseq_moe_infer import bounded_waits
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
bounded_waits.bound_collective_waits(0)
dist.barrier()
"""


def test_the_heartbeat_thread_is_stopped_before_interpreter_exit():
    """``fairseq-train`` has no end-of-run hook, so the heartbeat thread of ``--moe-collective-timeout`` must be
    stopped by an ``atexit`` handler: left running, a beat caught inside the store's C++ call while the interpreter
    finalized aborted the process after a correct run ("terminate called without an active exception", status -6;
    it failed CI once, and 2 of 12 two-rank fairseq-train processes with a 0.2 ms beat)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _HEARTBEAT_AT_EXIT, str(r), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert "heartbeat alive at exit: False" in out, out[-3000:]
