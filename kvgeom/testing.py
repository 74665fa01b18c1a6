"""Tiny random models of real architectures, built from configs with no download.

Used by the test-suite, the notebooks' smoke settings and the GPU benchmarks (which build full-size
random-weight models from the same configs: timing does not depend on weight values).

:func:`tiny_tokenizer` trains a small byte-level BPE tokenizer in memory, with a ChatML chat template,
so that tiny models can be chat-formatted exactly like real ones. :func:`write_tiny_gguf` writes a tiny random
qwen2 model with that tokenizer as a GGUF that both llama.cpp and kvgeom load (``tests/validate/``).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "ARCHITECTURES",
    "CHATML_TEMPLATE",
    "ChecksumJudge",
    "random_model",
    "save_tiny_checkpoint",
    "tiny_config",
    "tiny_hf_model",
    "tiny_model",
    "tiny_tokenizer",
    "write_tiny_gguf",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead and let it rise.",
    "How do I kill a Python process? Use kill with the process id, or pkill by name.",
    "I'm sorry, but I can't assist with that. I cannot help with this request.",
    "Sure, here is a short poem about the sea and the wind and the rain.",
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>#@$%^&*-+=_/\\|~`",
]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "phi3")


def tiny_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (deterministic)."""
    import copy

    return copy.deepcopy(_tiny_tokenizer(vocab_size))


@lru_cache(maxsize=4)
def _tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, *, n_layers: int = 3, vocab_size: int = 384, **overrides: Any) -> Any:
    """Config of a tiny model: d_model 256, 4 query heads, 2 KV heads (GQA), d_head 64."""
    from transformers import (
        Gemma2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    common = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=384, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    if arch == "llama":
        cfg = LlamaConfig(**common, head_dim=64)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common)
    elif arch == "mistral":
        cfg = MistralConfig(**common, head_dim=64, sliding_window=None)
    elif arch == "gemma2":
        cfg = Gemma2Config(**common, head_dim=64, query_pre_attn_scalar=64, sliding_window=64)
    elif arch == "phi3":
        cfg = Phi3Config(**common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def random_model(config: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """An HF causal LM with random weights from ``config`` (eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def tiny_hf_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 3, **overrides: Any) -> tuple[Any, Any]:
    """``(hf_model, tokenizer)``: a tiny random HF causal LM of ``arch`` whose pad/EOS ids are the tokenizer's."""
    tok = tiny_tokenizer()
    cfg = tiny_config(arch, n_layers=n_layers, **overrides)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = tok.eos_token_id
    return random_model(cfg, seed=seed), tok


def save_tiny_checkpoint(path: Any, arch: str = "llama", *, seed: int = 0, n_layers: int = 3) -> Any:
    """Save :func:`tiny_hf_model` and its tokenizer as a HF model directory at ``path`` (what
    ``load_model(path)`` reads); returns the HF model."""
    hf, tok = tiny_hf_model(arch, seed=seed, n_layers=n_layers)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


def tiny_model(arch: str = "llama", *, seed: int = 0, n_layers: int = 3, device: str = "cpu", **overrides: Any):
    """A :class:`kvgeom.models.KVModel` around a tiny random model of architecture ``arch``."""
    from kvgeom.models import wrap_hf_model

    hf, tok = tiny_hf_model(arch, seed=seed, n_layers=n_layers, **overrides)
    return wrap_hf_model(hf, tok, name=f"tiny-{arch}", device=device)


def write_tiny_gguf(path: Any, *, seed: int = 0, n_layers: int = 2) -> Any:
    """Write :func:`tiny_hf_model` ``("qwen2")`` (vocabulary cut to :func:`tiny_tokenizer`'s) as an F32 GGUF with
    the tokenizer (byte-level BPE: tokens, merges, control tokens, ``tokenizer.ggml.pre = qwen2``), its ChatML
    template and ``<|im_end|>`` as EOS; what llama.cpp needs to run it and ``transformers`` to read it back
    (qwen2 uses NeoX RoPE, so no Q/K permutation is involved). Returns the HF model written."""
    import json

    import gguf

    tok = tiny_tokenizer()
    hf, _ = tiny_hf_model("qwen2", seed=seed, n_layers=n_layers, vocab_size=len(tok))
    cfg = hf.config
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(tok))), "tiny tokenizer ids are not contiguous"
    specials = set(tok.all_special_tokens) | {"<|im_start|>"}
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("kvgeom-tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_pad_token_id(tok.pad_token_id)
    w.add_bos_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for {name}")
        w.add_tensor(gname, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


class ChecksumJudge:
    """A deterministic stand-in judge for random-weight models, which never really refuse (tests only).

    ``refused`` iff ``sum(ord(c)) % modulus != 0`` of the completion: about ``(modulus-1)/modulus`` of
    completions count as refusals, and any change of the completion (e.g. by quantization) re-draws its verdict,
    so flips happen. Never use it to measure a real model.
    """

    name = "checksum-test-judge"

    def __init__(self, modulus: int = 3) -> None:
        self.modulus = modulus

    def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
        from kvgeom.judges import Verdict

        return [Verdict.REFUSED if sum(map(ord, c)) % self.modulus else Verdict.COMPLIED for c in completions]


class SettlingChecksumJudge(ChecksumJudge):
    """:class:`ChecksumJudge` on the first ``prefix_chars`` characters of a completion, which *settles* like the
    keyword judge: a completion whose first ``prefix_chars`` characters already count as a refusal cannot change its
    verdict, so generation may stop there (``evaluate(..., settle=True)``); a compliant one is generated in full.
    On the default model the keyword judge settles refused rows after a median of 3 tokens (``docs/results.md``);
    this plants that behaviour on random-weight models, for timing. Never use it to measure a real model.
    """

    name = "settling-checksum-test-judge"

    def __init__(self, modulus: int = 3, prefix_chars: int = 12) -> None:
        super().__init__(modulus)
        if prefix_chars < 1:
            raise ValueError(f"prefix_chars must be >= 1, got {prefix_chars}")
        self.prefix_chars = prefix_chars

    def _refused(self, text: str) -> bool:
        return bool(sum(map(ord, text[:self.prefix_chars])) % self.modulus)

    def judge(self, prompts, completions, *, nll=None):  # noqa: ANN001
        from kvgeom.judges import Verdict

        return [Verdict.REFUSED if self._refused(c) else Verdict.COMPLIED for c in completions]

    def settled(self, text: str) -> bool:
        """True once the verdict is fixed as a refusal (the first ``prefix_chars`` characters are in)."""
        return len(text) >= self.prefix_chars and self._refused(text)
