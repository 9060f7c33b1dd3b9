"""The ENSAM network: encoder, prompt encoder, nGPT/LieRE interaction, decoder, size counting.

    from ENSAMSegmentLib.core.network import ENSAM, ENSAMConfig, Prompts, pad_to_multiple
    model = ENSAM(ENSAMConfig())
    emb = model.encode(image)                      # [1, 1, D, H, W], sides multiples of 8
    logits = model.decode(emb, Prompts.from_objects([{"box": (lo, hi), "fg": [p]}]))
"""

from .blocks import PadInfo, crop_to_shape, pad_to_multiple, unpad
from .ensam import ENSAM, ENSAMConfig, ImageEmbedding, InteractionState
from .ngpt import renormalize_weights
from .prompts import BG_CLICK, BOX_MAX, BOX_MIN, FG_CLICK, PAD, PromptError, Prompts

__all__ = [
    "ENSAM", "ENSAMConfig", "ImageEmbedding", "InteractionState", "Prompts", "PromptError", "PadInfo",
    "pad_to_multiple", "crop_to_shape", "unpad", "renormalize_weights",
    "PAD", "BOX_MIN", "BOX_MAX", "FG_CLICK", "BG_CLICK",
]
