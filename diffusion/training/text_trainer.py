"""Contrastive pre-training of the two text encoders (see `TextTrainConfig`).

Each batch holds B images and one caption of each (English, Chinese or mixed, drawn per step). The image tower maps
an image to a unit vector; each text encoder's caption feature, through its own linear head, to another; the loss is
CLIP's symmetric cross-entropy over the B x B similarities, once per text encoder, so both encoders learn to say
what distinguishes one image from the others: shape, colour, background, pattern, size and position alike. The
captions of one image in the three languages are pulled to the same point, which aligns the languages.

The encoders' weights are what the model keeps (their EMA, as every trainer here); the tower and heads live only in
the run's checkpoints.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, nn, ops
from PIL import Image

from diffusion.nets.layers import Conv2d
from diffusion.training.config import TextTrainConfig
from diffusion.training.data import BatchOrder, ImageTextSet, step_rng
from diffusion.training.loop import Batch, LoopTrainer, TrainingLoop

log = logging.getLogger(__name__)

# CLIP caps its learned logit scale at 100.
MAX_LOGIT_SCALE = 100.0


class ImageTower(nn.Cell):
    """Three stride-2 conv stages, global mean pooling, a linear map to the joint space."""

    def __init__(self, width: int, embed_dim: int):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width]
        layers = []
        for i in range(3):
            layers += [Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.ReLU(),
                       Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.ReLU()]
        self.body = nn.SequentialCell(layers)
        self.proj = nn.Dense(chans[-1], embed_dim, has_bias=False)

    def construct(self, x):
        return self.proj(self.body(x).mean(axis=(2, 3)))


class ContrastiveHeads(nn.Cell):
    """What the stage trains besides the encoders: the image tower, one head per text encoder, the logit scale."""

    def __init__(self, width_1: int, width_2: int, config: TextTrainConfig):
        super().__init__()
        self.tower = ImageTower(config.tower_width, config.embed_dim)
        self.head_1 = nn.Dense(width_1, config.embed_dim, has_bias=False)
        self.head_2 = nn.Dense(width_2, config.embed_dim, has_bias=False)
        # Shape (1,), not 0-d: the trainer's fused AdamW kernel does not take 0-d parameters.
        self.log_scale = Parameter(ms.Tensor([math.log(1.0 / config.temperature)], ms.float32), name="log_scale")


def _unit(x):
    return x / ops.sqrt((x * x).sum(axis=-1, keepdims=True) + 1e-12)


class ContrastiveTextLoss(nn.Cell):
    """Mean over the two text encoders of CLIP's symmetric InfoNCE between the images and their captions."""

    def __init__(self, text_encoder_1: nn.Cell, text_encoder_2: nn.Cell, heads: ContrastiveHeads):
        super().__init__()
        self.text_encoder_1 = text_encoder_1
        self.text_encoder_2 = text_encoder_2
        self.heads = heads
        self.ce = nn.CrossEntropyLoss()

    def features(self, images, ids_1, ids_2):
        """Unit image features and the two unit caption features, (B, D) each."""
        img = _unit(self.heads.tower(images))
        hidden_1 = self.text_encoder_1(ids_1)
        mask = (ids_1 != 0).astype(ms.float32).expand_dims(-1)  # the tokenizers pad with id 0
        mean_1 = (hidden_1 * mask).sum(axis=1) / ops.maximum(mask.sum(axis=1), 1.0)
        _, pooled_2 = self.text_encoder_2(ids_2)
        return img, _unit(self.heads.head_1(mean_1)), _unit(self.heads.head_2(pooled_2))

    def construct(self, images, ids_1, ids_2, labels):
        img, t1, t2 = self.features(images, ids_1, ids_2)
        scale = ops.exp(ops.clamp(self.heads.log_scale, 0.0, math.log(MAX_LOGIT_SCALE)))
        loss = 0.0
        for t in (t1, t2):
            logits = ops.matmul(img, t.T) * scale
            loss = loss + self.ce(logits, labels) + self.ce(logits.T, labels)
        return loss / 4.0


def resize_square(images: list[np.ndarray], side: int) -> np.ndarray:
    """uint8 H x W x 3 images -> float32 (N, 3, side, side) in [-1, 1] (bilinear; aspect not kept)."""
    out = np.empty((len(images), 3, side, side), np.float32)
    for i, img in enumerate(images):
        small = np.asarray(Image.fromarray(img).resize((side, side), Image.BILINEAR), np.float32)
        out[i] = small.transpose(2, 0, 1) / 127.5 - 1.0
    return out


class TextEncoderTrainer(LoopTrainer):
    """Trains `model.nets["text_encoder_1"]` and `["text_encoder_2"]` in place on every image of `data`."""

    def __init__(self, model, data: ImageTextSet, config: TextTrainConfig, run_dir: str | Path):
        if len(data) < config.batch_size:
            raise ValueError(f"the text stage's batch of {config.batch_size} needs at least that many images; "
                             f"the data set has {len(data)}")
        self.model = model
        self.config = config
        self.run_dir = Path(run_dir)
        self.images = resize_square(data.images, config.image_side)
        self.captions = data.captions
        self.order = BatchOrder({0: np.arange(len(data))}, config.batch_size, config.seed)
        mc = model.config
        ms.set_seed(config.seed)
        self.heads = ContrastiveHeads(mc.text_encoder_1.width, mc.text_encoder_2.projection_dim, config)
        te1, te2 = model.nets["text_encoder_1"], model.nets["text_encoder_2"]
        self.loss = ContrastiveTextLoss(te1, te2, self.heads)
        self.loop = TrainingLoop(self.run_dir, config,
                                 {"text_encoder_1": te1, "text_encoder_2": te2, "contrastive": self.heads}, self.loss,
                                 describe={"trainer": "text", "images": len(data)})

    def make_batch(self, micro_step: int) -> Batch:
        rng = step_rng(self.config.seed, micro_step)
        _, members = self.order.batch(micro_step)
        texts = []
        for m in members:
            options = self.captions[int(m)]
            texts.append(options[rng.integers(len(options))])
        toks = self.model.tokenizers
        labels = np.arange(len(members), dtype=np.int32)
        inputs = (self.images[members], toks["text_encoder_1"](texts), toks["text_encoder_2"](texts), labels)
        return Batch(inputs, images=len(members))

    def retrieval_accuracy(self, count: int = 256, seed: int = 1) -> dict[str, float]:
        """Share of `count` images whose own caption (one random language each) ranks first among the captions of
        the `count` images, per text encoder, with the networks as they are now."""
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = rng.choice(len(self.images), size=min(count, len(self.images)), replace=False)
        texts = [self.captions[int(i)][rng.integers(len(self.captions[int(i)]))] for i in idx]
        toks = self.model.tokenizers
        img, t1, t2 = self.loss.features(ms.Tensor(self.images[idx]), ms.Tensor(toks["text_encoder_1"](texts)),
                                         ms.Tensor(toks["text_encoder_2"](texts)))
        img = img.asnumpy()
        out = {}
        for name, t in (("text_encoder_1", t1.asnumpy()), ("text_encoder_2", t2.asnumpy())):
            sims = t @ img.T  # caption i against every image
            out[name] = float(np.mean(sims.argmax(axis=1) == np.arange(len(idx))))
        return out
