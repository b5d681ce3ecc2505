"""Every Hugging Face family ``load_hf`` and ``save_hf`` know, one entry each in one table (``FAMILIES``).

An entry says how a ``config.json`` names the family (``model_type``, else ``architectures``), how its
config maps to a ``Config`` and back, which tensors its checkpoints hold (a ``Slot`` table), and whether
``save_hf`` writes a given ``Config`` as it. The functions an entry points at live in the family's
module: ``gpt2``, ``families`` (the Llama-like ones), ``neox``, ``gemma``.

Adding a family is adding an entry plus a test (``docs/pretrained.md``, "Adding a family"): write the
family's ``config_from_hf``, ``config_to_hf`` and ``tensor_slots`` (a Llama-like family needs none:
``_llama_like(model_type, architecture)`` is its entry), list it here, and add its tiny config to
``tests/hf_tiny.py``, which the registry and parity tests run over. GPT-2's entry::

    Family("gpt2", "GPT2LMHeadModel", gpt2.config_from_hf, gpt2.config_to_hf, gpt2.tensor_slots, gpt2.expresses,
           buffers=(".attn.bias", ".attn.masked_bias"), base_prefix="transformer.")
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from ftransformer.config import Config
from ftransformer.interop import families, gemma, gpt2, neox
from ftransformer.interop.families import Slot

ROTARY_BUFFERS = (".rotary_emb.inv_freq",)  # older transformers versions saved rotary frequencies beside the weights


@dataclass(frozen=True)
class Family:
    """One Hugging Face family: how it is recognized, its config in and out, its tensors.

    ``config_in`` refuses what it cannot express by name; ``config_out`` gives every ``config.json`` key
    but ``model_type`` and ``architectures`` (``config_json`` adds them) and refuses what the family
    cannot express. ``writes(cfg)``: whether ``save_hf`` writes ``cfg`` as this family (the first entry
    that says so wins; it may raise a ``ValueError`` naming the field when ``cfg`` is of its kind but no
    family of the kind expresses it). ``buffers``: suffixes of stored names that hold no parameters
    (skipped). ``base_prefix``: the LM's names for the base model's tensors start with it, and a base
    model's checkpoint leaves it out (both are read; it is written).
    """

    model_type: str
    architecture: str
    config_in: Callable[[Mapping], Config]
    config_out: Callable[[Config], dict]
    slots: Callable[[Config], list[Slot]]
    writes: Callable[[Config], bool]
    buffers: tuple[str, ...] = ROTARY_BUFFERS
    base_prefix: str = ""

    def config_json(self, cfg: Config) -> dict:
        """The ``config.json`` contents that ``transformers`` reads back as ``cfg``'s model of this family."""
        return {"architectures": [self.architecture], "model_type": self.model_type, **self.config_out(cfg)}


def _llama_kind(cfg: Config) -> bool:
    """Whether ``cfg`` is written as a Llama-like family: it is not GPT-2's, GPT-NeoX's or Gemma's kind."""
    return not (gpt2.expresses(cfg) or neox.expresses(cfg) or gemma.expresses(cfg))


def _llama_like(model_type: str, architecture: str) -> Family:
    """A Llama-like family: Llama's tensor names, features switched on by ``families.family_for``."""
    return Family(
        model_type, architecture, partial(families.config_from_hf, family=model_type), families.config_to_hf,
        partial(families.tensor_slots, family=model_type),
        writes=lambda cfg: _llama_kind(cfg) and families.family_for(cfg) == model_type,
    )


def _gemma(model_type: str, architecture: str) -> Family:
    """A Gemma: Llama's tensor names, the features ``gemma.family_for`` picks."""
    return Family(
        model_type, architecture, partial(gemma.config_from_hf, family=model_type), gemma.config_to_hf,
        partial(families.tensor_slots, family=model_type),
        writes=lambda cfg: gemma.expresses(cfg) and gemma.family_for(cfg) == model_type,
    )


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("gpt2", "GPT2LMHeadModel", gpt2.config_from_hf, gpt2.config_to_hf, gpt2.tensor_slots, gpt2.expresses,
           buffers=(".attn.bias", ".attn.masked_bias"), base_prefix="transformer."),
    _llama_like("llama", "LlamaForCausalLM"),
    _llama_like("mistral", "MistralForCausalLM"),
    _llama_like("qwen2", "Qwen2ForCausalLM"),
    _llama_like("qwen3", "Qwen3ForCausalLM"),
    _llama_like("olmo2", "Olmo2ForCausalLM"),
    _llama_like("phi3", "Phi3ForCausalLM"),
    Family("gpt_neox", "GPTNeoXForCausalLM", neox.config_from_hf, neox.config_to_hf, neox.tensor_slots, neox.expresses,
           buffers=(*ROTARY_BUFFERS, ".attention.bias", ".attention.masked_bias")),
    _gemma("gemma", "GemmaForCausalLM"),
    _gemma("gemma2", "Gemma2ForCausalLM"),
    _gemma("gemma3_text", "Gemma3ForCausalLM"),
)}


def family_of(hf: Mapping) -> Family:
    """The family a ``config.json`` describes, from ``model_type`` (else ``architectures``)."""
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    by_architecture = {f.architecture: f for f in FAMILIES.values()}
    for arch in hf.get("architectures") or ():
        if arch in by_architecture:
            return by_architecture[arch]
    raise ValueError(
        f"unsupported model family: model_type={model_type!r}, architectures={hf.get('architectures')!r}; "
        f"supported model_type: {', '.join(FAMILIES)} (architectures: {', '.join(by_architecture)})"
    )


def family_for(cfg: Config) -> Family:
    """The family ``save_hf`` writes ``cfg`` as; a ``ValueError`` names the field no family can express."""
    for family in FAMILIES.values():
        if family.writes(cfg):
            return family
    raise ValueError(f"no Hugging Face family expresses {cfg}")  # every kind's writes names why first
