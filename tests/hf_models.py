"""Hugging Face models from small configs (never downloaded), for tests and benches.

``hf_model(name, n, size)`` builds one of :data:`NAMES` (GPT-2, BERT, ViT,
ResNet, MobileNetV2) in eval mode with seeded weights, and ``n`` seeded keyword
inputs. :data:`TINY` keeps float64 oracles cheap (tests); :data:`SMALL` is the
size of the cost model's calibration and the benches.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

Inputs = dict[str, Tensor]


@dataclass(frozen=True)
class Size:
    """Shared shape knobs of every builder."""

    width: int
    layers: int
    vocab: int
    tokens: int
    image: int
    channels: int
    labels: int
    depth_multiplier: float


TINY = Size(8, 1, 13, 4, 12, 2, 3, 0.25)
SMALL = Size(32, 2, 64, 8, 16, 3, 10, 0.35)


def _transformer(s: Size) -> dict:
    """The keyword names BERT and ViT configs share."""
    return dict(
        hidden_size=s.width,
        num_hidden_layers=s.layers,
        num_attention_heads=2,
        intermediate_size=2 * s.width,
    )


def _configs(s: Size) -> dict[str, tuple[str, str, dict]]:
    """name -> (config class, model class, config keywords)."""
    return {
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            dict(
                vocab_size=s.vocab,
                n_positions=2 * s.tokens,
                n_embd=s.width,
                n_layer=s.layers,
                n_head=2,
                bos_token_id=0,
                eos_token_id=0,
            ),
        ),
        "bert": (
            "BertConfig",
            "BertForSequenceClassification",
            dict(
                vocab_size=s.vocab,
                max_position_embeddings=2 * s.tokens,
                num_labels=s.labels,
                **_transformer(s),
            ),
        ),
        "vit": (
            "ViTConfig",
            "ViTForImageClassification",
            dict(
                image_size=s.image,
                patch_size=4,
                num_channels=s.channels,
                num_labels=s.labels,
                **_transformer(s),
            ),
        ),
        "resnet": (
            "ResNetConfig",
            "ResNetForImageClassification",
            dict(
                num_channels=s.channels,
                embedding_size=s.width // 2,
                hidden_sizes=[s.width // 2, s.width],
                depths=[1, 1],
                num_labels=s.labels,
                layer_type="basic",
            ),
        ),
        "mobilenet_v2": (
            "MobileNetV2Config",
            "MobileNetV2ForImageClassification",
            dict(
                num_channels=s.channels,
                image_size=s.image,
                depth_multiplier=s.depth_multiplier,
                min_depth=4,
                num_labels=s.labels,
            ),
        ),
    }


NAMES = tuple(_configs(TINY))


def _inputs(name: str, n: int, s: Size, seed: int) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    if name in ("gpt2", "bert"):
        x = {"input_ids": torch.randint(0, s.vocab, (n, s.tokens), generator=gen)}
        if name == "bert":
            mask = torch.ones(n, s.tokens, dtype=torch.long)
            mask[0, -1] = 0  # one padded position
            x["attention_mask"] = mask
        return x
    shape = (n, s.channels, s.image, s.image)
    return {"pixel_values": torch.randn(shape, generator=gen)}


def hf_model(
    name: str, n: int, size: Size = TINY, seed: int = 1
) -> tuple[nn.Module, Inputs]:
    """Model ``name`` (seeded weights, eval mode) and ``n`` inputs drawn from ``seed``."""
    import transformers

    config_cls, model_cls, kwargs = _configs(size)[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(
        getattr(transformers, config_cls)(**kwargs)
    )
    return model.eval(), _inputs(name, n, size, seed)


def gpt2_small_block(n: int, t: int, tied: bool = False) -> tuple[nn.Module, Inputs]:
    """One transformer block shaped like GPT-2 small: D=768, 12 heads, V=50257.

    ``tied=False`` unties the read-out from the token embedding (as many newer
    language models do); GPT-2 itself ties them.
    """
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=50257,
        n_positions=max(t, 8),
        n_embd=768,
        n_layer=1,
        n_head=12,
        tie_word_embeddings=tied,
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50257, (n, t), generator=gen)
    return transformers.GPT2LMHeadModel(cfg).eval(), {"input_ids": ids}


def gpt2_at_width(width: int, size: Size = TINY, **config: object) -> nn.Module:
    """GPT-2 (language-model head) of :data:`TINY` shape with ``n_embd = width``.

    Its own initialization (weights N(0, 0.02^2) at every width: the standard
    parametrization); ``config`` overrides fields of ``GPT2Config`` (dropout...).
    """
    import transformers

    _, _, kwargs = _configs(replace(size, width=width))["gpt2"]
    cfg = transformers.GPT2Config(**{**kwargs, **config})
    return transformers.GPT2LMHeadModel(cfg)
