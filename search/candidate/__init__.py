"""The candidate model: the resident model, ARA and heretic's directional method, module I/O, FP8."""
