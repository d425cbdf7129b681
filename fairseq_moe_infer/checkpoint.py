"""Loading fairseq checkpoints on torch >= 2.6 and the sharded MoE checkpoint layout.

**Weights-only loading.** Since torch 2.6, ``torch.load`` defaults to
``weights_only=True`` and refuses any class not on its allow-list; fairseq
checkpoints carry a few (``argparse.Namespace`` in ``cfg.model``, fairseq's
training meters, numpy scalars and arrays in ``extra_state``, and in older fairseq /
MoE-branch checkpoints an omegaconf ``DictConfig``). Instead of switching the
check off, :func:`allow_fairseq_checkpoint_globals` adds exactly those classes
with ``torch.serialization.add_safe_globals``; everything else is still refused, and
in the fairseq tools the refusal is one line naming the class and the file.

**No machine paths.** Exports (:func:`save_serving_checkpoint`) replace the absolute
paths fairseq stores in the config (``task.data``, ``common.user_dir``,
``checkpoint.save_dir`` ...) by neutral values (:func:`strip_machine_paths`): the tools
take the data folder as their positional argument anyway.

**Finite experts.** Expert tensors read from shard files must be finite; a NaN/Inf
(corrupt shard) is refused naming the file.

**Sharded MoE checkpoints.** Like fairseq's MoE branch (shared parameters plus
per-rank expert files), a checkpoint written by ``scripts/export_checkpoint.py``
keeps every non-expert tensor in the main file and the experts in shard files
beside it, listed under ``moe_expert_shards``; shard i holds experts
``[i * E / n, (i + 1) * E / n)`` of every MoE layer. :func:`load_checkpoint_to_cpu`
wraps fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` so that the stock
tools' ``--path checkpoint.pt`` loads the shards too.
"""

import argparse
import collections
import glob
import json
import os
import pickle
import re
import tempfile
from typing import Dict, List, Optional

import torch

from .cli import exit_with_error, in_fairseq_tool, new_file_mode
from .moe.experts import EXPERT_KEY_PART, is_expert_key, stack_per_expert_keys

SHARDS_KEY = "moe_expert_shards"


def fairseq_checkpoint_globals() -> List[object]:
    """The non-tensor classes found in checkpoints written by ``fairseq-train``."""
    import numpy as np
    from fairseq.logging import meters

    found: List[object] = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]
    found += [
        getattr(meters, name)
        for name in ("AverageMeter", "SumMeter", "TimeMeter", "StopwatchMeter", "MetersDict", "ConcatTensorMeter")
        if hasattr(meters, name)
    ]
    found += [np.dtype, type(np.dtype("float64")), type(np.dtype("int64")), type(np.dtype("float32"))]
    from numpy._core import multiarray  # numpy 2; numpy >= 1.26 has the same name (an alias of numpy.core)

    # numpy scalars and arrays, under both module names (a checkpoint pickled under numpy 2 names
    # numpy._core.multiarray, one pickled under numpy 1 numpy.core.multiarray)
    for fn in (multiarray.scalar, multiarray._reconstruct):
        found += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    found.append(np.ndarray)
    found += _omegaconf_globals()
    return found


def _omegaconf_globals() -> List[object]:
    """What pickling an omegaconf ``DictConfig`` (fairseq's ``cfg``) stores: the containers, their
    metadata and value nodes, and the plain types they name as ``ref_type`` / ``key_type``."""
    import typing

    from omegaconf import DictConfig, ListConfig, base, nodes

    found: List[object] = [DictConfig, ListConfig, base.Metadata, base.ContainerMetadata, typing.Any, dict, list, int]
    found += [getattr(nodes, n) for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode")
              if hasattr(nodes, n)]
    return found


def allow_fairseq_checkpoint_globals() -> None:
    """Add fairseq's checkpoint classes to torch's weights-only allow-list (torch >= 2.4)."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add(fairseq_checkpoint_globals())


_UNSAFE = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")


def describe_load_error(path: str, e: BaseException) -> Optional[str]:
    """One line for an exception of ``torch.load(path)``, or None if it is not a load failure.

    A class outside the allow-list is named with the file; anything else torch cannot unpickle
    (a text file, a truncated file) is called not a torch checkpoint, with torch's reason (for
    weights-only loading the unpickler's, not torch's advice to load with ``weights_only=False``)
    and the file's first bytes.
    """
    if isinstance(e, pickle.UnpicklingError):
        m = _UNSAFE.search(str(e))
        if m:
            return (f"{path} holds {m.group(1)}, which is not an allowed checkpoint class (weights-only loading "
                    "refuses arbitrary code); re-save the checkpoint without it if you trust its source")
    if isinstance(e, (pickle.UnpicklingError, EOFError, KeyError, UnicodeDecodeError)) or (
        isinstance(e, RuntimeError) and ("PytorchStreamReader" in str(e) or "zip archive" in str(e))
    ):
        reason = str(e).split("WeightsUnpickler error:")[-1]  # torch >= 2.6 puts its weights_only advice first
        first = (reason.strip().splitlines() or [""])[0][:120]
        try:
            with open(path, "rb") as f:
                head = f.read(24)
        except OSError:
            head = b""
        return (f"{path} is not a torch checkpoint ({type(e).__name__}: {first}; the file starts with {head!r}); "
                "check the checkpoint path")
    return None


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""


def check_finite(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the first tensor holding NaN or Inf."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: {key} holds NaN/Inf values; the file is corrupt, export or copy it again")


def _merge_shards(state: Dict, path: str) -> Dict:
    names = state.pop(SHARDS_KEY, None)
    if not names:
        return state
    parts: Dict[str, List[torch.Tensor]] = collections.defaultdict(list)
    for name in names:
        shard_path = os.path.join(os.path.dirname(path), name)
        if not os.path.exists(shard_path):
            raise FileNotFoundError(
                f"{path} lists expert shard {name}, which is missing; keep all "
                f"{len(names)} shard files ({', '.join(names)}) beside it"
            )
        try:
            with open(shard_path, "rb") as f:
                shard = torch.load(f, map_location="cpu")
        except Exception as e:  # a truncated or foreign file: name it
            raise RuntimeError(f"cannot read expert shard {shard_path}: {e}; re-export or copy it again") from e
        check_finite(shard["model"], shard_path)
        for key, tensor in shard["model"].items():
            parts[key].append(tensor)
    for key, tensors in parts.items():
        if len(tensors) != len(names):
            raise RuntimeError(f"{key} is in {len(tensors)} of {len(names)} expert shards; the shards are corrupt")
        state["model"][key] = torch.cat(tensors, dim=0)
    return state


def load_checkpoint_to_cpu(original, path, arg_overrides=None, load_on_all_ranks=False):
    """Wraps ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` (every stock tool's ``--path``
    goes through it): a file that is no (allowed) checkpoint is named in one line; expert tensors
    must be finite; merges the expert shard files a serving checkpoint lists; a missing or
    unreadable shard ends a fairseq tool with one line naming the file."""
    try:
        state = original(path, arg_overrides, load_on_all_ranks)
    except Exception as e:  # torch.load of a file that is no (allowed) checkpoint
        problem = describe_load_error(path, e)
        if problem is None:
            raise
        if in_fairseq_tool():
            exit_with_error(problem)
        raise CheckpointError(problem) from None
    try:
        check_finite({k: v for k, v in state.get("model", {}).items() if is_expert_key(k)}, path)
        return _merge_shards(state, path)
    except (FileNotFoundError, RuntimeError) as e:
        if in_fairseq_tool():  # one line naming the fix instead of a traceback
            exit_with_error(str(e))
        raise


def read_checkpoint(path: str) -> Dict:
    """A checkpoint file as saved (no fairseq upgrade), its expert shards merged back in.

    Raises:
        CheckpointError / FileNotFoundError / RuntimeError: unreadable file, a torch file that is not a
            fairseq checkpoint (no ``model`` dict and ``cfg`` / ``args``: e.g. an expert shard file),
            missing or corrupt shard.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu")
    except Exception as e:
        problem = describe_load_error(path, e)
        if problem is None:
            raise
        raise CheckpointError(problem) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or \
            (state.get("cfg") is None and state.get("args") is None):
        held = f"the keys {', '.join(map(str, list(state)[:4]))}" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(f"{path} is not a fairseq checkpoint: it holds {held}, no model weights with their cfg / "
                              "args; give the main checkpoint file (its expert shard files are read through it)")
    return _merge_shards(state, path)


def export_checkpoint(paths: List[str], out_path: str, num_shards: int = 1, dtype: torch.dtype = torch.float16) -> List[str]:
    """Write a serving checkpoint: averaged weights, ``dtype``, no optimizer state.

    Args:
        paths: fairseq training checkpoints or serving checkpoints (their expert shards are
            read too); their float tensors are averaged (one path: copied).
        out_path: the main file (loads with ``--path out_path``); may be one of ``paths``: it is
            replaced only after the new files were written and checked (see
            :func:`save_serving_checkpoint`).
        num_shards: expert shard files written beside it (0: experts stay in the
            main file); each holds an equal slice of every layer's experts.
        dtype: dtype of floating-point tensors.

    Returns:
        The paths written (main file first).

    Raises:
        ValueError: shard count not dividing the expert count, or checkpoints
            with different parameters; CheckpointError: an unreadable input or a failed check.
    """
    states = [read_checkpoint(p) for p in paths]
    model: Dict[str, torch.Tensor] = {}
    for key, t in states[0]["model"].items():
        if any(key not in s["model"] for s in states[1:]):
            raise ValueError(f"{key} is missing from some of {paths}; average checkpoints of one run only")
        if t.is_floating_point():
            t = torch.stack([s["model"][key].double() for s in states]).mean(0).to(dtype)
        # tied weights (shared embeddings) were saved as equal copies: store them once
        twin = next((v for v in model.values() if v.shape == t.shape and v.dtype == t.dtype and torch.equal(v, t)), None)
        model[key] = t if twin is None else twin
    out = {k: states[-1][k] for k in ("args", "cfg") if k in states[-1]}
    out["extra_state"] = {"averaged_from": [os.path.basename(p) for p in paths]}
    out["optimizer_history"] = states[-1].get("optimizer_history", [])[-1:]  # names, scheduler state, best loss
    return save_serving_checkpoint(out, model, out_path, num_shards)


# fairseq config fields holding machine paths, and what an export stores instead: the tools take the
# data folder as their positional argument and --user-dir / --save-dir as flags, so nothing is lost.
_PATH_DEFAULTS = {"data": "", "save_dir": "checkpoints", "user_dir": None, "tensorboard_logdir": None,
                  "restore_file": "checkpoint_last.pt", "finetune_from_model": None, "results_path": None}


def strip_machine_paths(meta: Dict) -> Dict:
    """Replace absolute paths in ``meta['cfg']`` / ``meta['args']`` (dicts, omegaconf or argparse
    sections) by machine-neutral values, in place: known fields get fairseq-neutral defaults
    (``data`` -> "", ``save_dir`` -> "checkpoints", ``user_dir`` -> None ...), any other absolute
    path string its base name. Returns ``meta``."""

    def clean(key, value):
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            return _PATH_DEFAULTS.get(key, os.path.basename(value.rstrip("/")))
        return value

    def walk(node):
        if isinstance(node, argparse.Namespace):
            for k, v in vars(node).items():
                if clean(k, v) is not v:
                    setattr(node, k, clean(k, v))
                walk(v)
        elif isinstance(node, dict) or hasattr(node, "items") and hasattr(node, "__setitem__"):  # dict, DictConfig
            for k, v in list(node.items()):
                if clean(k, v) is not v:  # (assigning a DictConfig section would copy it)
                    node[k] = clean(k, v)
                walk(v)

    for section in ("cfg", "args"):
        if meta.get(section) is not None:
            walk(meta[section])
    return meta


def save_serving_checkpoint(meta: Dict, model: Dict[str, torch.Tensor], out_path: str, num_shards: int) -> List[str]:
    """Write ``meta`` + ``model`` to ``out_path``, the experts into ``num_shards`` files beside it.

    Machine paths are stripped from the config (:func:`strip_machine_paths`). Every file is first
    written under a temporary name in the output folder, read back and compared tensor by tensor
    with ``model``; only then are all renamed into place (``os.replace``, atomic on one file
    system), so an input given as ``out_path`` is never lost and a failed export leaves no file.

    Raises:
        ValueError: the shard count does not divide an expert stack; CheckpointError: the files
        read back differ from what was meant to be written.
    """
    out = strip_machine_paths(dict(meta))
    out.pop(SHARDS_KEY, None)
    out["model"] = {k: v for k, v in model.items() if not (num_shards and is_expert_key(k))}
    folder = os.path.dirname(out_path) or "."
    files = {out_path: out}
    if num_shards:
        stem = os.path.splitext(os.path.basename(out_path))[0]
        names = [f"{stem}.experts-{i}-of-{num_shards}.pt" for i in range(num_shards)]
        shards = [{} for _ in names]
        for key, t in model.items():
            if not is_expert_key(key):
                continue
            if t.shape[0] % num_shards:
                raise ValueError(f"{num_shards} shards do not divide the {t.shape[0]} experts of {key}")
            for i, part in enumerate(t.chunk(num_shards, dim=0)):
                shards[i][key] = part.clone()
        out[SHARDS_KEY] = names
        for name, shard in zip(names, shards):
            files[os.path.join(folder, name)] = {"model": shard}
    temps = {}
    try:
        for path, obj in files.items():
            fd, temps[path] = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            os.fchmod(fd, new_file_mode())  # mkstemp makes it private (0600): the export was unreadable to others
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
        _verify_written(temps, out_path, model)
        for path in list(files)[::-1]:  # shards first, the main file (which lists them) last
            os.replace(temps.pop(path), path)
    finally:
        for tmp in temps.values():
            if os.path.exists(tmp):
                os.remove(tmp)
    return list(files)


def _verify_written(temps: Dict[str, str], out_path: str, model: Dict[str, torch.Tensor]) -> None:
    """Read the temporary files back and check they hold exactly ``model``."""
    with open(temps[out_path], "rb") as f:
        state = torch.load(f, map_location="cpu")
    got = dict(state["model"])
    shard_names = state.get(SHARDS_KEY) or []
    parts: Dict[str, List[torch.Tensor]] = collections.defaultdict(list)
    folder = os.path.dirname(out_path) or "."
    for name in shard_names:
        with open(temps[os.path.join(folder, name)], "rb") as f:
            for key, t in torch.load(f, map_location="cpu")["model"].items():
                parts[key].append(t)
    got.update({k: torch.cat(v) for k, v in parts.items()})
    bad = sorted(set(got) ^ set(model))
    bad = bad or [k for k in model if got[k].dtype != model[k].dtype or not torch.equal(got[k], model[k])]
    if bad:
        raise CheckpointError(
            f"export to {out_path} failed its check: {bad[0]} differs after reading it back; nothing was written"
        )


_BRANCH_EXPERT = re.compile(rf"^(.*{re.escape(EXPERT_KEY_PART)})(\d+)\.(fc1|fc2)\.(weight|bias)$")
_ARCH_MAP = {"transformer_lm": "transformer_lm_moe", "transformer": "transformer_moe"}
_TASK_MAP = {"language_modeling": "moe_language_modeling", "translation": "moe_translation"}


def convert_fairseq_moe_branch(shared_path: str, out_path: str, num_shards: int = 0) -> List[str]:
    """Convert a checkpoint of fairseq's MoE branch to this plugin's serving layout.

    fairseq's MoE branch saves ``<name>-shared.pt`` (everything but the experts,
    with the config) and one ``<name>-rank-<r>.pt`` per expert-parallel rank whose
    local experts are ``...moe_layer.experts.<i>.fc1.weight`` etc. Rank r's
    expert i is global expert ``r * E_local + i``. The result holds the same
    weights as stacked ``...moe_layer.experts.fc1_weight`` [E, f, d] tensors and a
    config naming ``transformer_lm_moe`` / ``transformer_moe`` (and the ``moe_*``
    tasks), so the stock tools load it with ``--user-dir`` and ``--path``.

    Args:
        shared_path: the ``-shared.pt`` file; the rank files are found beside it.
        out_path: main output file; ``num_shards`` expert shard files go beside it.

    Raises:
        FileNotFoundError: no rank files; ValueError: an architecture or MoE
        setting this plugin cannot express (e.g. different encoder/decoder MoE frequency).
    """
    if not shared_path.endswith("-shared.pt"):
        raise ValueError(f"{shared_path}: expected the MoE branch's '<name>-shared.pt' file")
    if not os.path.isfile(shared_path):
        raise FileNotFoundError(f"{shared_path} does not exist; give the MoE branch's <name>-shared.pt, "
                                "with its rank files beside it")
    prefix = shared_path[: -len("-shared.pt")]
    ranks = sorted(glob.glob(f"{glob.escape(prefix)}-rank-*.pt"), key=lambda p: int(p.rsplit("-", 1)[1][:-3]))
    if not ranks:
        raise FileNotFoundError(f"no {prefix}-rank-<r>.pt files beside {shared_path}; keep every rank's expert file")
    with open(shared_path, "rb") as f:
        shared = torch.load(f, map_location="cpu")
    model = dict(shared["model"])
    prefixes = set()
    for rank_path in ranks:
        with open(rank_path, "rb") as f:
            rank_state = torch.load(f, map_location="cpu")["model"]
        matches = {key: _BRANCH_EXPERT.match(key) for key in rank_state}
        local = len({m.group(2) for m in matches.values() if m})
        r = int(rank_path.rsplit("-", 1)[1][:-3])
        for key, t in rank_state.items():
            m = matches[key]
            if m is None:
                model.setdefault(key, t)
                continue
            prefixes.add(m.group(1))  # renumber rank-local expert i to global r * E_local + i
            model[f"{m.group(1)}{r * local + int(m.group(2))}.{m.group(3)}.{m.group(4)}"] = t
    for prefix in prefixes:
        try:
            stack_per_expert_keys(model, prefix)
        except RuntimeError as e:
            raise ValueError(f"{e}; a rank file is missing") from None
    num_experts = model[f"{next(iter(prefixes))}fc1_weight"].shape[0] if prefixes else 0
    meta = {k: shared[k] for k in ("args", "cfg") if k in shared}
    settings = _rename_config(meta, num_experts)
    meta["extra_state"] = {"converted_from": os.path.basename(shared_path), "fairseq_moe_branch": settings}
    meta["optimizer_history"] = shared.get("optimizer_history", [])[-1:]  # fairseq's loader reads its last entry
    return save_serving_checkpoint(meta, model, out_path, num_shards)


BRANCH_SETTINGS_KEY = "fairseq_moe_branch"  # cfg.model (and extra_state) of a converted checkpoint
BRANCH_EVAL_CAPACITY_DEFAULT = 0.25  # fairseq's moe_eval_capacity_token_fraction default


def branch_settings_of(model_cfg) -> Optional[Dict]:
    """The fairseq MoE-branch settings a converted checkpoint stores in ``cfg.model`` (see
    :func:`convert_fairseq_moe_branch`), as a plain dict; None for any other model config.
    Read it before fairseq builds the model: for dataclass models fairseq drops the config keys
    the dataclass lacks (``merge_with_parent(..., remove_missing=True)``)."""
    stored = getattr(model_cfg, BRANCH_SETTINGS_KEY, None)
    return None if stored is None else dict(json.loads(stored))


def branch_eval_capacity_fraction(settings: Dict) -> Optional[float]:
    """The evaluation capacity fraction of the branch's stored settings as this plugin's
    ``--moe-eval-capacity-token-fraction`` (a negative fraction, the branch's "use the training
    capacity", is 0 here, which means the same); None if none is stored."""
    fraction = (settings or {}).get("moe_eval_capacity_token_fraction")
    return None if fraction is None else max(float(fraction), 0.0)


def branch_eval_args(settings: Dict) -> List[str]:
    """The ``moe_*`` task flag equal to the branch's stored evaluation capacity (printed by the
    converter; the ``moe_*`` tasks apply the stored fraction by themselves unless the flag is given)."""
    fraction = branch_eval_capacity_fraction(settings)
    return [] if fraction is None else ["--moe-eval-capacity-token-fraction", str(fraction)]


def _branch_moe_freq(get, decoder_only: bool) -> int:
    """The branch's MoE-layer rule: encoder layer i is MoE if ``(i + 1) % max(encoder_moe_freq, moe_freq) == 0``,
    decoder layers likewise with ``decoder_moe_freq`` (fairseq's ``transformer_encoder.py`` /
    ``transformer_decoder.py``, options default 0); this plugin has one ``--moe-freq`` for both stacks."""
    common = get("moe_freq") or 0
    dec = max(get("decoder_moe_freq") or 0, common)
    if decoder_only:
        return dec
    enc = max(get("encoder_moe_freq") or 0, common)
    if enc != dec:
        raise ValueError(f"the branch's MoE frequency is {enc} in the encoder and {dec} in the decoder (encoder_moe_freq="
                         f"{get('encoder_moe_freq')}, decoder_moe_freq={get('decoder_moe_freq')}, moe_freq="
                         f"{get('moe_freq')}): this plugin has one --moe-freq for both")
    return enc


def _rename_config(meta: Dict, num_experts: int) -> Dict:
    """Rename the branch's config to this plugin's and carry its MoE settings into ``cfg.model``;
    returns those settings (``use_moe_pad_mask``, ``moe_capacity_factor``,
    ``moe_eval_capacity_token_fraction``, ``moe_freq``, ``moe_batch_prioritized_routing``), which are
    also stored (as JSON) in ``cfg.model.fairseq_moe_branch`` for the ``moe_*`` tasks to apply at load."""
    settings: Dict = {}
    cfg = meta.get("cfg") or {}
    for section, mapping in (("model", _ARCH_MAP), ("task", _TASK_MAP)):
        c = cfg.get(section) if isinstance(cfg, dict) else None
        if c is None:
            continue
        get = (lambda k: getattr(c, k, None)) if isinstance(c, argparse.Namespace) else c.get
        put = (lambda k, v: setattr(c, k, v)) if isinstance(c, argparse.Namespace) else c.__setitem__
        name = get("_name") or ""
        base = next((b for b in sorted(mapping, key=len, reverse=True) if name.startswith(b)), None)
        if base is None:
            raise ValueError(f"cfg.{section}._name '{name}' is not one of {', '.join(mapping)}; cannot convert")
        put("_name", mapping[base])
        if section == "model":
            put("arch", mapping[base])
            put("moe_freq", _branch_moe_freq(get, decoder_only=base == "transformer_lm"))
            if num_experts and get("moe_expert_count") not in (None, num_experts):
                raise ValueError(f"cfg says moe_expert_count={get('moe_expert_count')} but the rank files hold {num_experts}")
            put("moe_expert_count", num_experts or get("moe_expert_count"))
            # the branch routes padding unless --use-moe-pad-mask was given (its default: off)
            put("use_moe_pad_mask", bool(get("use_moe_pad_mask") or False))
            # the branch's training capacity (top-2: 2 * ceil(T / E), top-1: ceil(T / E)) is capacity factor 1.0 here
            if get("moe_capacity_factor") is None:
                put("moe_capacity_factor", 1.0)
            if get("moe_eval_capacity_token_fraction") is None:
                put("moe_eval_capacity_token_fraction", BRANCH_EVAL_CAPACITY_DEFAULT)
            for key in ("use_moe_pad_mask", "moe_capacity_factor", "moe_eval_capacity_token_fraction", "moe_freq"):
                settings[key] = get(key)
            settings["moe_batch_prioritized_routing"] = bool(get("moe_batch_prioritized_routing") or False)
            # a JSON string: --model-overrides (fairseq's overwrite_args_by_name) rewrites same-named keys in nested
            # configs, and the record must keep the stored values to tell the overridden ones apart
            put(BRANCH_SETTINGS_KEY, json.dumps(settings, sort_keys=True))
    return settings
