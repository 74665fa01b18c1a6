"""What :func:`kvgeom.models.load_model` returns: :class:`KVModel` (bridge, tokenizer, chat formatting) and its
:class:`ModelFacts`.

Hook sessions opened on a model are a declared field, :attr:`KVModel.hook_sessions` (outermost first), owned by
:func:`kvgeom.runtime.hooks.kv_hooks` (nesting proved in ``tests/runtime/test_hooks.py``). Models sit below the
runtime and never import it: the session type comes from :mod:`kvgeom.sites`, and :meth:`KVModel.kv_hooks` calls
:attr:`KVModel.open_hooks`, which the runtime sets to its ``kv_hooks`` when it is imported (``import kvgeom`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from kvgeom.sites import SITES, HookSession, hook_name

#: ``opener(model, hooks, **kwargs)``: a ``with`` block holding one hook session (:func:`kvgeom.runtime.hooks.kv_hooks`)
HookOpener = Callable[..., AbstractContextManager[HookSession]]


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelFacts:
    """Shape facts about a decoder-only transformer, read from its config."""

    architecture: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    vocab_size: int
    rotary: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelFacts:
        text = getattr(config, "text_config", None) or config
        n_heads = int(text.num_attention_heads)
        d_model = int(text.hidden_size)
        d_head = getattr(text, "head_dim", None) or d_model // n_heads
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        rotary = rope is not None or getattr(text, "rope_theta", None) is not None
        archs = getattr(config, "architectures", None) or [type(config).__name__]
        return cls(
            architecture=str(archs[0]),
            model_type=str(getattr(config, "model_type", "")),
            n_layers=int(text.num_hidden_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_head=int(d_head),
            d_model=d_model,
            vocab_size=int(text.vocab_size),
            rotary=bool(rotary),
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KVModel:
    """A chat model ready for K/V analysis.

    Attributes:
        bridge: the TransformerLens ``TransformerBridge`` (hook points ``blocks.{l}.attn.hook_k``,
            ``hook_rot_k``, ``hook_v``, ``blocks.{l}.hook_resid_pre``, ...).
        tokenizer: the HF tokenizer (``padding_side`` is set per call; kvgeom pads on the left).
        facts: :class:`ModelFacts`.
        name: what the user asked for; ``source``: the file or directory loaded.
        chat_template: a Jinja template overriding the tokenizer's own (``None``: use the tokenizer's).
        sites_available: the sites the bridge really fires for this architecture (probed at wrap time).
        attention: how attention is computed, ``"sdpa"`` (one fused kernel where the architecture allows) or
            ``"eager"`` (the bridge's own); set by :func:`kvgeom.models.attention.use_attention` only.
        hook_sessions: the :class:`kvgeom.sites.HookSession` s of the ``kv_hooks`` blocks open on this
            model, outermost first; each forward call is announced to all of them. Managed by ``kv_hooks``
            only: do not edit.
    """

    #: what :meth:`kv_hooks` calls: :func:`kvgeom.runtime.hooks.kv_hooks`, set by that module when it is imported
    open_hooks: ClassVar[HookOpener | None] = None

    bridge: Any
    tokenizer: Any
    facts: ModelFacts
    name: str
    source: str
    device: torch.device
    dtype: torch.dtype
    chat_template: str | None = None
    system_prompt: str | None = None
    info: dict = field(default_factory=dict)
    sites_available: tuple[str, ...] = tuple(SITES)
    attention: str = "eager"
    hook_sessions: list[HookSession] = field(default_factory=list, repr=False, compare=False)

    # ---- facts -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.facts.n_layers

    @property
    def n_heads(self) -> int:
        return self.facts.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.facts.n_kv_heads

    @property
    def d_head(self) -> int:
        return self.facts.d_head

    @property
    def d_model(self) -> int:
        return self.facts.d_model

    @property
    def hf_model(self) -> Any:
        return self.bridge.original_model

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id):
            if cand is not None:
                return int(cand)
        return 0

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen = getattr(self.hf_model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
        return ids

    # ---- chat formatting -----------------------------------------------------------------------
    def format_chat(self, prompts: str | Sequence[str], *, system: str | None = None) -> list[str]:
        """Apply the chat template (with the generation prompt) to each user message."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not self.has_chat_template:
            raise ModelLoadError(
                f"model {self.name!r} has no chat template; pass one with "
                "load_model(..., chat_template='{% for m in messages %}...') or set model.chat_template"
            )
        system = system if system is not None else self.system_prompt
        out = []
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}")
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": p}
            ]
            out.append(
                self.tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
                )
            )
        return out

    def hook_name(self, site: str, layer: int) -> str:
        """Readable hook-point name of ``site`` at ``layer`` (see :data:`kvgeom.sites.SITES`)."""
        return hook_name(site, layer)

    def kv_hooks(self, hooks: Any, **kwargs: Any) -> AbstractContextManager[HookSession]:
        """Shortcut for :func:`kvgeom.runtime.hooks.kv_hooks` on this model (through :attr:`open_hooks`: the
        runtime sits above models and hands its ``kv_hooks`` down, so models never import the runtime)."""
        opener = type(self).open_hooks
        if opener is None:
            raise RuntimeError("KVModel.kv_hooks needs kvgeom.runtime.hooks, which is not imported yet: "
                               "import kvgeom (or kvgeom.runtime) first")
        return opener(self, hooks, **kwargs)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "chat_template": self.has_chat_template,
            "sites": list(self.sites_available),
            **self.facts.to_dict(),
            **self.info,
        }
