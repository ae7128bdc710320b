"""Age-cGAN face aging in PyTorch: networks, alignment, data and training stages."""

from agecgan.ages import AGE_BUCKETS, BUCKET_LABELS, NUM_BUCKETS, age_to_bucket, one_hot
from agecgan.align import (
    AlignedFace,
    FaceAligner,
    FaceNotFoundError,
    ImageReadError,
    align_face,
    read_photo,
)
from agecgan.face_recognition import FaceRecognizer
from agecgan.identity import optimize_latent
from agecgan.networks import AgeCGANConfig, Discriminator, Encoder, Generator
from agecgan.pipeline import AgingPipeline

__all__ = [
    "AGE_BUCKETS",
    "BUCKET_LABELS",
    "NUM_BUCKETS",
    "AgeCGANConfig",
    "AgingPipeline",
    "AlignedFace",
    "Discriminator",
    "Encoder",
    "FaceAligner",
    "FaceNotFoundError",
    "FaceRecognizer",
    "Generator",
    "ImageReadError",
    "age_to_bucket",
    "align_face",
    "read_photo",
    "one_hot",
    "optimize_latent",
]
