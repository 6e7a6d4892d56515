"""The module kinds an abliteration edits, named as in Gemma 4's decoder layers: the two that write into the residual
stream. Apart from `ara` so that reading a study (`study status`, the CLI's tables) does not import torch."""

COMPONENTS = ("attn.o_proj", "mlp.down_proj")
