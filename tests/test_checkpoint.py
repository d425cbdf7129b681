"""Serving checkpoints: expert shards, tied weights, torch's weights-only allow-list."""

import argparse
import math
import os
import re
import shutil

import pytest
import torch
from fairseq import checkpoint_utils

from fairseq_moe_infer.checkpoint import SHARDS_KEY, export_checkpoint
from fairseq_moe_infer.moe import moe_layers

from .helpers import ASSETS

LM = os.path.join(ASSETS, "checkpoints", "lm_moe")
DATA = {"data": os.path.join(ASSETS, "lm")}  # the checkpoints name the data directory they were trained on


def test_shards_merge_into_full_expert_stacks():
    state = checkpoint_utils.load_checkpoint_to_cpu(os.path.join(LM, "checkpoint.pt"))
    key = "decoder.layers.1.moe_layer.experts.fc1_weight"
    parts = [torch.load(os.path.join(LM, f"checkpoint.experts-{i}-of-2.pt"), weights_only=True)["model"][key] for i in (0, 1)]
    assert state["model"][key].shape == (16, 256, 256)
    assert torch.equal(state["model"][key], torch.cat(parts))
    assert SHARDS_KEY not in state
    assert state["model"][key].dtype == torch.float16


def test_missing_or_corrupt_shard_gives_clear_error(tmp_path):
    for f in os.listdir(LM):
        shutil.copy(os.path.join(LM, f), tmp_path / f)
    (tmp_path / "checkpoint.experts-1-of-2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="keep all 2 shard files"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint.pt"))
    shard = torch.load(os.path.join(LM, "checkpoint.experts-0-of-2.pt"), weights_only=True)
    shard["model"].pop("decoder.layers.1.moe_layer.experts.fc1_weight")
    torch.save(shard, tmp_path / "checkpoint.experts-1-of-2.pt")
    with pytest.raises(RuntimeError, match="shards are corrupt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint.pt"))
    (tmp_path / "checkpoint.experts-1-of-2.pt").write_bytes(b"not a checkpoint")  # truncated / foreign file
    with pytest.raises(RuntimeError, match=r"cannot read expert shard .*checkpoint.experts-1-of-2.pt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint.pt"))


def test_export_averages_dedupes_tied_weights_and_shards(tmp_path):
    emb = torch.randn(10, 4)
    experts = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)
    for i, scale in enumerate((1.0, 3.0)):
        torch.save({"model": {"decoder.embed_tokens.weight": emb * scale, "decoder.output_projection.weight": emb * scale,
                              "decoder.layers.1.moe_layer.experts.fc1_weight": experts * scale},
                    "cfg": {"model": None}, "optimizer_history": [{"num_updates": i, "best_loss": 1.0}],
                    "last_optimizer_state": {"big": torch.zeros(100)}}, tmp_path / f"c{i}.pt")
    written = export_checkpoint([str(tmp_path / "c0.pt"), str(tmp_path / "c1.pt")], str(tmp_path / "out.pt"), 2)
    assert [os.path.basename(w) for w in written] == ["out.pt", "out.experts-0-of-2.pt", "out.experts-1-of-2.pt"]
    main = torch.load(tmp_path / "out.pt", weights_only=True)
    assert "last_optimizer_state" not in main
    m = main["model"]
    torch.testing.assert_close(m["decoder.embed_tokens.weight"].float(), (emb * 2).half().float())
    assert m["decoder.embed_tokens.weight"].data_ptr() == m["decoder.output_projection.weight"].data_ptr()
    shard1 = torch.load(tmp_path / "out.experts-1-of-2.pt", weights_only=True)["model"]
    torch.testing.assert_close(shard1["decoder.layers.1.moe_layer.experts.fc1_weight"].float(), (experts[2:] * 2).half().float())
    with pytest.raises(ValueError, match="3 shards do not divide the 4 experts"):
        export_checkpoint([str(tmp_path / "c0.pt")], str(tmp_path / "bad.pt"), 3)


class NotAllowed:
    pass


def test_allow_list_is_narrow(tmp_path):
    torch.save({"args": argparse.Namespace(a=1)}, tmp_path / "ok.pt")
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["args"].a == 1
    torch.save({"x": NotAllowed()}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "bad.pt", weights_only=True)


def _branch_layout(tmp_path, ranks=2):
    """The bundled LM written the way fairseq's MoE branch saves: -shared.pt + -rank-<r>.pt, one module per expert."""
    main = torch.load(os.path.join(LM, "checkpoint.pt"), weights_only=True)
    shards = [torch.load(os.path.join(LM, f"checkpoint.experts-{i}-of-2.pt"), weights_only=True)["model"] for i in (0, 1)]
    stacks = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
    cfg = main["cfg"]
    cfg["model"].update(_name="transformer_lm", arch="transformer_lm_gpt")
    cfg["task"]["_name"] = "language_modeling"
    torch.save({"model": main["model"], "cfg": cfg, "optimizer_history": main["optimizer_history"]},
               tmp_path / "model-shared.pt")
    for r in range(ranks):
        rank_state = {}
        for key, stack in stacks.items():
            prefix, name = key.rsplit(".", 1)  # ...moe_layer.experts, fc1_weight
            fc, kind = name.split("_")
            for i, t in enumerate(stack.chunk(ranks)[r]):
                rank_state[f"{prefix}.{i}.{fc}.{kind}"] = t.clone()
        torch.save({"model": rank_state}, tmp_path / f"model-rank-{r}.pt")
    return stacks


@pytest.mark.parametrize("ranks", [2, 4])
def test_convert_fairseq_moe_branch_checkpoint(tmp_path, ranks):
    from fairseq_moe_infer.checkpoint import convert_fairseq_moe_branch

    stacks = _branch_layout(tmp_path, ranks)
    (tmp_path / "out").mkdir()
    convert_fairseq_moe_branch(str(tmp_path / "model-shared.pt"), str(tmp_path / "out" / "checkpoint.pt"), 2)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "out" / "checkpoint.pt"))
    for key, stack in stacks.items():
        assert torch.equal(state["model"][key], stack), key  # experts renumbered rank-major, stacked
    assert state["cfg"]["model"]["_name"] == "transformer_lm_moe" and state["cfg"]["task"]["_name"] == "moe_language_modeling"
    assert state["cfg"]["model"]["moe_expert_count"] == 16
    # the branch's settings are carried: its default routes padding; capacity factor 1.0 = its 2 * ceil(T / E)
    assert state["cfg"]["model"]["use_moe_pad_mask"] is False and state["cfg"]["model"]["moe_capacity_factor"] == 1.0
    assert state["extra_state"]["fairseq_moe_branch"]["use_moe_pad_mask"] is False
    models, _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "out" / "checkpoint.pt")], arg_overrides=DATA)
    assert all(m.route_padding for m in moe_layers(models[0]))
    ref, _ = checkpoint_utils.load_model_ensemble([os.path.join(LM, "checkpoint.pt")], arg_overrides=DATA)
    tokens = torch.randint(4, 8000, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = models[0].float().eval()(tokens)[0]
        expected = ref[0].float().eval()(tokens)[0]
    torch.testing.assert_close(out, expected)


def test_convert_carries_the_branch_pad_mask_and_eval_capacity(tmp_path):
    from fairseq_moe_infer.checkpoint import branch_eval_args, convert_fairseq_moe_branch

    _branch_layout(tmp_path, 2)
    shared = torch.load(tmp_path / "model-shared.pt", weights_only=False)
    shared["cfg"]["model"].update(use_moe_pad_mask=True, moe_eval_capacity_token_fraction=-1.0)
    torch.save(shared, tmp_path / "model-shared.pt")
    convert_fairseq_moe_branch(str(tmp_path / "model-shared.pt"), str(tmp_path / "c.pt"))
    state = checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "c.pt"))
    assert state["cfg"]["model"]["use_moe_pad_mask"] is True
    assert branch_eval_args(state["extra_state"]["fairseq_moe_branch"]) == ["--moe-eval-capacity-token-fraction", "0.0"]
    models, _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "c.pt")], arg_overrides=DATA)
    assert not any(m.route_padding for m in moe_layers(models[0]))
    # this plugin's own checkpoints: masked
    own, _ = checkpoint_utils.load_model_ensemble([os.path.join(LM, "checkpoint.pt")], arg_overrides=DATA)
    assert not any(m.route_padding for m in moe_layers(own[0]))


def test_convert_refuses_missing_rank_files(tmp_path):
    from fairseq_moe_infer.checkpoint import convert_fairseq_moe_branch

    _branch_layout(tmp_path, 2)
    (tmp_path / "model-rank-0.pt").unlink()
    with pytest.raises(ValueError, match="a rank file is missing"):
        convert_fairseq_moe_branch(str(tmp_path / "model-shared.pt"), str(tmp_path / "c.pt"))
    for f in tmp_path.glob("model-rank-*.pt"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="keep every rank's expert file"):
        convert_fairseq_moe_branch(str(tmp_path / "model-shared.pt"), str(tmp_path / "c.pt"))


def _strings(node, where=""):
    """(location, value) of every string in a checkpoint's non-tensor entries."""
    if isinstance(node, argparse.Namespace):
        node = vars(node)
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(node, str):
        yield where, node


@pytest.mark.parametrize("name", ["lm_moe", "mt_moe"])
def test_bundled_checkpoints_hold_no_machine_paths(name):
    state = torch.load(os.path.join(ASSETS, "checkpoints", name, "checkpoint.pt"), weights_only=True)
    found = [(w, v) for w, v in _strings({k: v for k, v in state.items() if k != "model"})
             if os.path.isabs(v) or "/work" in v or "data-bin" in v or "/tmp" in v]
    assert not found, found
    assert state["cfg"]["task"]["data"] == "" and state["cfg"]["common"]["user_dir"] is None


def test_strip_machine_paths_in_dict_namespace_and_omegaconf():
    from omegaconf import OmegaConf

    from fairseq_moe_infer.checkpoint import strip_machine_paths

    meta = {"cfg": OmegaConf.create({"task": {"data": "/home/u/data-bin/mt", "source_lang": "src"},
                                     "checkpoint": {"save_dir": "/scratch/ck"}, "common": {"user_dir": "/opt/x"}}),
            "args": argparse.Namespace(data="/home/u/data-bin/mt:/home/u/b", lr=[0.1], save_dir="rel/dir", spm="/a/spm.model")}
    strip_machine_paths(meta)
    assert meta["cfg"]["task"] == {"data": "", "source_lang": "src"}
    assert meta["cfg"]["checkpoint"]["save_dir"] == "checkpoints" and meta["cfg"]["common"]["user_dir"] is None
    assert vars(meta["args"]) == {"data": "", "lr": [0.1], "save_dir": "rel/dir", "spm": "spm.model"}


def _merged(path):
    return checkpoint_utils.load_checkpoint_to_cpu(str(path))["model"]


@pytest.mark.parametrize("shards", [2, 0])
def test_export_of_a_sharded_checkpoint_onto_itself_keeps_the_experts(tmp_path, shards):
    """export_checkpoint.py read only the main file of a sharded checkpoint: it wrote shards without experts and,
    with --out equal to the input, destroyed them. Now the shards are read and the result checked."""
    import subprocess
    import sys

    from .helpers import REPO

    for f in os.listdir(LM):
        shutil.copy(os.path.join(LM, f), tmp_path / f)
    expected = _merged(os.path.join(LM, "checkpoint.pt"))
    out = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "export_checkpoint.py"), tmp_path / "checkpoint.pt",
                          "--out", tmp_path / "checkpoint.pt", "--expert-shards", str(shards)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = _merged(tmp_path / "checkpoint.pt")
    assert got.keys() == expected.keys()
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    (tmp_path / "plain").write_bytes(b"")  # the files get the mode of a plain write, not mkstemp's private 0600
    modes = {f: os.stat(tmp_path / f).st_mode & 0o777 for f in os.listdir(tmp_path) if f.endswith(".pt")}
    assert set(modes.values()) == {os.stat(tmp_path / "plain").st_mode & 0o777}, modes
    main = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ("decoder.layers.1.moe_layer.experts.fc1_weight" in main["model"]) == (shards == 0)


def test_export_check_failure_leaves_the_input_alone(tmp_path, monkeypatch):
    import fairseq_moe_infer.checkpoint as ck

    for f in os.listdir(LM):
        shutil.copy(os.path.join(LM, f), tmp_path / f)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real_save = torch.save

    def corrupting_save(obj, f):  # a shard whose bytes do not hold what was meant (disk or serialization fault)
        if "model" in obj and SHARDS_KEY not in obj:
            obj = {"model": {k: v + 1 for k, v in obj["model"].items()}}
        real_save(obj, f)

    monkeypatch.setattr(ck.torch, "save", corrupting_save)
    with pytest.raises(ck.CheckpointError, match="failed its check"):
        export_checkpoint([str(tmp_path / "checkpoint.pt")], str(tmp_path / "checkpoint.pt"), 2)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # untouched, no temporary left


def test_nan_in_an_expert_shard_is_refused_naming_the_file(tmp_path):
    from fairseq_moe_infer.checkpoint import CheckpointError

    for f in os.listdir(LM):
        shutil.copy(os.path.join(LM, f), tmp_path / f)
    shard = torch.load(tmp_path / "checkpoint.experts-1-of-2.pt", weights_only=True)
    shard["model"]["decoder.layers.1.moe_layer.experts.fc2_weight"][3, 0, 0] = float("nan")
    torch.save(shard, tmp_path / "checkpoint.experts-1-of-2.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint.experts-1-of-2.pt: decoder.layers.1.moe_layer.experts.fc2_weight "
                                              r"holds NaN/Inf"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "checkpoint.pt"))


def test_numpy_arrays_and_omegaconf_config_load_weights_only(tmp_path):
    """Older fairseq / MoE-branch checkpoints pickle numpy arrays and an omegaconf DictConfig."""
    import numpy as np
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"_name": "transformer_lm", "dropout": 0.1, "layers": [1, 2]}, "task": {"data": None}})
    torch.save({"cfg": cfg, "extra_state": {"rng": np.arange(5), "best": np.float64(1.5)}}, tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    assert state["cfg"]["model"]["layers"] == [1, 2] and state["extra_state"]["rng"].tolist() == [0, 1, 2, 3, 4]


def test_arbitrary_callable_is_refused_naming_class_and_file(tmp_path):
    from fairseq_moe_infer.checkpoint import CheckpointError

    for obj, name in ((os.system, "posix.system"), (shutil.rmtree, "shutil.rmtree")):
        torch.save({"model": {}, "hook": obj}, tmp_path / "evil.pt")
        with pytest.raises(CheckpointError, match=rf"evil.pt holds {name}, which is not an allowed checkpoint class"):
            checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "evil.pt"))
    for text in ("not a checkpoint\n", "hello world\n"):  # torch 2.13: UnpicklingError: Unsupported operand 110; KeyError: 101
        (tmp_path / "notes.txt").write_text(text)
        with pytest.raises(CheckpointError) as e:
            checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "notes.txt"))
        # the unpickler's reason and the file's start, not torch's advice to load with weights_only=False cut mid-word
        start = re.escape(repr(text.encode()))
        assert re.fullmatch(rf"{re.escape(str(tmp_path / 'notes.txt'))} is not a torch checkpoint \((UnpicklingError|KeyError): "
                            rf"[^;]+; the file starts with {start}\); check the checkpoint path", str(e.value)), e.value
        assert "weights_only" not in str(e.value)


def _load_like_eval_lm(path, extra=()):
    """The model(s) fairseq-eval-lm builds: its own parser, the task from the command line, --model-overrides."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from .helpers import USER_DIR

    args = options.parse_args_and_arch(options.get_eval_lm_parser(), [
        os.path.join(ASSETS, "lm"), "--user-dir", USER_DIR, "--task", "moe_language_modeling", "--path", str(path),
        "--moe-gating", "static", "--tokens-per-sample", "64"] + list(extra))
    cfg = convert_namespace_to_omegaconf(args)
    models, _, _ = checkpoint_utils.load_model_ensemble_and_task(
        [cfg.common_eval.path], arg_overrides=eval(cfg.common_eval.model_overrides), task=tasks.setup_task(cfg.task))
    return models[0].eval()


@pytest.mark.parametrize("fraction,factor", [(0.1, None), (-1.0, 1.5)])
def test_converted_branch_settings_apply_at_load_and_give_the_branch_routing(tmp_path, caplog, fraction, factor):
    """A branch checkpoint with non-default settings: padding routed (no use_moe_pad_mask: the branch's default),
    evaluation capacity fraction 0.1 (or -1, the branch's "training capacity", with a fork's capacity factor 1.5),
    MoE layers by decoder_moe_freq=2 with moe_freq=0 (an LM ignores encoder_moe_freq=4), deterministic second
    expert. Converted, then loaded as fairseq-eval-lm loads it (no --moe-* flag but --moe-gating static): the layers
    route padding and cap each expert at ceil(0.1 T) (int(1.5 * 2 * ceil(T / E))), with a log line, and each MoE
    layer's output in a forward of a padded batch equals the float64 per-token reference of that rule
    (tests/reference.py: padding routed like real tokens). Flags given on the command line win. Before: 0.25 unless
    the printed eval_args were copied by hand; decoder_moe_freq with another encoder_moe_freq was refused."""
    from tests.reference import reference_moe

    _branch_layout(tmp_path, 2)
    shared = torch.load(tmp_path / "model-shared.pt", weights_only=False)
    shared["cfg"]["model"].update(moe_freq=0, decoder_moe_freq=2, encoder_moe_freq=4, moe_second_expert_policy="all",
                                  moe_gating_use_fp32=False, moe_eval_capacity_token_fraction=fraction)
    shared["cfg"]["model"].pop("moe_capacity_factor")
    if factor is not None:
        shared["cfg"]["model"]["moe_capacity_factor"] = factor
    torch.save(shared, tmp_path / "model-shared.pt")
    from fairseq_moe_infer.checkpoint import convert_fairseq_moe_branch

    convert_fairseq_moe_branch(str(tmp_path / "model-shared.pt"), str(tmp_path / "c.pt"))
    with caplog.at_level("INFO", logger="fairseq_moe_infer"):
        model = _load_like_eval_lm(tmp_path / "c.pt").double()
    layers = moe_layers(model)
    assert len(layers) == 2 and all(m.route_padding for m in layers)
    assert all(m.dispatcher.eval_capacity_token_fraction == max(fraction, 0.0) for m in layers)
    assert all(m.capacity_factor == (factor or 1.0) for m in layers)
    line = next(r.getMessage() for r in caplog.records if "converted from fairseq's MoE branch" in r.getMessage())
    assert f"moe_eval_capacity_token_fraction={max(fraction, 0.0)}" in line and "padding routed" in line, line

    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], inp[1], out))) for m in layers]
    tokens = torch.randint(4, 8000, (3, 24), generator=torch.Generator().manual_seed(0))
    tokens[0, 16:] = tokens[2, 10:] = 1  # padding (LM batches are right-padded)
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    E = 16
    for layer, x, pad, y in seen:
        flat = x.reshape(-1, x.shape[-1])
        T = flat.shape[0]  # padding counts: the branch routes it
        capacity = math.ceil(0.1 * T) if fraction > 0 else int(factor * 2 * math.ceil(T / E))
        ref, dropped, _ = reference_moe(layer, flat, None, capacity=capacity)
        assert pad.sum() == 8 + 14 and dropped > 0
        torch.testing.assert_close(y.reshape(T, -1), ref, rtol=0, atol=1e-9)

    caplog.clear()
    with caplog.at_level("INFO", logger="fairseq_moe_infer"):
        model = _load_like_eval_lm(tmp_path / "c.pt", ["--moe-eval-capacity-token-fraction", "0.5",
                                                      "--model-overrides", "{'use_moe_pad_mask': True}"])
    layers = moe_layers(model)
    assert all(not m.route_padding and m.dispatcher.eval_capacity_token_fraction == 0.5 for m in layers)
    line = next(r.getMessage() for r in caplog.records if "converted from fairseq's MoE branch" in r.getMessage())
    assert "overrides the stored False" in line and "the stored" in line.split("moe_eval_capacity_token_fraction=0.5")[1]


def test_branch_moe_frequency_rule():
    """fairseq's MoE branch: encoder layer i is MoE if (i + 1) % max(encoder_moe_freq, moe_freq) == 0, decoder layers
    likewise with decoder_moe_freq (defaults 0); an LM has only the decoder rule. Hand-made configs."""
    from fairseq_moe_infer.checkpoint import _branch_moe_freq

    assert _branch_moe_freq({"moe_freq": 2}.get, decoder_only=False) == 2
    assert _branch_moe_freq({"moe_freq": 2, "decoder_moe_freq": 4}.get, decoder_only=True) == 4
    assert _branch_moe_freq({"decoder_moe_freq": 2, "encoder_moe_freq": 4}.get, decoder_only=True) == 2
    assert _branch_moe_freq({"encoder_moe_freq": 2, "decoder_moe_freq": 2, "moe_freq": 1}.get, decoder_only=False) == 2
    assert _branch_moe_freq({}.get, decoder_only=False) == 0
    with pytest.raises(ValueError, match="MoE frequency is 2 in the encoder and 0 in the decoder"):
        _branch_moe_freq({"encoder_moe_freq": 2}.get, decoder_only=False)  # a dense decoder: not expressible here


def _script_main(name):
    import runpy

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", name)
    return runpy.run_path(path, run_name="not_main")["main"]


def test_export_and_convert_scripts_end_bad_input_in_one_line(tmp_path, capsys):
    """export_checkpoint.py / convert_fairseq_moe_checkpoint.py: a missing or foreign input and shards that do
    not divide the experts end in the one line '<script>: error: ...' (they printed tracebacks before)."""
    export, convert = _script_main("export_checkpoint.py"), _script_main("convert_fairseq_moe_checkpoint.py")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    torch.save({"model": {"decoder.layers.1.moe_layer.experts.fc1_weight": torch.zeros(4, 3, 2)}, "cfg": {"model": None},
                "optimizer_history": [{"num_updates": 1, "best_loss": 1.0}]}, tmp_path / "c.pt")
    torch.save({"model": {"decoder.layers.1.moe_layer.experts.fc1_weight": torch.zeros(2, 3, 2)}}, tmp_path / "shard.pt")
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    cases = [
        (export, [str(tmp_path / "nope.pt")], f"export_checkpoint.py: error: checkpoint {tmp_path / 'nope.pt'} does not exist"),
        (export, [str(tmp_path / "text.pt")], rf"export_checkpoint.py: error: {tmp_path / 'text.pt'} is not a torch checkpoint "
                                              r"\(.*\); check the checkpoint path"),
        (export, [str(tmp_path / "c.pt"), "--expert-shards", "3"],
         "export_checkpoint.py: error: 3 shards do not divide the 4 experts"),
        # an expert shard file, a tensor: before, a 'checkpoint' without config was written (exit 0) / a traceback
        (export, [str(tmp_path / "shard.pt")], f"export_checkpoint.py: error: {tmp_path / 'shard.pt'} is not a fairseq "
                                               "checkpoint: it holds the keys model, no model weights with their cfg"),
        (export, [str(tmp_path / "t.pt")], f"export_checkpoint.py: error: {tmp_path / 't.pt'} is not a fairseq checkpoint: "
                                           "it holds a Tensor"),
        (convert, [str(tmp_path / "nope-shared.pt")], f"convert_fairseq_moe_checkpoint.py: error: {tmp_path / 'nope-shared.pt'} "
                                                      "does not exist; give the MoE branch's <name>-shared.pt"),
        (convert, [str(tmp_path / "c.pt")],
         "convert_fairseq_moe_checkpoint.py: error: .*expected the MoE branch's '<name>-shared.pt'"),
    ]
    for main, args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(args + ["--out", str(tmp_path / "out" / "o.pt")])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
        assert re.match(message, e.value.code), (message, e.value.code)
    assert not (tmp_path / "out" / "o.pt").exists()
