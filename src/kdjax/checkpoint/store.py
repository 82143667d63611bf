"""kdjax's checkpoint format (orbax) and the errors around it.

A checkpoint directory (``<workdir>/checkpoints``) holds one sub-directory per step, each with two items:
``state`` (a pytree: ``params`` and ``batch_stats``; for a run being trained also ``opt_state``, ``step`` and the
distiller's ``extra``) and ``meta`` (JSON: model, num_classes, image_size, dataset, mean, std, ..., and
``digest``, the SHA-256 of the saved arrays, and ``meta_digest``, the SHA-256 of the rest of the meta). Teacher
training, the PyTorch import and the student runs all write it; every task reads it with ``load_model``,
``read_meta`` or ``TrainCheckpointer.restore``, and they verify the digests, so a checkpoint whose arrays or meta
changed after it was written is refused instead of silently used. Arrays that are NaN or infinite are never
saved, and never loaded as a model (``check_finite``).

Checkpoints written before digests existed (no ``digest`` in meta) still load, with one line saying so; their
state may also hold a ``key`` entry (the run key, which nothing reads), dropped on restore. Those written before
``meta_digest`` existed load with their meta unverified.
"""
import hashlib
import json
import os
import sys
from typing import Any, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from kdjax.errors import KdjaxError

CHECKPOINT_SUBDIR = "checkpoints"
DIGEST_KEY = "digest"
META_DIGEST_KEY = "meta_digest"


class CheckpointError(KdjaxError, ValueError):
    """A checkpoint is missing, corrupt or does not fit the task's config."""


def _manager(directory: str, keep: Optional[int] = None, create: bool = True) -> ocp.CheckpointManager:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CheckpointError(f"{os.path.abspath(directory)} is a file, not a checkpoints folder: move it away, or "
                              f"use another --workdir")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    # Handlers named per item, so that orbax can read an item's metadata (the stored tree) without a target.
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})


def _jsonable(meta: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(meta), default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _path_name(path) -> str:
    """A leaf's path as plain names ("opt_state/1/0/trace/..."): the same whether the containers are the
    optimiser's named tuples (at save) or the dicts and lists orbax restores without a target."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def state_digest(state: Any) -> str:
    """SHA-256 over every array of ``state`` in sorted path order: path, dtype, shape and bytes of each leaf."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    flat = {_path_name(path): leaf for path, leaf in leaves}
    for path in sorted(flat):
        leaf = flat[path]
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{path}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def meta_digest(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the meta's canonical JSON, its two digests left out."""
    body = {k: v for k, v in _jsonable(meta).items() if k not in (DIGEST_KEY, META_DIGEST_KEY)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify_meta(meta: Mapping[str, Any], where: str) -> None:
    want = meta.get(META_DIGEST_KEY)
    if want is not None and meta_digest(meta) != want:
        raise CheckpointError(f"checkpoint {where} is corrupted: its meta (model, dataset, ...) does not match the "
                              f"digest written with it; delete that step directory (or re-create the checkpoint)")


def first_non_finite(tree: Any) -> Optional[str]:
    """The path of the first floating array of ``tree`` (sorted path order) holding a NaN or an infinity, and
    what it holds, e.g. ``params/fc/kernel (3 NaN, 0 inf of 640)``; None when every array is finite."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    for path, leaf in sorted(((_path_name(p), l) for p, l in leaves), key=lambda item: item[0]):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            continue
        array = np.asarray(leaf)
        if not np.issubdtype(array.dtype, np.inexact) and array.dtype.kind != "V":
            continue
        array = array.astype(np.float32) if array.dtype.kind == "V" else array  # bfloat16 and friends
        finite = np.isfinite(array)
        if not finite.all():
            nan = int(np.isnan(array).sum())
            return f"{path} ({nan} NaN, {array.size - int(finite.sum()) - nan} inf of {array.size})"
    return None


def check_finite(tree: Any, what: str, fix: str) -> None:
    """One line naming the first non-finite array of ``tree`` (``what``: whose arrays; ``fix``: what to do)."""
    bad = first_non_finite(tree)
    if bad is not None:
        raise CheckpointError(f"{what} has non-finite values: {bad}; {fix}")


def _verify(state: Any, meta: Mapping[str, Any], where: str, earlier: str = "") -> None:
    """Refuse a state whose arrays differ from what was saved; say once that a pre-digest checkpoint is unverified."""
    want = meta.get(DIGEST_KEY)
    if want is None:
        print(f"warning: checkpoint {where} was written without a content digest (an older kdjax): it is loaded "
              f"unverified", file=sys.stderr, flush=True)
        return
    if state_digest(state) != want:
        raise CheckpointError(f"checkpoint {where} is corrupted: its arrays do not match the digest written with "
                              f"it{earlier}; delete that step directory (or re-create the checkpoint)")


def _save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: Mapping[str, Any]) -> None:
    check_finite(state, f"the state to save as step {step}", "it is not saved: a checkpoint is never written "
                 "with NaN or infinite arrays")
    meta = dict(_jsonable(meta), **{DIGEST_KEY: state_digest(state)})
    meta[META_DIGEST_KEY] = meta_digest(meta)
    mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


class TrainCheckpointer:
    """Saves and restores a training run's state under ``<workdir>/checkpoints`` (saves are asynchronous;
    ``close`` waits for the last one)."""

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(workdir, CHECKPOINT_SUBDIR)
        self._mngr = _manager(self.directory, keep=keep)

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any]) -> None:
        from kdjax.workdir import check_still_held
        check_still_held(self.directory)  # a run whose workdir lock was taken over writes nothing more
        _save(self._mngr, step, state, meta)

    def _verifies(self, step: int) -> bool:
        """Whether a kept step restores and matches its digest (asked only once another step failed)."""
        try:
            out = self._mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                                        meta=ocp.args.JsonRestore()))
            digest = dict(out.meta).get(DIGEST_KEY)
            return digest is not None and state_digest(out.state) == digest
        except Exception:  # a damaged step of any kind simply does not verify
            return False

    def _earlier_note(self, step: int) -> str:
        earlier = [s for s in self._mngr.all_steps() if s < step]
        if not earlier:
            return " (no earlier step is kept)"
        good = [s for s in earlier if self._verifies(s)]
        return (f" (earlier steps that verify: {', '.join(map(str, good))})" if good else
                f" (no earlier step verifies: {', '.join(map(str, earlier))})")

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """The state of ``step`` (placed as ``abstract_state`` says) and its meta, verified against its digest."""
        where = os.path.join(self.directory, str(step))
        try:
            stored = self._mngr.item_metadata(step)["state"]
            # Entries an older kdjax saved that this version no longer keeps (the run key) are restored and dropped.
            legacy = {k: jax.ShapeDtypeStruct(stored[k].shape, stored[k].dtype) for k in stored
                      if k not in abstract_state}
            out = self._mngr.restore(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(dict(abstract_state, **legacy)), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for damaged files
            raise CheckpointError(f"cannot restore step {step} from {self.directory} ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}){self._earlier_note(step)}; delete that step "
                                  f"directory to resume from an earlier one, or start a fresh workdir") from None
        meta = dict(out.meta)
        _verify_meta(meta, where)
        state = {k: v for k, v in out.state.items() if k not in legacy}
        _verify(out.state if meta.get(DIGEST_KEY) is None else state, meta, where, self._earlier_note(step))
        return state, meta

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def save_model(directory: str, variables: Mapping[str, Any], meta: Mapping[str, Any], step: int = 0) -> str:
    """Write ``{'params', 'batch_stats'}`` and ``meta`` as one checkpoint step; returns the checkpoints dir."""
    state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    mngr = _manager(directory)
    _save(mngr, step, state, meta)
    mngr.wait_until_finished()
    mngr.close()
    return directory


def _step_dirs(path: str):
    """(step, directory) of every step directory under ``path``, complete or not, in step order."""
    if not os.path.isdir(path):
        return []
    return sorted((int(d), os.path.join(path, d)) for d in os.listdir(path)
                  if d.isdigit() and os.path.isdir(os.path.join(path, d)))


def _is_complete(step_dir: str) -> bool:
    return all(os.path.isdir(os.path.join(step_dir, item)) for item in ("state", "meta"))


def resolve_step_dir(path: str) -> str:
    """The step directory that ``path`` designates: a step dir itself, a checkpoints dir (its latest step), or a
    workdir holding ``checkpoints/`` (its latest step). A latest step that is incomplete is an error, never a
    silent fall-back to an earlier step."""
    hint = ("give a kdjax workdir (its latest checkpoint is used), its checkpoints/ folder or one step's directory; "
            "train a teacher with `kdjax teacher` or import one with `kdjax import_torch`")
    if not path:
        raise CheckpointError(f"no checkpoint path given: {hint}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist: {hint}")
    if _is_complete(path):
        return path
    for candidate in (path, os.path.join(path, CHECKPOINT_SUBDIR)):
        steps = _step_dirs(candidate)
        if steps:
            latest, step_dir = steps[-1]
            if not _is_complete(step_dir):
                earlier = [str(s) for s, d in steps[:-1] if _is_complete(d)]
                raise CheckpointError(f"the latest checkpoint {step_dir} is incomplete (no state/ or meta/); "
                                      f"complete earlier steps: {', '.join(earlier) or 'none'}: point to one of "
                                      f"them explicitly, or delete the incomplete step")
            return step_dir
    raise CheckpointError(f"{path} holds no kdjax checkpoint: {hint}")


def read_meta(path: str) -> dict:
    """The ``meta`` item of the checkpoint ``path`` designates, without reading its arrays."""
    step_dir = resolve_step_dir(path)
    mngr = _manager(os.path.dirname(step_dir), create=False)
    try:
        meta = dict(mngr.restore(int(os.path.basename(step_dir)),
                                 args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir} has an unreadable meta item ({type(e).__name__}); it is "
                              f"damaged: re-create it") from None
    finally:
        mngr.close()
    _verify_meta(meta, step_dir)
    return meta


def load_model(path: str) -> Tuple[dict, dict]:
    """``({'params', 'batch_stats'}, meta)`` as numpy arrays from any kdjax checkpoint (see ``resolve_step_dir``),
    verified against the digest written with it."""
    step_dir = resolve_step_dir(path)
    mngr = _manager(os.path.dirname(step_dir), create=False)
    step = int(os.path.basename(step_dir))
    try:
        meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir} has an unreadable meta item ({type(e).__name__}); it is "
                              f"damaged: re-create it") from None
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
    except Exception as e:
        raise CheckpointError(f"checkpoint {step_dir} is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); re-create it or point to another step") from None
    finally:
        mngr.close()
    restored = jax.device_get(restored)
    _verify_meta(meta, step_dir)
    _verify(restored, meta, step_dir)
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    check_finite(variables, f"checkpoint {step_dir}", "a model with NaN or infinite weights is not used: retrain "
                 "it (a lower --config.optim.lr) or point to another checkpoint")
    return jax.tree.map(np.asarray, variables), meta


def check_meta(meta: Mapping[str, Any], path: str, **expected) -> None:
    """Fail with one line when the checkpoint's ``meta`` disagrees with what the task is configured for."""
    for key, want in expected.items():
        if want is None:
            continue
        have = meta.get(key)
        if have != want:
            raise CheckpointError(f"checkpoint {path} is for {key}={have!r}, but the config asks for {key}={want!r}: "
                                  f"point to a matching checkpoint or change the config")
