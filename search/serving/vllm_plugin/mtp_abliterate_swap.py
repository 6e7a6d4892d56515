"""vLLM worker extension for in-place weight swaps (loaded by the vLLM server, not by the project).

Passed as `--worker-extension-cls mtp_abliterate_swap.SwapRepairs`; this folder is put on the server's PYTHONPATH.
It imports nothing from the project: it runs in vLLM's own environment (or docker image).

`reload_weights` (vLLM's own) re-loads the target's weights in place, but the CPU build leaves two kernel-side
copies stale after it: the MoE experts' CPU-packed weights (the unquantized MoE method re-runs its packing only on
the first load) and a tied lm_head's packed copy of the embedding (its weights are never "loaded", so it keeps the
old pack). `repair_after_reload` re-runs those two steps. On GPUs, `reload_weights` refills the weights in place
but rebuilds each FP8 MoE layer's kernel object and drops the old one, whose buffers CUDA graphs captured: the next
batch dies with an illegal memory access (H100, vLLM 0.32, benchmarks/results/gpu-2026-12-07.md). `prepare_reload`
keeps those objects before the reload and `repair_after_reload` puts them back (bit-identical to cold starts there).
"""

from __future__ import annotations


class SwapRepairs:
    """Mixed into vLLM's worker class; its methods are called through POST /collective_rpc."""

    def prepare_reload(self) -> str:
        """GPU, before reload_weights: keep each MoE layer's kernel object (and its quant config). A reload rebuilds
        them around temporary tensors and drops the old ones, whose buffers CUDA graphs captured (FP8 experts +
        graphs: illegal memory access, benchmarks/bench_gpu.py); `repair_after_reload` puts the kept ones back,
        their weight tensors being the layer's own, refilled in place by the reload."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():  # no graphs: the CPU repairs re-pack after the reload instead
            return "nothing to keep on this platform"
        model = self.model_runner.get_model()
        self._kept_moe_kernels = [
            (method, method.moe_kernel, getattr(method, "moe_quant_config", None))
            for module in model.modules()
            if getattr(method := getattr(module, "quant_method", None), "moe_kernel", None) is not None
        ]
        return f"kept {len(self._kept_moe_kernels)} MoE kernels"

    def repair_after_reload(self) -> str:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            kept = getattr(self, "_kept_moe_kernels", None)
            if not kept:
                return "no repair needed on this platform"
            for method, kernel, config in kept:
                method.moe_kernel, method.moe_quant_config = kernel, config
            self._kept_moe_kernels = []
            return f"restored {len(kept)} MoE kernels kept by prepare_reload"
        model = self.model_runner.get_model()
        experts = embeddings = 0
        for module in model.modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            if kernel is not None:
                kernel.fused_experts.process_weights_after_loading(module)
                experts += 1
            elif isinstance(module, VocabParallelEmbedding) and getattr(module, "cpu_linear", None) is not None:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                embeddings += 1
        return f"repacked {experts} MoE expert blocks and {embeddings} embedding/lm_head packs"
