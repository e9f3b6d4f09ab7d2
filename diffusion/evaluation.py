"""Evaluation on the synthetic data set: a small CNN reads shape, colour, background and fill pattern back from an
image; prompt adherence is its accuracy against what the prompt asked, per attribute; and the Fréchet distance
between its features of generated and real images is an FID analogue (FID uses Inception-v3 features instead).

The classifier is trained on real synthetic images only (every combination, held-out ones included, since it is the
measuring instrument), all sizes resized to 64x64. `pangudraw eval` and benchmarks/time_decoupled.py use it.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from PIL import Image

from diffusion import synthetic
from diffusion.control import FOREGROUND_DISTANCE, foreground_mask  # noqa: F401  (layout measures)
from diffusion.nets.layers import Conv2d
from schemas.errors import UserError

log = logging.getLogger(__name__)

INPUT_SIZE = 64
HEADS: dict[str, tuple[str, ...]] = dict(synthetic.ATTRIBUTE_VALUES)
CLASSIFIER_WEIGHTS = "classifier.safetensors"
CLASSIFIER_INFO = "classifier.json"


def shipped_classifier_dir() -> Path:
    """The classifier trained by `pangudraw eval train-classifier` with its defaults, kept in the repository."""
    return Path(__file__).resolve().parent / "shipped" / "synthetic-classifier"


class AttributeClassifier(nn.Cell):
    """Four stride-2 conv stages (64 -> 8 pixels), global mean and max pooling, one linear head per attribute.

    Returns (features, shape logits, colour logits, background logits, pattern logits); the 2*width pooled
    features are what the Fréchet distance compares.
    """

    def __init__(self, width: int = 48):
        super().__init__()
        chans = [3, width // 2, width, width, width]
        layers = []
        for i in range(4):
            layers += [Conv2d(chans[i], chans[i + 1], 3, stride=1, padding=1),
                       nn.ReLU(),
                       Conv2d(chans[i + 1], chans[i + 1], 3, stride=2, padding=1),
                       nn.ReLU()]
        self.body = nn.SequentialCell(layers)
        self.feature_dim = 2 * width
        self.head_shape = nn.Dense(self.feature_dim, len(HEADS["shape"]))
        self.head_colour = nn.Dense(self.feature_dim, len(HEADS["colour"]))
        self.head_background = nn.Dense(self.feature_dim, len(HEADS["background"]))
        self.head_pattern = nn.Dense(self.feature_dim, len(HEADS["pattern"]))

    def construct(self, x):
        h = self.body(x)
        features = ops.concat((h.mean(axis=(2, 3)), h.max(axis=(2, 3))), axis=1)
        return (features, self.head_shape(features), self.head_colour(features), self.head_background(features),
                self.head_pattern(features))


class _ClassifierLoss(nn.Cell):
    def __init__(self, net: AttributeClassifier):
        super().__init__()
        self.net = net
        self.ce = nn.CrossEntropyLoss()

    def construct(self, x, y_shape, y_colour, y_background, y_pattern):
        _, s, c, b, p = self.net(x)
        return self.ce(s, y_shape) + self.ce(c, y_colour) + self.ce(b, y_background) + self.ce(p, y_pattern)


def preprocess(images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (H, W, 3) images of any size -> float32 (N, 3, 64, 64) in [-1, 1] (bilinear resize)."""
    out = np.empty((len(images), 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, img in enumerate(images):
        if img.shape[:2] != (INPUT_SIZE, INPUT_SIZE):
            img = np.asarray(Image.fromarray(img).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR))
        out[i] = img.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0
    return out


class Classifier:
    """A trained AttributeClassifier with batched, compiled inference."""

    def __init__(self, net: AttributeClassifier, info: dict | None = None):
        self.net = net
        self.net.set_train(False)
        self.info = info or {}
        self._forward = ms.jit(net.construct)

    def _run(self, images: Sequence[np.ndarray], batch: int = 64):
        outs = None
        for start in range(0, len(images), batch):
            chunk = preprocess(images[start:start + batch])
            n = len(chunk)
            if n < batch:  # pad to one compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            res = [o.asnumpy()[:n] for o in self._forward(ms.Tensor(chunk))]
            outs = res if outs is None else [np.concatenate([a, b]) for a, b in zip(outs, res)]
        return outs

    def predict(self, images: Sequence[np.ndarray]) -> dict[str, list[str]]:
        """Each attribute's predicted value name per image."""
        outs = self._run(images)
        return {attr: [HEADS[attr][i] for i in outs[k + 1].argmax(axis=1)] for k, attr in enumerate(HEADS)}

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self._run(images)[0].astype(np.float64)

    def save(self, path: str | Path) -> Path:
        from diffusion import checkpoints

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        checkpoints.save_weights(self.net, root / CLASSIFIER_WEIGHTS)
        info = {**self.info, "width": self.net.feature_dim // 2, "heads": {k: list(v) for k, v in HEADS.items()}}
        (root / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return root

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Classifier":
        from diffusion import checkpoints

        root = Path(path) if path is not None else shipped_classifier_dir()
        info_file = root / CLASSIFIER_INFO
        if not info_file.is_file():
            raise UserError(f"{info_file} is missing: train a classifier with `pangudraw eval train-classifier`")
        info = json.loads(info_file.read_text())
        if info.get("heads") != {k: list(v) for k, v in HEADS.items()}:
            raise UserError(f"{info_file}: the classifier's labels differ from this version's synthetic attributes")
        net = AttributeClassifier(int(info["width"]))
        checkpoints.load_weights(net, root / CLASSIFIER_WEIGHTS)
        return cls(net, info)


def _labels(rows: Sequence[dict]) -> list[np.ndarray]:
    return [np.array([HEADS[a].index(r[a]) for r in rows], dtype=np.int32) for a in HEADS]


def train_classifier(config: synthetic.SyntheticConfig | None = None, *, steps: int = 600, batch_size: int = 64,
                     learning_rate: float = 2e-3, seed: int = 0, width: int = 48) -> Classifier:
    """Train the attribute classifier on freshly generated real synthetic images (held-out combinations included).

    Low-resolution images are upsampled to their bucket first, as any image is resized to 64x64 for reading.
    Light Gaussian pixel noise is added so that the slightly noisy output of a generator is read the same way.
    """
    from diffusion import runtime

    runtime.configure("cpu")
    config = config or synthetic.SyntheticConfig(num_images=6000, seed=101, include_heldout=True)
    rows = list(synthetic.generate_rows(config))
    images = preprocess([synthetic.decode_image(r["image"]) for r in rows])
    labels = _labels(rows)
    ms.set_seed(seed)
    net = AttributeClassifier(width)
    loss_cell = _ClassifierLoss(net)
    params = net.trainable_params()
    optimizer = nn.Adam(params, learning_rate=learning_rate)
    grad_fn = ms.value_and_grad(loss_cell, None, optimizer.parameters)

    @ms.jit
    def train_step(x, a, b, c, d):
        loss, grads = grad_fn(x, a, b, c, d)
        optimizer(grads)
        return loss

    net.set_train(True)
    rng = np.random.Generator(np.random.PCG64(seed))
    t0 = time.perf_counter()
    order = np.array([], dtype=np.int64)
    loss = float("nan")
    for step in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(rows))])
        idx, order = order[:batch_size], order[batch_size:]
        x = images[idx] + rng.normal(0.0, 0.03, size=images[idx].shape).astype(np.float32)
        loss = float(train_step(ms.Tensor(x), *(ms.Tensor(lab[idx]) for lab in labels)).asnumpy())
        if (step + 1) % 100 == 0:
            log.info("classifier step %d loss %.4f", step + 1, loss)
    info = {"train_images": len(rows), "steps": steps, "batch_size": batch_size, "final_loss": loss,
            "seconds": time.perf_counter() - t0, "data": json.loads(config.model_dump_json())}
    classifier = Classifier(net, info)
    check = synthetic.SyntheticConfig(num_images=600, seed=202, include_heldout=True, low_resolution_fraction=0.0)
    check_rows = list(synthetic.generate_rows(check))
    acc = adherence(classifier.predict([synthetic.decode_image(r["image"]) for r in check_rows]), check_rows)
    classifier.info["real_image_accuracy"] = acc
    log.info("classifier accuracy on fresh real images: %s", acc)
    return classifier


def adherence(predicted: dict[str, Sequence[str]], targets: Sequence[dict]) -> dict[str, float]:
    """Share of images whose predicted attribute equals the target's, per attribute, and for all four at once."""
    out = {}
    hits_all = np.ones(len(targets), dtype=bool)
    for attr in HEADS:
        hits = np.array([p == t[attr] for p, t in zip(predicted[attr], targets)], dtype=bool)
        out[attr] = float(hits.mean()) if len(hits) else float("nan")
        hits_all &= hits
    out["all"] = float(hits_all.mean()) if len(targets) else float("nan")
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (rows are samples).

    Tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), which
    is symmetric positive semi-definite, so no general matrix square root is needed.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2.0)
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


# ---------------------------------------------------------------- layout measures (Coop-Diffusion)

SKETCH_FOREGROUND, SKETCH_BACKGROUND = (150, 150, 150), (25, 25, 25)


def layout_sketch(shape: str, width: int, height: int, seed: int = 0, *, size: str | None = None,
                  position: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A layout sketch for a control helper: `shape` in grey on near-black at a size and position of the synthetic
    generator (drawn from `seed` unless given), as uint8 (H, W, 3), and its boolean mask (pixels at least half
    covered)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    drawn_size = list(synthetic.SIZES)[rng.integers(len(synthetic.SIZES))]
    drawn_position = list(synthetic.POSITIONS)[rng.integers(len(synthetic.POSITIONS))]
    size, position = size or drawn_size, position or drawn_position
    scene = synthetic.Scene(shape, "white", "black", "solid", size, position, width, height, 0, False)
    big = synthetic.shape_mask(scene)
    s = big.shape[0] // height
    cover = big.reshape(height, s, width, s).mean(axis=(1, 3))
    fg, bg = np.asarray(SKETCH_FOREGROUND, np.float32), np.asarray(SKETCH_BACKGROUND, np.float32)
    img = bg + (fg - bg) * cover[..., None]
    return np.rint(img).astype(np.uint8), cover >= 0.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def thumbnail_correlation(a: np.ndarray, b: np.ndarray, side: int = 8) -> float:
    """Pearson correlation of two uint8 images' side x side grey thumbnails (area averages); 0 if one is flat."""
    from diffusion.coop import resize_pixels

    x, y = (resize_pixels(img.astype(np.float32).mean(axis=-1)[None, None], (side, side)).ravel() for img in (a, b))
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def resize_images(images: Sequence[np.ndarray], size: tuple[int, int]) -> list[np.ndarray]:
    """uint8 images of one size -> uint8 images of `size` (H, W): bilinear up, area down (`coop.resize_pixels`)."""
    from diffusion.coop import images_to_pixels, resize_pixels

    px = resize_pixels(images_to_pixels(np.stack(images)), size)
    return list(np.rint(np.clip((px + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(0, 2, 3, 1))


def real_scenes_for(prompts: Sequence[synthetic.EvalPrompt], seed: int = 4242) -> list[synthetic.Scene]:
    """A scene of each prompt's attributes and bucket at a random size and position (`real_images_for`)."""
    from diffusion import buckets

    out = []
    for i, p in enumerate(prompts):
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, i])))
        w, h = buckets.bucket_sizes(0.125)[p.aspect_bucket]
        out.append(synthetic.Scene(p.shape, p.colour, p.background, p.pattern,
                                   list(synthetic.SIZES)[rng.integers(3)], list(synthetic.POSITIONS)[rng.integers(5)],
                                   w, h, p.aspect_bucket, False, *rng.uniform(-0.06, 0.06, 2), *rng.random(2)))
    return out


def real_images_for(prompts: Sequence[synthetic.EvalPrompt], seed: int = 4242) -> list[np.ndarray]:
    """A real synthetic image of each prompt's attributes and bucket (random size and position), for the FD."""
    return [synthetic.render(scene) for scene in real_scenes_for(prompts, seed)]


def evaluate_model(model, classifier: Classifier, prompts: Sequence[synthetic.EvalPrompt], *, steps: int = 40,
                   guidance_scale: float = 6.0, aesthetic_scale: float = 4.0, sampler: str = "euler",
                   batch: int = 16) -> tuple[dict, list[np.ndarray]]:
    """Generate one image per prompt, read it back with the classifier, and compare with real images.

    Returns the report (adherence overall, per language and per aspect bucket, the Fréchet distance to real images
    of the same prompts, seconds per image, per-image rows of prompt, targets and predictions) and the images.
    """
    from diffusion import buckets
    from diffusion.model import GenerationRequest

    requests = []
    for p in prompts:
        w, h = buckets.bucket_sizes(model.config.bucket_scales[0])[p.aspect_bucket]
        requests.append(GenerationRequest(prompt=p.prompt, seed=p.seed, width=w, height=h, steps=steps,
                                          sampler=sampler, guidance_scale=guidance_scale,
                                          aesthetic_scale=aesthetic_scale))
    images: list[np.ndarray] = []
    t0 = time.perf_counter()
    for start in range(0, len(requests), batch):
        images.extend(model.generate(requests[start:start + batch]))
    seconds = time.perf_counter() - t0
    targets = [asdict(p) for p in prompts]
    predicted = classifier.predict(images)
    report = {
        "count": len(prompts), "steps": steps, "guidance_scale": guidance_scale, "aesthetic_scale": aesthetic_scale,
        "sampler": sampler, "seconds_per_image": seconds / max(len(prompts), 1),
        "adherence": adherence(predicted, targets),
        "by_language": {}, "by_bucket": {},
    }
    for key, field in (("by_language", "language"), ("by_bucket", "aspect_bucket")):
        for value in sorted({t[field] for t in targets}):
            idx = [i for i, t in enumerate(targets) if t[field] == value]
            report[key][str(value)] = adherence({a: [predicted[a][i] for i in idx] for a in HEADS},
                                                [targets[i] for i in idx])
    gen_features = classifier.features(images)
    real_features = classifier.features(real_images_for(prompts))
    report["frechet_distance"] = frechet_distance(gen_features, real_features)
    report["rows"] = [{**t, "predicted": {a: predicted[a][i] for a in HEADS}} for i, t in enumerate(targets)]
    return report, images
