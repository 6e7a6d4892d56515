"""The model organism's builder: a tiny Gemma 4 body trained to refuse, and its MTP draft trained on the body's own
hidden states and KV (`mtp-abliterate organism build`)."""
