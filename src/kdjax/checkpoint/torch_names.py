"""Map a PyTorch state_dict of the original zoo onto flax variables, by name (see the rule in ``layers``)."""
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from kdjax.checkpoint.torch_pickle import brief
from kdjax.errors import KdjaxError


class CheckpointMismatch(KdjaxError, ValueError):
    """A state_dict does not fit the architecture it is loaded into."""


DATA_PARALLEL_PREFIX = "module."


def strip_data_parallel(state_dict: Mapping[str, Any]) -> Tuple[Mapping[str, Any], bool]:
    """(``state_dict`` without the ``module.`` prefix that DataParallel puts on every key, whether it had one)."""
    stripped = len(state_dict) > 0 and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict)
    if stripped:
        state_dict = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
    return state_dict, stripped


def flax_location(torch_key: str, ndim: int) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """(collection, path) of the flax variable holding ``torch_key``; None for entries flax does not keep."""
    parts = torch_key.split(".")
    module, leaf = parts[:-1], parts[-1]
    path = []
    for part in module:
        if re.fullmatch(r"\d+", part) and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    if leaf == "num_batches_tracked":
        return None
    if leaf == "running_mean":
        return "batch_stats", tuple(path) + ("mean",)
    if leaf == "running_var":
        return "batch_stats", tuple(path) + ("var",)
    if leaf == "weight":
        return "params", tuple(path) + ("kernel" if ndim > 1 else "scale",)
    if leaf == "bias":
        return "params", tuple(path) + ("bias",)
    raise CheckpointMismatch(f"unexpected state_dict entry {brief(torch_key)}")


def to_flax_layout(value: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO, Linear [out, in] -> [in, out]; vectors unchanged."""
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:
        return value.T
    return value


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _nest(flat: Dict[tuple, np.ndarray]) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return root


def convert_state_dict(state_dict: Mapping[str, np.ndarray], abstract_variables: Mapping, arch: str = "model") -> dict:
    """{'params', 'batch_stats'} as numpy float32 arrays, checked key by key and shape by shape against
    ``abstract_variables`` (e.g. ``jax.eval_shape(model.init, ...)``). The first mismatch raises."""
    expected = {(col,) + path: leaf for col in ("params", "batch_stats")
                for path, leaf in _flat(dict(abstract_variables.get(col, {}))).items()}
    found = {}
    for key, value in state_dict.items():
        value = np.asarray(value)
        loc = flax_location(key, value.ndim)
        if loc is None:
            continue
        full = (loc[0],) + loc[1]
        if full not in expected:
            raise CheckpointMismatch(f"{arch}: checkpoint entry {brief(key)} {tuple(value.shape)} has no counterpart "
                                     f"in the model (is the architecture or class count right?)")
        arr = to_flax_layout(value).astype(np.float32)
        want = tuple(expected[full].shape)
        if arr.shape != want:
            raise CheckpointMismatch(f"{arch}: checkpoint entry {brief(key)} has shape {tuple(value.shape)}, the model "
                                     f"expects {want} in flax layout {'/'.join(full)} (wrong architecture or "
                                     f"number of classes?)")
        found[full] = arr
    missing = [p for p in expected if p not in found]
    if missing:
        raise CheckpointMismatch(f"{arch}: the checkpoint lacks {'/'.join(missing[0])} "
                                 f"({len(missing)} model variables missing in all)")
    nested = _nest(found)
    return {"params": nested.get("params", {}), "batch_stats": nested.get("batch_stats", {})}


def abstract_variables(model, image_size: int):
    """Shapes of ``model``'s variables without allocating them."""
    import jax  # here, so that the name mapping (and CheckpointMismatch) imports without jax

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    # x goes in as an argument so that it is traced (a ShapeDtypeStruct closed over is not an array).
    return jax.eval_shape(lambda k, inputs: model.init(k, inputs, train=False), jax.random.key(0), x)
