"""Age-cGAN face aging in PyTorch: networks, alignment, data and training stages."""

from agecgan.ages import AGE_BUCKETS, BUCKET_LABELS, NUM_BUCKETS, age_to_bucket, one_hot
from agecgan.align import (
    AlignedFace,
    FaceAligner,
    FaceNotFoundError,
    Framing,
    ImageReadError,
    align_face,
    read_photo,
)
from agecgan.checkpoints import load_network
from agecgan.face_recognition import FaceRecognizer
from agecgan.identity import LatentResult, optimize_latent
from agecgan.networks import AgeCGANConfig, Discriminator, Encoder, Generator
from agecgan.pipeline import AgingPipeline, AgingResult

__all__ = [
    "AGE_BUCKETS",
    "BUCKET_LABELS",
    "NUM_BUCKETS",
    "AgeCGANConfig",
    "AgingPipeline",
    "AgingResult",
    "AlignedFace",
    "Discriminator",
    "Encoder",
    "FaceAligner",
    "FaceNotFoundError",
    "FaceRecognizer",
    "Framing",
    "Generator",
    "ImageReadError",
    "LatentResult",
    "age_to_bucket",
    "align_face",
    "load_network",
    "one_hot",
    "optimize_latent",
    "read_photo",
]
