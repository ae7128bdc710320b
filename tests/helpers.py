"""Shared by the tests: a tiny architecture that trains in milliseconds."""

from agecgan import AgeCGANConfig

# A few channels per layer: the recipe's structure at a fraction of a percent of its size.
TINY = AgeCGANConfig(
    encoder_widths=(4, 8, 8, 8),
    encoder_hidden=16,
    generator_hidden=16,
    generator_widths=(8, 8, 4),
    discriminator_widths=(4, 8, 8, 8),
)
