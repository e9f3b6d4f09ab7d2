"""Training of PanGu-Draw's components: the VAE, the structure and texture generators (each on its own timestep
range), a monolithic UNet for comparison, and the text encoders jointly with the UNet (SPEC section 7)."""
from diffusion.training.config import DiffusionTrainConfig, LoopConfig, OptimConfig, VAETrainConfig
from diffusion.training.data import BatchOrder, ImageTextSet, bucket_images, read_tables
from diffusion.training.diffusion_trainer import DiffusionLoss, DiffusionTrainer, timestep_range
from diffusion.training.loop import Batch, TrainingLoop, latest_checkpoint
from diffusion.training.vae_trainer import VAETrainer, fit_scale_factor, reconstruction_psnr

__all__ = [
    "Batch", "BatchOrder", "DiffusionLoss", "DiffusionTrainConfig", "DiffusionTrainer", "ImageTextSet", "LoopConfig",
    "OptimConfig", "TrainingLoop", "VAETrainConfig", "VAETrainer", "bucket_images", "fit_scale_factor",
    "latest_checkpoint", "read_tables", "reconstruction_psnr", "timestep_range",
]
