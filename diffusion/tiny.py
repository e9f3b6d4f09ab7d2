"""Tiny random models: for tests, and the stand-in default before a trained tiny model is shipped."""
from __future__ import annotations

import tempfile
from pathlib import Path

from diffusion.config import ModelConfig, tiny_config

# A small bilingual corpus that gives the tiny tokenizers a useful vocabulary.
CORPUS = (
    "a red circle on a blue background", "a green striped square on a white background",
    "a yellow dotted triangle on a black background", "a purple checked star", "an orange heart with dots",
    "蓝色背景上的红色圆形", "白色背景上的绿色条纹正方形", "黑色背景上的黄色点状三角形", "紫色格子星形", "橙色心形",
    "一只猫 a cat on a sofa", "a photo of a mountain lake at sunrise", "山水画 landscape painting",
    "a small blue house, 小房子", "anime style girl with long hair", "masterpiece, best quality, high detail",
)


def build_tokenizers(out_dir: Path, texts=CORPUS, config: ModelConfig | None = None) -> dict[str, object]:
    """Build both tokenizers' vocabularies from `texts` into out_dir/tokenizer_{1,2} and load them."""
    from diffusion import tokenizers as tok

    config = config or tiny_config()
    d1, d2 = Path(out_dir) / "tokenizer_1", Path(out_dir) / "tokenizer_2"
    tok.build_wordpiece_vocab(list(texts), d1, max_size=config.text_encoder_1.vocab_size)
    tok.build_clip_bpe_vocab(list(texts), d2, vocab_size=config.text_encoder_2.vocab_size)
    return {
        "text_encoder_1": tok.load_tokenizer(config.text_encoder_1.tokenizer, d1),
        "text_encoder_2": tok.load_tokenizer(config.text_encoder_2.tokenizer, d2),
    }


def build_random_model(out_dir: str | Path, *, config: ModelConfig | None = None, seed: int = 0,
                       texts=CORPUS, description: str = "") -> Path:
    """Write a model directory with random weights (deterministic for a seed). Its images are noise."""
    from diffusion.model import PanGuDraw

    config = config or tiny_config()
    with tempfile.TemporaryDirectory() as tmp:
        toks = build_tokenizers(Path(tmp), texts, config)
        model = PanGuDraw.random(config, toks, seed=seed)
        return model.save(out_dir, description=description or f"{config.name}: random weights (seed {seed}), untrained")
