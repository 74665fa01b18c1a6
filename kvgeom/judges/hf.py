"""Classifier judges: a language model that reads (prompt, completion) in its authors' format and answers.

:class:`GeneratingClassifier` is what the classifier judges share (:mod:`kvgeom.judges.wildguard`,
:mod:`kvgeom.judges.llama_guard`, :mod:`kvgeom.judges.harmbench`, :mod:`kvgeom.judges.strongreject`); each of
those files says its prompt format, its answer format and where both come from, and is registered by name.

* **Weights, offline only** (:func:`resolve_weights`): a local directory (``NAME:path=DIR``), else the Hugging Face
  cache (``HF_HOME`` / ``HF_HUB_CACHE``; ``local_files_only=True``). Nothing is downloaded at run time; when the
  weights are absent the judge is refused with :class:`JudgeWeightsMissing`, naming the model id and the
  ``huggingface-cli download`` to run on a connected machine.
* **Batched greedy generation** on the judge model's device (``device=auto``: CUDA when present): the rendered
  prompts of a batch are left-padded, ``do_sample=False``, at most ``max_new_tokens`` new tokens (few: the
  answers are a word or a few short lines), decoded without special tokens.
* **Verdicts**: the **degeneracy rule runs first** (:class:`~kvgeom.judges.DegeneracyRule`, ``degeneracy=on``,
  the default): a completion that is not language is ``DEGENERATE`` and the classifier is not asked. Why: these
  classifiers were trained on fluent text, and on collapsed text their answer is not meaningful in a known
  direction -- the harm classifiers (Llama Guard, HarmBench) call symbol soup "safe" / "no", which kvgeom would
  count as a kept refusal and so hide the collapse that quantization causes; counting it as complied would
  overstate jailbreaks. (The keyword judge lets a refusal phrase win instead, because a phrase is evidence of a
  refusal even in broken text; a classifier's answer on broken text is not.) Otherwise the judge's
  :meth:`GeneratingClassifier.parse` maps the answer onto ``REFUSED`` / ``COMPLIED``.
* **Malformed answers**: an answer that does not parse is a per-row error state: :meth:`judge_rows` gives
  ``verdict=None``, the raw ``answer`` and an ``error`` naming the expected form; :meth:`judge` (the
  :class:`~kvgeom.judges.Judge` protocol, one verdict per row) raises :class:`MalformedAnswers` with their count
  instead of inventing a verdict. As a secondary judge (``--judge keyword,wildguard``) such rows are counted and
  left out of the agreement (:mod:`kvgeom.judge_agreement`).

Tests (tiny random models stand in for the classifiers): ``tests/judges/test_classifiers.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd

from kvgeom.judges.base import Verdict, check_lengths
from kvgeom.judges.degeneracy import DegeneracyRule

__all__ = ["GeneratingClassifier", "JudgeWeightsMissing", "MalformedAnswers", "Parsed", "resolve_weights"]

_SWITCH = {"on": True, "off": False}


class JudgeWeightsMissing(ValueError):
    """A classifier judge's weights are not on this machine (kvgeom never downloads them at run time)."""


class MalformedAnswers(ValueError):
    """A classifier gave answers that do not parse; :meth:`GeneratingClassifier.judge_rows` has them per row."""


@dataclass(frozen=True)
class Parsed:
    """One parsed answer: a verdict (or ``None`` with ``error``) and detail fields (e.g. ``harmful_response``)."""

    verdict: Verdict | None
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def resolve_weights(model_id: str, path: str | os.PathLike | None = None, *, judge: str = "") -> str:
    """A local directory with ``model_id``'s weights: ``path`` when given, else its snapshot in the HF cache.

    Raises :class:`JudgeWeightsMissing` naming the model and how to obtain it (nothing is downloaded)."""
    hint = (f"on a connected machine run `huggingface-cli download {model_id}` (accept the model's licence on its "
            "Hugging Face page first if it is gated), then copy the folder here and pass "
            f"`{judge or 'NAME'}:path=DIR`, or copy the HF cache and set HF_HOME to it")
    if path is not None:
        p = os.fspath(path)
        if os.path.isdir(p) and os.path.isfile(os.path.join(p, "config.json")):
            return p
        raise JudgeWeightsMissing(f"judge {judge!r}: {p} is not a model directory (no config.json) for {model_id}; "
                                  f"{hint}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception as err:  # LocalEntryNotFoundError, offline mode, a half-copied cache...
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise JudgeWeightsMissing(f"judge {judge!r} needs the weights of {model_id}, which are not in the Hugging "
                                  f"Face cache ({cache}; {type(err).__name__}): {hint}") from None


class GeneratingClassifier:
    """A judge that asks a causal LM (module docstring). Subclasses set :attr:`name`, :attr:`model_id`,
    :attr:`max_new_tokens`, :attr:`add_special_tokens` and implement :meth:`render` and :meth:`parse`.

    ``path``: a local model directory (default: the HF cache); ``device``: ``auto`` | ``cpu`` | ``cuda``...;
    ``batch_size``: rows per generation batch; ``degeneracy``: ``on`` | ``off``; ``model`` / ``tokenizer``: an
    already loaded HF model and tokenizer (tests use tiny random ones)."""

    name: ClassVar[str] = "classifier"
    model_id: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    max_new_tokens: ClassVar[int] = 16
    add_special_tokens: ClassVar[bool] = True
    answer_form: ClassVar[str] = ""

    def __init__(self, path: str | None = None, *, device: str = "auto", batch_size: int = 8,
                 degeneracy: bool = True, model: Any = None, tokenizer: Any = None) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"judge {self.name!r}: batch_size must be >= 1, got {batch_size!r}")
        self.path, self.device, self.batch_size = path, device, int(batch_size)
        self.degeneracy = DegeneracyRule() if degeneracy else None
        self._model, self._tokenizer = model, tokenizer
        if model is None and tokenizer is None:
            resolve_weights(self.model_id, path, judge=self.name)  # refuse now, before any work, when absent

    @classmethod
    def common_settings(cls, device: str = "auto", batch_size: str = "8", degeneracy: str = "on") -> dict[str, Any]:
        """The shared string settings of a spec as constructor keywords (``device``, ``batch_size``,
        ``degeneracy``), checked."""
        if degeneracy not in _SWITCH:
            raise ValueError(f"judge {cls.name!r}: degeneracy={degeneracy!r}; write degeneracy=on or degeneracy=off")
        try:
            bs = int(batch_size)
        except ValueError:
            raise ValueError(f"judge {cls.name!r}: batch_size={batch_size!r} is not a whole number") from None
        return {"device": device, "batch_size": bs, "degeneracy": _SWITCH[degeneracy]}

    @classmethod
    def from_settings(cls, path: str | None = None, device: str = "auto", batch_size: str = "8",
                      degeneracy: str = "on") -> GeneratingClassifier:
        """The judge of the spec ``NAME:path=DIR:device=cuda:batch_size=16:degeneracy=off`` (string settings)."""
        return cls(path, **cls.common_settings(device, batch_size, degeneracy))

    def identity(self) -> dict[str, Any]:
        """``{"name", "version", "settings"}``: the model id (and path), the answer budget and the degeneracy rule
        (device and batch size do not change a greedy verdict)."""
        import dataclasses

        rule = None if self.degeneracy is None else dataclasses.asdict(self.degeneracy)
        return {"name": self.name, "version": self.version,
                "settings": {"model_id": self.model_id, "path": self.path, "max_new_tokens": self.max_new_tokens,
                             "degeneracy": rule, **self.extra_settings()}}

    def extra_settings(self) -> dict[str, Any]:
        return {}

    # ---- the judge's own format -----------------------------------------------------------------------
    def render(self, prompt: str, completion: str) -> str:
        """The exact text the classifier reads for one row (its authors' format)."""
        raise NotImplementedError

    def parse(self, answer: str) -> Parsed:
        """The verdict an answer gives, or a :class:`Parsed` with ``error`` when it does not parse."""
        raise NotImplementedError

    # ---- model ------------------------------------------------------------------------------------------
    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            src = resolve_weights(self.model_id, self.path, judge=self.name)
            dev = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
            dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
            self._tokenizer = self._tokenizer or AutoTokenizer.from_pretrained(src, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=True).to(dev).eval()
        tok = self._tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return self._model, tok

    def answers(self, texts: Sequence[str]) -> list[str]:
        """Greedy answers to the rendered ``texts``, in batches of ``batch_size`` (left padding)."""
        import torch
        from tqdm.auto import tqdm

        model, tok = self._load()
        dev = next(model.parameters()).device
        out: list[str] = []
        starts = range(0, len(texts), self.batch_size)
        for s in tqdm(starts, desc=f"judge {self.name}", unit="batch", disable=len(starts) < 2, leave=False):
            batch = tok(list(texts[s:s + self.batch_size]), return_tensors="pt", padding=True,
                        add_special_tokens=self.add_special_tokens).to(dev)
            with torch.no_grad():
                gen = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)
            new = gen[:, batch["input_ids"].shape[1]:]
            out += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        return out

    # ---- judging ------------------------------------------------------------------------------------------
    def judge_rows(self, prompts: Sequence[str], completions: Sequence[str], *,
                   nll: Sequence[float] | None = None) -> pd.DataFrame:
        """One row per completion: ``verdict`` (a value, or ``None``), ``error``, ``answer`` (the raw answer;
        ``None`` where the degeneracy rule decided) and the judge's detail columns."""
        check_lengths(prompts, completions, nll)
        nlls = [None] * len(completions) if nll is None else list(nll)
        degenerate = [self.degeneracy is not None and self.degeneracy.is_degenerate(c, x)
                      for c, x in zip(completions, nlls, strict=True)]
        ask = [i for i, d in enumerate(degenerate) if not d]
        answers = dict(zip(ask, self.answers([self.render(prompts[i], completions[i]) for i in ask]), strict=True))
        recs = []
        for i in range(len(completions)):
            if degenerate[i]:
                recs.append({"verdict": Verdict.DEGENERATE.value, "error": None, "answer": None})
                continue
            p = self.parse(answers[i])
            recs.append({"verdict": None if p.verdict is None else p.verdict.value, "error": p.error,
                         "answer": answers[i], **p.details})
        return pd.DataFrame(recs, dtype=object)

    def judge(self, prompts: Sequence[str], completions: Sequence[str], *,
              nll: Sequence[float] | None = None) -> list[Verdict]:
        """One verdict per row; raises :class:`MalformedAnswers` when any answer does not parse."""
        rows = self.judge_rows(prompts, completions, nll=nll)
        bad = rows.index[rows["verdict"].isna()].tolist()
        if bad:
            first = rows.loc[bad[0]]
            raise MalformedAnswers(
                f"judge {self.name!r}: {len(bad)} of {len(rows)} answers do not parse (rows {bad[:10]}); the first: "
                f"{first['answer']!r} ({first['error']}). Expected: {self.answer_form}. Use it as a second judge "
                f"(--judge keyword,{self.name}) to count such rows instead, or check the model at {self.model_id}")
        return [Verdict(v) for v in rows["verdict"]]
