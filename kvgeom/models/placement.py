"""Where a dispatched model's tensors live: pure functions of an accelerate ``hf_device_map``, and per-device copies.

A model loaded with ``device_map`` (:func:`kvgeom.models.load_model`) is spread by accelerate over devices; each
decoder layer then computes its K/V on its own *execution* device (accelerate runs CPU- and disk-offloaded modules
on the main device), and kvgeom's hooks, plans and cache see each layer's tensors there. These functions answer,
from the device map alone (no model, no GPU needed, so they are unit-tested on the CPU with made-up maps):

* :func:`execution_device`: the device a map entry computes on (``0`` → ``cuda:0``; ``"cpu"``/``"disk"`` → the main
  device, as accelerate's ``dispatch_model`` does);
* :func:`main_device`: accelerate's main device of a map (the first GPU it names, else the CPU);
* :func:`module_device`: the execution device of one module, by the longest map key that is a prefix of its name;
* :func:`layer_devices`: each decoder layer's execution device (``decoder_layer_names`` finds the layers' names in a
  HF model);
* :func:`input_device`: where inputs go (the embedding's execution device: what kvgeom calls ``model.device``);
* :func:`placement_kwargs` / :func:`parse_max_memory`: ``--device-map`` / ``--max-memory`` checked before any work.

:class:`PerDevice` holds one tensor's copies by device, each made once: code that runs per layer (hooks, the
cache) asks it for the copy on the layer's device instead of moving the tensor on every call.

Proved by ``tests/models/test_placement.py`` (made-up two- and four-GPU maps, GPU + CPU maps, nested keys, the copy
made once per device, and hooks/cache selection indexing on each layer's device).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEVICE_MAP_STRATEGIES", "PerDevice", "decoder_layer_names", "execution_device", "input_device",
           "layer_devices", "main_device", "module_device", "parse_max_memory", "placement_kwargs"]

#: the ``device_map`` strategies HF/accelerate accept by name (a dict, or a JSON file of one, is the other form)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")

_OFFLOAD = ("cpu", "disk")


def _as_device(target: Any) -> torch.device:
    if isinstance(target, torch.device):
        return target
    if isinstance(target, int) and not isinstance(target, bool):
        return torch.device("cuda", target)
    try:
        return torch.device(str(target))
    except RuntimeError as err:
        raise ValueError(f"device map entry {target!r} is not a device: use a GPU index (0, 1, ...), 'cuda:N', "
                         "'cpu' or 'disk'") from err


def main_device(device_map: Mapping[str, Any]) -> torch.device:
    """accelerate's main device of ``device_map``: the first (lowest-numbered) GPU it names, else the CPU."""
    gpus = [_as_device(v) for v in device_map.values() if str(v) not in _OFFLOAD]
    if not gpus:
        return torch.device("cpu")
    return min(gpus, key=lambda d: (d.type, -1 if d.index is None else d.index))


def execution_device(target: Any, main: torch.device) -> torch.device:
    """The device a module placed at ``target`` computes on: offloaded (``"cpu"``, ``"disk"``) modules run on
    ``main``, as accelerate's hooks bring their weights there per call."""
    return main if str(target) in _OFFLOAD and main.type != "cpu" else _as_device(target)


def module_device(device_map: Mapping[str, Any], name: str, main: torch.device | None = None) -> torch.device:
    """Execution device of the module called ``name`` (e.g. ``"model.layers.3"``): the entry of the longest map key
    that is ``name`` or a dotted prefix of it (``""`` is the whole model)."""
    main = main_device(device_map) if main is None else main
    best: str | None = None
    for key in device_map:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    if best is None:
        keys = ", ".join(map(repr, device_map))
        raise ValueError(f"module {name!r} is in no entry of the device map (keys: {keys}): "
                         "pass a device_map that covers every module, or device_map='auto'")
    return execution_device(device_map[best], main)


def layer_devices(device_map: Mapping[str, Any], layer_names: Sequence[str]) -> tuple[torch.device, ...]:
    """Each decoder layer's execution device, in layer order (``layer_names`` from :func:`decoder_layer_names`)."""
    main = main_device(device_map)
    return tuple(module_device(device_map, n, main) for n in layer_names)


def input_device(device_map: Mapping[str, Any], embedding_name: str) -> torch.device:
    """Where a forward call's inputs go: the execution device of the embedding module ``embedding_name``."""
    return module_device(device_map, embedding_name)


def decoder_layer_names(hf: Any, n_layers: int) -> list[str]:
    """Module names of a HF causal LM's ``n_layers`` decoder layers (``model.layers.0``, ...): the first
    ``ModuleList`` of that length."""
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return [f"{name}.{i}" for i in range(n_layers)]
    raise ValueError(f"{type(hf).__name__} has no list of {n_layers} decoder layers")


_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)


def parse_max_memory(text: str) -> dict[int | str, str]:
    """``"0=70GiB,1=70GiB,cpu=200GiB"`` → ``{0: "70GiB", 1: "70GiB", "cpu": "200GiB"}`` (accelerate's
    ``max_memory``); keys are GPU indices, ``cpu`` or ``disk``, sizes a number with an optional unit (B, KB, KiB,
    MB, MiB, GB, GiB, TB, TiB). A bad entry raises ``ValueError`` naming it and the form."""
    form = "use DEVICE=SIZE pairs, comma-separated, e.g. '0=70GiB,1=70GiB,cpu=200GiB'"
    out: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not key or not _SIZE.match(size):
            raise ValueError(f"max_memory entry {part!r} is not DEVICE=SIZE: {form}")
        k: int | str = int(key) if key.isdigit() else key.lower()
        if not isinstance(k, int) and k not in _OFFLOAD:
            raise ValueError(f"max_memory device {key!r} is not a GPU index, 'cpu' or 'disk': {form}")
        out[k] = size.replace(" ", "")
    if not out:
        raise ValueError(f"max_memory {text!r} names no device: {form}")
    return out


def placement_kwargs(device_map: str | Mapping | None, max_memory: str | Mapping | None) -> dict[str, Any]:
    """``load_model``'s placement arguments from their option forms, checked before any work: ``device_map`` a
    strategy (:data:`DEVICE_MAP_STRATEGIES`), a dict, or the path of a JSON file of one; ``max_memory`` a dict or
    :func:`parse_max_memory`'s text (only with a ``device_map``). ``{}`` when neither is given."""
    if device_map in (None, ""):
        if max_memory not in (None, ""):
            raise ValueError("max_memory without device_map: pass device_map='auto' (--device-map auto) with it")
        return {}
    out: dict[str, Any] = {}
    if isinstance(device_map, Mapping):
        out["device_map"] = dict(device_map)
    elif device_map in DEVICE_MAP_STRATEGIES:
        out["device_map"] = device_map
    else:
        path = Path(str(device_map)).expanduser()
        if not path.is_file():
            raise ValueError(f"device_map {device_map!r} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) "
                             "nor a JSON file of {module: device}: pass --device-map auto, or such a file")
        try:
            dmap = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"device_map file {path}: not JSON ({err}); write {{module: device}}, "
                             "e.g. {\"model.layers.0\": 0, \"lm_head\": 1}") from None
        if not isinstance(dmap, dict) or not dmap:
            raise ValueError(f"device_map file {path}: not a non-empty JSON object of {{module: device}}")
        for target in dmap.values():
            _as_device(target)
        out["device_map"] = dmap
    if max_memory not in (None, ""):
        out["max_memory"] = dict(max_memory) if isinstance(max_memory, Mapping) else parse_max_memory(max_memory)
    return out


class PerDevice:
    """One tensor's copies by device, each made on first request and kept (never a copy per call)."""

    def __init__(self, tensor: Tensor) -> None:
        self._copies: dict[torch.device, Tensor] = {tensor.device: tensor}
        self._source = tensor
        self.copies_made = 0

    def on(self, device: torch.device | str) -> Tensor:
        device = torch.device(device)
        out = self._copies.get(device)
        if out is None:
            out = self._copies[device] = self._source.to(device)
            self.copies_made += 1
        return out
