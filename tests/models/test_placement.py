"""Device placement of a model spread over several devices, tested on the CPU with made-up device maps.

No test here needs a GPU: ``torch.device("cuda", 1)`` is a value, and PyTorch's ``meta`` device stands in for "a
second device" where a tensor must really live somewhere other than the CPU (an index tensor on the wrong device
is caught by the device the spy sees, not by a crash).
"""

from __future__ import annotations

import pytest
import torch

from kvgeom.models.placement import (
    PerDevice,
    decoder_layer_names,
    input_device,
    layer_devices,
    main_device,
    module_device,
)
from kvgeom.quant.plan import QuantPlan
from kvgeom.runtime import plans as plans_mod
from kvgeom.runtime.forward import select_cache_rows
from kvgeom.runtime.plans import RowGroups
from kvgeom.sites import CallInfo, HookContext
from kvgeom.testing import tiny_hf_model

CPU, META = torch.device("cpu"), torch.device("meta")
GPU0, GPU1 = torch.device("cuda", 0), torch.device("cuda", 1)

TWO_GPUS = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
            "model.norm": 1, "lm_head": 1}
NAMES = ["model.layers.0", "model.layers.1", "model.layers.2"]


def test_two_gpu_map_layers_and_inputs():
    assert layer_devices(TWO_GPUS, NAMES) == (GPU0, GPU1, GPU1)
    assert input_device(TWO_GPUS, "model.embed_tokens") == GPU0
    assert main_device(TWO_GPUS) == GPU0


def test_offloaded_layers_execute_on_the_main_gpu():
    gpu_cpu = {"model.embed_tokens": 1, "model.layers.0": 1, "model.layers.1": "cpu", "model.layers.2": "disk",
               "model.norm": "cpu", "lm_head": "cpu"}
    assert main_device(gpu_cpu) == GPU1
    assert layer_devices(gpu_cpu, NAMES) == (GPU1, GPU1, GPU1)  # accelerate brings offloaded weights to GPU 1
    assert layer_devices({"": "cpu"}, NAMES) == (CPU, CPU, CPU)  # a CPU-only map stays on the CPU


def test_longest_dotted_prefix_wins():
    dmap = {"model": "cuda:0", "model.layers.3": "cuda:1", "lm_head": 1}
    names = [f"model.layers.{i}" for i in (3, 30, 31)]
    assert layer_devices(dmap, names) == (GPU1, GPU0, GPU0)  # "model.layers.3" is no prefix of "model.layers.30"
    assert module_device(dmap, "lm_head") == GPU1
    assert module_device({"": 0}, "model.layers.7") == GPU0


def test_uncovered_module_and_bad_entry_are_named():
    with pytest.raises(ValueError, match="model.layers.0.*no entry"):
        module_device({"lm_head": 0}, "model.layers.0")
    with pytest.raises(ValueError, match="not a device"):
        layer_devices({"model": "gpu-one"}, NAMES)


def test_accelerates_own_map_over_two_fake_gpus():
    """accelerate's ``infer_auto_device_map`` with two GPU budgets (no GPU needed to plan) puts the tiny model's
    layers on both; kvgeom reads each layer's device and the input device from that map."""
    from accelerate import infer_auto_device_map

    hf, _ = tiny_hf_model("llama", n_layers=4)
    layer = sum(p.numel() * p.element_size() for p in hf.model.layers[0].parameters())
    embed = hf.model.embed_tokens.weight.numel() * 4
    dmap = infer_auto_device_map(hf, max_memory={0: embed + 2 * layer + 64, 1: 10**9, "cpu": 10**9},
                                 no_split_module_classes=hf._no_split_modules)
    names = decoder_layer_names(hf, 4)
    assert names == [f"model.layers.{i}" for i in range(4)]
    devs = layer_devices(dmap, names)
    assert set(devs) == {GPU0, GPU1}, dmap
    assert list(devs) == sorted(devs, key=lambda d: d.index)  # layers fill GPU 0 first, then GPU 1
    assert input_device(dmap, "model.embed_tokens") == GPU0


def test_per_device_copy_made_once():
    t = torch.arange(3)
    pd = PerDevice(t)
    assert pd.on(CPU) is t and pd.copies_made == 0
    a, b = pd.on(META), pd.on("meta")
    assert a is b and a.device == META and pd.copies_made == 1


def test_call_mask_copied_once_per_device():
    mask = torch.ones(2, 3, dtype=torch.bool)
    call = CallInfo(step=0, mask=mask)
    assert call.mask_on(CPU) is mask
    assert call.mask_on(META) is call.mask_on(META)
    assert call.mask_on(META).device == META
    assert CallInfo().mask_on(META) is None


def test_row_groups_index_on_each_device_built_once():
    p, q = QuantPlan("int4-token-asym"), QuantPlan("int8-token-asym")
    groups = RowGroups([p, None, q, p])
    cpu_idx = groups.index(p, CPU)
    assert cpu_idx.tolist() == [0, 3] and groups.index(q, CPU).tolist() == [2]
    meta_idx = groups.index(p, META)
    assert meta_idx.device == META and meta_idx.shape == (2,)
    assert groups.index(p, META) is meta_idx and groups.index(p, CPU) is cpu_idx  # cached per device
    groups.select([0, 2])  # row 3 finished: indices rebuilt on next use
    assert groups.index(p, CPU).tolist() == [0] and groups.index(q, CPU).tolist() == [1]


class _Layer:
    def __init__(self, device):
        self.keys = torch.zeros(3, 1, 2, 4, device=device)
        self.seen = None

    def batch_select_indices(self, indices):
        self.seen = indices


class _Cache:
    def __init__(self, devices):
        self.layers = [_Layer(d) for d in devices]


def test_cache_rows_selected_on_each_layers_device():
    cache = _Cache([CPU, META, META, CPU])
    keep = torch.tensor([0, 2])
    select_cache_rows(cache, keep)
    assert [la.seen.device for la in cache.layers] == [CPU, META, META, CPU]
    assert cache.layers[1].seen is cache.layers[2].seen  # one copy for the device, shared by its layers
    assert cache.layers[0].seen.tolist() == [0, 2]


def test_cache_rows_selection_equals_hf_on_one_device():
    from transformers import DynamicCache

    hf, _ = tiny_hf_model("llama", n_layers=2)
    k = torch.randn(3, 2, 5, 8)
    a, b = DynamicCache(config=hf.config), DynamicCache(config=hf.config)
    for c in (a, b):
        for li in range(2):
            c.update(k + li, -k - li, li)
    keep = torch.tensor([2, 0])
    a.batch_select_indices(keep)
    select_cache_rows(b, keep)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


@pytest.mark.parametrize("protect", [False, True])
def test_forward_hook_quantizes_on_the_layers_device(monkeypatch, protect):
    """A forward-mode hook at a layer whose K lives on a second device (``meta`` here) quantizes there: the rows'
    index, the call's mask and the protected channels' index are on that device, the mask copied once for all
    the hook calls of the forward call."""
    seen = []

    def spy(t, scheme, *, role, mask, site, check_finite):  # noqa: ANN001
        seen.append((t.device, None if mask is None else mask.device))
        return t

    monkeypatch.setattr(plans_mod, "fake_quant", spy)
    plan = QuantPlan("int4-token-asym", protect_channels={0: [(0, 1)], 1: [(1, 0)]} if protect else {})
    groups = RowGroups([plan, None, plan])
    hook = plans_mod._forward_hook(groups)
    mask = torch.ones(3, 4, dtype=torch.bool)
    call = CallInfo(step=0, mask=mask)
    for layer, dev in ((0, CPU), (1, META)):
        x = torch.zeros(3, 4, 2, 8, device=dev)
        out = hook(x, HookContext(name=f"blocks.{layer}.attn.hook_rot_k", site="rot_k", layer=layer, call=call))
        assert out.device == dev
    assert seen == [(CPU, CPU), (META, META)]
    assert list(call._masks) == [META]  # one copy of the mask, for the second device


def test_placement_options_checked_before_work(tmp_path):
    from kvgeom.models.placement import parse_max_memory, placement_kwargs

    assert parse_max_memory("0=70GiB, 1=70 GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert placement_kwargs(None, None) == {}
    assert placement_kwargs("auto", "0=1GB") == {"device_map": "auto", "max_memory": {0: "1GB"}}
    f = tmp_path / "map.json"
    f.write_text('{"model": 0, "lm_head": 1}')
    assert placement_kwargs(str(f), None) == {"device_map": {"model": 0, "lm_head": 1}}
    for dmap, mem, why in (("nope", None, "neither a strategy"), (None, "0=1GB", "without device_map"),
                           ("auto", "gpu=1GB", "not a GPU index"), ("auto", "0=lots", "not DEVICE=SIZE")):
        with pytest.raises(ValueError, match=why):
            placement_kwargs(dmap, mem)


def test_audit_refuses_a_bad_device_map_before_loading(capsys):
    from kvgeom.cli import main

    assert main(["audit", "--device-map", "auto", "--max-memory", "0=lots"]) == 2
    assert "--max-memory" in capsys.readouterr().err
