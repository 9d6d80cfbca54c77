"""The VQ-VAE-2's default downsampling, kept free of torch: the config reads it to size the
code maps before anything heavy is imported (a fully reused run never imports torch)."""


def default_downsample(levels: int) -> list[int]:
    """Per level, top first: the bottom level (last) downsamples the image x4, each level above x2 more."""
    return [2] * (levels - 1) + [4]
