"""One trial: the stages composed (abliterate, kld, merge, quantize, serve, acceptance, refusals, swap_check)."""
