"""The training loop every trainer shares: a graph-mode step, AdamW, gradient accumulation, optional mixed
precision, EMA weights, metrics, and checkpoints that a stopped run resumes from exactly.

A trainer hands the loop its trainable networks, a loss Cell and a function that makes micro-batch k's inputs.
Micro-batch k's data and random numbers depend only on (seed, k), so the state to restore is the weights, the
optimizer's moments and step, the EMA weights, the loss scale and the step count, all of which a checkpoint holds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, nn, ops

from diffusion.training.config import LoopConfig
from schemas.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Batch:
    """One micro-batch: the loss Cell's inputs, and what it counts for in images and UNet latent pixels."""

    inputs: tuple[np.ndarray, ...]
    images: int
    pixels: int = 0


class WarmupConstantLR(nn.learning_rate_schedule.LearningRateSchedule):
    """lr * min(1, (step + 1) / warmup) * decay(step) * sqrt(1 - beta2^t) / (1 - beta1^t), t = step + 1: linear
    warm-up, then constant (or, with `total_steps`, a cosine decay from lr at the end of the warm-up to 0 at step
    `total_steps`), times Adam's bias correction.

    MindSpore's `AdamWeightDecay` keeps uncorrected moments, so without the factor its steps are about 3x the
    nominal rate for the first hundreds of steps (m / sqrt(v) = 0.1 / sqrt(0.001) = 3.16 at the first step, still
    about 3 at step 100 and 1.7 at step 400 with beta2 0.999): short runs then overshoot. With it the update is
    Adam's (Kingma and Ba, section 2's efficient form); the decoupled weight decay is scaled by the same factor.
    """

    def __init__(self, learning_rate: float, warmup_steps: int, beta1: float = 0.9, beta2: float = 0.999, *,
                 total_steps: int | None = None):
        super().__init__()
        self.learning_rate = float(learning_rate)
        self.warmup = float(max(warmup_steps, 1))
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.cosine = total_steps is not None
        self.decay_steps = float(max((total_steps or 0) - max(warmup_steps, 1), 1))

    def construct(self, global_step):
        t = global_step.astype(ms.float32) + 1.0
        correction = ops.sqrt(1.0 - ops.pow(self.beta2, t)) / (1.0 - ops.pow(self.beta1, t))
        rate = self.learning_rate * ops.minimum(t / self.warmup, 1.0) * correction
        if self.cosine:
            progress = ops.clip_by_value(
                (global_step.astype(ms.float32) + 1.0 - self.warmup) / self.decay_steps, 0.0, 1.0)
            rate = rate * 0.5 * (1.0 + ops.cos(progress * math.pi))
        return rate


def _inputs(arrays: tuple[np.ndarray, ...]):
    # mutable: a plain tuple of tensors would be a compile-time constant, and every step would recompile.
    return ms.mutable(tuple(_tensor(a) for a in arrays))


def _tensor(a: np.ndarray) -> ms.Tensor:
    if np.issubdtype(a.dtype, np.floating):
        return ms.Tensor(np.ascontiguousarray(a, dtype=np.float32))
    return ms.Tensor(np.ascontiguousarray(a, dtype=np.int32))


class TrainingLoop:
    """Optimises the parameters of `nets` to lower `loss_cell(*batch.inputs)`; see the module docstring."""

    def __init__(self, run_dir: str | Path, config: LoopConfig, nets: dict[str, nn.Cell], loss_cell: nn.Cell,
                 *, describe: dict | None = None, rebuild_every: int | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.nets = nets
        self.describe = describe or {}
        self.step = 0  # optimizer steps done
        self.images_seen = 0
        self.pixels_seen = 0
        self.named: list[tuple[str, Parameter]] = []
        for net_name, net in nets.items():
            net.set_train(True)
            for pname, param in net.parameters_and_names():
                # 0-d parameters (text encoder 2's CLIP logit scale) play no part in generation, and MindSpore's
                # fused AdamW kernel does not take them.
                if param.requires_grad and len(param.shape) > 0:
                    self.named.append((f"{net_name}/{pname}", param))
        if not self.named:
            raise ValueError("nothing to train: the networks have no trainable parameters")
        # Decayed (matrix) parameters first, then biases and norms: the optimizer's group order, which the
        # gradients must follow.
        self.named = [x for x in self.named if len(x[1].shape) > 1] + [x for x in self.named if len(x[1].shape) <= 1]
        self.params = ParameterTuple([p for _, p in self.named])
        decay = [p for _, p in self.named if len(p.shape) > 1]
        no_decay = [p for _, p in self.named if len(p.shape) <= 1]
        groups = [{"params": decay, "weight_decay": config.optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.optimizer = nn.AdamWeightDecay(
            groups, WarmupConstantLR(config.optim.learning_rate, config.optim.warmup_steps,
                                     config.optim.beta1, config.optim.beta2,
                                     total_steps=config.steps if config.optim.schedule == "cosine" else None),
            beta1=config.optim.beta1, beta2=config.optim.beta2, eps=config.optim.eps,
        )
        if [id(p) for p in self.optimizer._parameters] != [id(p) for p in self.params]:
            raise RuntimeError("the optimizer's parameter order differs from the gradients' order")
        self.loss_scale: Parameter | None = None
        network = loss_cell
        if config.precision != "fp32":
            dtype = {"fp16": ms.float16, "bf16": ms.bfloat16}[config.precision]
            network = ms.amp.auto_mixed_precision(loss_cell, amp_level="O2", dtype=dtype)
        if config.precision == "fp16":
            self.loss_scale = Parameter(ms.Tensor(np.float32(2.0**12)), name="loss_scale", requires_grad=False)
        self.ema = {name: p.asnumpy().astype(np.float32).copy() for name, p in self.named}
        # MindSpore 2.10 on CPU stops making progress on the 18th launch of the VAE's compiled training step (one
        # kernel thread spins; the same graph recompiled runs on). Such a trainer asks for a fresh compiled step
        # every `rebuild_every` optimizer steps, which costs one compile each time.
        self.rebuild_every = rebuild_every
        self._network = network
        self._launches = 0
        self._build_steps(network)

    # ------------------------------------------------------------------ graph-mode steps

    def _build_steps(self, network: nn.Cell) -> None:
        params, optimizer, cfg = self.params, self.optimizer, self.config
        clip = float(cfg.optim.grad_clip)
        loss_scale = self.loss_scale
        accum_count = cfg.grad_accum

        def scaled_loss(*inputs):
            loss = network(*inputs).astype(ms.float32)
            if loss_scale is not None:
                return loss * loss_scale
            return loss

        grad_fn = ms.value_and_grad(scaled_loss, None, params)

        def finish(loss, grads):
            if loss_scale is None:
                if clip > 0:
                    grads = ops.clip_by_global_norm(grads, clip)
                optimizer(grads)
                return loss, ops.isfinite(loss)
            grads = tuple(g / loss_scale for g in grads)
            loss = loss / loss_scale
            finite = ops.isfinite(ops.stack([ops.reduce_sum(g) for g in grads])).all()
            if clip > 0:
                grads = ops.clip_by_global_norm(grads, clip)
            if finite:
                optimizer(grads)
            # Dynamic loss scaling: halve on overflow (that step was skipped), else grow slowly.
            ops.assign(loss_scale, ops.select(finite, loss_scale * 1.0005, loss_scale * 0.5))
            return loss, finite

        if accum_count == 1:
            @ms.jit
            def train_step(inputs):
                loss, grads = grad_fn(*inputs)
                return finish(loss, grads)

            self._train_step = train_step
        else:
            self.accum = ParameterTuple([
                Parameter(ms.Tensor(np.zeros(p.shape, np.float32)), name=f"accum.{i}", requires_grad=False)
                for i, p in enumerate(params)
            ])
            accum = self.accum

            @ms.jit
            def accumulate(inputs):
                loss, grads = grad_fn(*inputs)
                for a, g in zip(accum, grads):
                    ops.assign_add(a, g.astype(ms.float32))
                return loss

            @ms.jit
            def apply_accumulated(loss_sum):
                grads = tuple(a / accum_count for a in accum)
                out = finish(loss_sum / accum_count, grads)
                for a in accum:
                    ops.assign(a, ops.zeros_like(a))
                return out

            self._accumulate = accumulate
            self._apply = apply_accumulated

    def _optimizer_step(self, batches: list[Batch]) -> tuple[float, bool]:
        if self.rebuild_every and self._launches >= self.rebuild_every:
            self._build_steps(self._network)
            self._launches = 0
        self._launches += 1
        if self.config.grad_accum == 1:
            loss, finite = self._train_step(_inputs(batches[0].inputs))
            return float(loss.asnumpy()), bool(finite.asnumpy())
        total = None
        for batch in batches:
            loss = self._accumulate(_inputs(batch.inputs))
            total = loss if total is None else total + loss
        loss, finite = self._apply(total)
        return float(loss.asnumpy()), bool(finite.asnumpy())

    def _update_ema(self) -> None:
        # Warm-up of the decay (as in common EMA implementations) so that short runs still average sensibly.
        decay = min(self.config.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        for name, p in self.named:
            e = self.ema[name]
            e *= decay
            e += (1.0 - decay) * p.asnumpy()

    # ------------------------------------------------------------------ the loop

    def run(self, make_batch: Callable[[int], Batch], *, stop_after: int | None = None) -> list[dict]:
        """Train until `config.steps` optimizer steps (or `stop_after` more); returns the logged metrics rows.

        `make_batch(k)` returns micro-batch k (k counts micro-batches from 0 over the whole run).
        """
        cfg = self.config
        target = cfg.steps if stop_after is None else min(cfg.steps, self.step + stop_after)
        rows: list[dict] = []
        window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()
        skipped = 0
        while self.step < target:
            micro = [make_batch(self.step * cfg.grad_accum + k) for k in range(cfg.grad_accum)]
            loss, finite = self._optimizer_step(micro)
            self.step += 1
            self._update_ema()
            if not finite:
                skipped += 1
            if not math.isfinite(loss) and self.loss_scale is None:
                raise FloatingPointError(f"loss is {loss} at step {self.step}; lower the learning rate")
            images = sum(b.images for b in micro)
            self.images_seen += images
            self.pixels_seen += sum(b.images * b.pixels for b in micro)
            window_loss += loss
            window_steps += 1
            window_images += images
            if self.step % cfg.log_every == 0 or self.step == target:
                elapsed = time.perf_counter() - window_start
                row = {"step": self.step, "loss": window_loss / window_steps,
                       "images_per_s": window_images / max(elapsed, 1e-9),
                       "lr": self._lr(), "images_seen": self.images_seen, "pixels_seen": self.pixels_seen,
                       "skipped_steps": skipped}
                if self.loss_scale is not None:
                    row["loss_scale"] = float(self.loss_scale.asnumpy())
                rows.append(row)
                self._log_metrics(row)
                window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
        return rows

    def _lr(self) -> float:
        cfg = self.config.optim
        return cfg.learning_rate * min(1.0, (self.step + 1) / max(cfg.warmup_steps, 1))

    def _log_metrics(self, row: dict) -> None:
        log.info("step %d  loss %.4f  %.1f images/s  lr %.2e", row["step"], row["loss"], row["images_per_s"], row["lr"])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, np.ndarray]:
        """Everything a resumed run needs besides the step count, as NumPy arrays by name."""
        out: dict[str, np.ndarray] = {}
        for name, p in self.named:
            out[f"param/{name}"] = p.asnumpy()
            out[f"ema/{name}"] = self.ema[name]
        opt = self.optimizer
        for pos, (name, _) in enumerate(self.named):
            out[f"adam_m/{name}"] = opt.moments1[pos].asnumpy()
            out[f"adam_v/{name}"] = opt.moments2[pos].asnumpy()
        out["optimizer/global_step"] = opt.global_step.asnumpy()
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.asnumpy()
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for name, p in self.named:
            p.set_data(ms.Tensor(state[f"param/{name}"]).astype(p.dtype))
            self.ema[name] = state[f"ema/{name}"].astype(np.float32).copy()
        opt = self.optimizer
        for pos, (name, _) in enumerate(self.named):
            opt.moments1[pos].set_data(ms.Tensor(state[f"adam_m/{name}"]))
            opt.moments2[pos].set_data(ms.Tensor(state[f"adam_v/{name}"]))
        opt.global_step.set_data(ms.Tensor(state["optimizer/global_step"]))
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.set_data(ms.Tensor(state["loss_scale"]))

    def save_checkpoint(self) -> Path:
        """Write `checkpoints/step-N/` (state + trainer.json), point `latest` at it, keep the newest few."""
        from safetensors.numpy import save_file

        root = self.run_dir / CHECKPOINT_DIR
        name = f"step-{self.step:07d}"
        tmp = root / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: np.ascontiguousarray(v) for k, v in self.state().items()}, str(tmp / STATE_FILE))
        info = {"step": self.step, "images_seen": self.images_seen, "pixels_seen": self.pixels_seen,
                "config": json.loads(self.config.model_dump_json()), **self.describe}
        (tmp / TRAINER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / (LATEST_FILE + ".tmp")
        pointer.write_text(name + "\n")
        os.replace(pointer, root / LATEST_FILE)
        kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
        return final

    def resume(self) -> bool:
        """Load the latest checkpoint of the run directory, if any; True when one was loaded."""
        from safetensors.numpy import load_file

        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        info = json.loads((ckpt / TRAINER_FILE).read_text())
        saved = {k: v for k, v in info["config"].items() if k not in ("steps", "checkpoint_every", "log_every",
                                                                      "keep_checkpoints")}
        current = {k: v for k, v in json.loads(self.config.model_dump_json()).items() if k in saved}
        if saved != current:
            changed = sorted(k for k in saved if saved[k] != current.get(k))
            raise UserError(f"{ckpt}: this run was started with other settings ({', '.join(changed)}); "
                            "use a new run directory or the same settings")
        self.load_state(load_file(str(ckpt / STATE_FILE)))
        self.step = int(info["step"])
        self.images_seen = int(info.get("images_seen", 0))
        self.pixels_seen = int(info.get("pixels_seen", 0))
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def copy_ema_into_nets(self) -> None:
        """Replace the networks' weights by their EMA (what a finished run ships)."""
        for name, p in self.named:
            p.set_data(ms.Tensor(self.ema[name]).astype(p.dtype))

    def ema_state(self, net_name: str) -> dict[str, np.ndarray]:
        prefix = net_name + "/"
        return {name[len(prefix):]: v for name, v in self.ema.items() if name.startswith(prefix)}


class LoopTrainer:
    """What every trainer shares: a `loop` (TrainingLoop) fed by the trainer's `make_batch`."""

    loop: TrainingLoop

    def make_batch(self, micro_step: int) -> Batch:
        raise NotImplementedError

    def train(self, *, resume: bool = True, stop_after: int | None = None) -> list[dict]:
        """Run (or continue, from the run directory's last checkpoint) training; the metrics rows of this call."""
        if resume:
            self.loop.resume()
        return self.loop.run(self.make_batch, stop_after=stop_after)

    def finish(self) -> None:
        """Put the EMA weights into the trained networks and set them back to inference (the model's compiled
        forwards read the same parameters)."""
        self.loop.copy_ema_into_nets()
        for net in self.loop.nets.values():
            net.set_train(False)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / CHECKPOINT_DIR
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    if not (ckpt / STATE_FILE).is_file():
        raise UserError(f"{pointer} names {ckpt.name}, which has no {STATE_FILE}; the run directory is damaged")
    return ckpt
