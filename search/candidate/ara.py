"""ARA (Arbitrary-Rank Ablation): per target module, a low-rank weight edit found by L-BFGS.

For a module with vanilla weight W0 and captured last-prompt-token inputs/outputs of harmless ("good") and harmful
("bad") prompts, ARA minimises

    preserve_w * mean((good_in W^T - good_out)^2)
  + steer_w * (knn(bad_in W^T, good_out, k) - overcorrect_w * knn(bad_in W^T, bad_out, k))

where knn(a, b, k) is the mean distance of each row of a to its k nearest rows of b: harmful inputs are pulled
towards what the module writes for harmless prompts and pushed from what it writes for harmful ones, while harmless
behaviour is preserved. Here W = W0 + B A (rank r, the LoRA adapter that is deployed), and with row-norm
preservation W = ||W0||_row * (W0 + B A) / ||W0 + B A||_row, which is exactly PEFT's DoRA with its magnitude frozen
at the vanilla row norms: the weight that is optimised is the weight that is served.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from mtp_abliterate.search.candidate.components import COMPONENTS
from mtp_abliterate.search.errors import UserError

# L-BFGS settings of the method: fixed, so an edit depends only on its module's inputs, parameters and seed.
LBFGS = dict(lr=1.0, max_iter=20, history_size=10, line_search_fn="strong_wolfe")
LBFGS_STEPS = 5


class ModelShape(NamedTuple):
    """What a candidate must fit: decoder layers and routed experts per layer (0 for a dense model)."""

    num_layers: int
    num_experts: int


class AbliterationError(UserError, ValueError):
    """Parameters that cannot be applied to this model; raised before any work."""


class AraParameters(BaseModel):
    """One ARA candidate. Layer indices are 0-based; the edited layers are [start_layer_index, end_layer_index)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_layer_index: int = Field(description="first edited layer, in [0, L/2]")
    end_layer_index: int = Field(description="one past the last edited layer, in [L/2, L]")
    preserve_w: float = Field(ge=0.0, le=1.0, description="weight of preserving harmless outputs")
    steer_w: float = Field(ge=1e-4, le=1.0, description="weight of steering harmful outputs (log scale)")
    overcorrect_w: float = Field(ge=0.0, le=1.3, description="push away from harmful outputs, relative to steer_w")
    k: int = Field(ge=1, le=15, description="nearest neighbours in the steering distances")
    components: tuple[str, ...] = Field(COMPONENTS, description="module kinds to edit")
    experts_per_layer: int = Field(
        0,
        ge=0,
        description="routed experts whose down projection is edited per edited layer: those the harmful prompts "
        "are routed to most (0 = the experts are not edited)",
    )

    # The study's search ranges (search/study/space.py); layer ranges depend on the model and come from `layer_ranges`.
    RANGES: ClassVar[dict[str, tuple[float, float]]] = {
        "preserve_w": (0.0, 1.0),
        "steer_w": (1e-4, 1.0),
        "overcorrect_w": (0.0, 1.3),
        "k": (1, 15),
    }

    @staticmethod
    def layer_ranges(num_layers: int) -> dict[str, tuple[int, int]]:
        half = num_layers // 2
        return {"start_layer_index": (0, half), "end_layer_index": (half, num_layers)}

    def check_against(self, shape: ModelShape, available: list[str]) -> None:
        """Raise AbliterationError naming the problem if this candidate does not fit the model."""
        num_layers = shape.num_layers
        problems = []
        if self.experts_per_layer > shape.num_experts:
            problems.append(
                f"experts_per_layer={self.experts_per_layer} but this model has {shape.num_experts} routed experts "
                "per layer"
            )
        for name, (low, high) in self.layer_ranges(num_layers).items():
            if not low <= getattr(self, name) <= high:
                problems.append(
                    f"{name}={getattr(self, name)} is outside [{low}, {high}] for a {num_layers}-layer model"
                )
        if self.start_layer_index >= self.end_layer_index:
            problems.append(f"start_layer_index ({self.start_layer_index}) must be below end_layer_index")
        unknown = sorted(set(self.components) - set(available))
        if unknown or not self.components:
            problems.append(f"components {unknown or '[]'} are not among this model's {available}")
        if problems:
            raise AbliterationError("; ".join(problems))


def module_seed(seed: int, layer: int, component: str, index: int) -> int:
    """A seed per module, independent of which other modules or trials ran before."""
    digest = hashlib.sha256(f"{seed}/{layer}/{component}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def edited_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor:
    """The deployed weight: W0 + B A, rescaled to the vanilla row norms when `magnitude` is given (DoRA)."""
    w = w0 + b @ a
    if magnitude is None:
        return w
    return w * (magnitude / w.norm(p=2, dim=1)).unsqueeze(1)


def knn_distance(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over rows of `a` of the mean Euclidean distance to their k nearest rows of `b`."""
    sq = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    dist = sq.clamp_min(1e-12).sqrt()
    return dist.topk(min(k, b.shape[0]), dim=1, largest=False).values.mean()


def ara_loss(good: torch.Tensor, bad: torch.Tensor, io: dict[str, torch.Tensor], params: AraParameters) -> torch.Tensor:
    """The objective from the module's outputs for the good and bad inputs (`good_in W^T`, `bad_in W^T`)."""
    preserve = ((good - io["good_out"]) ** 2).mean()
    steer = knn_distance(bad, io["good_out"], params.k) - params.overcorrect_w * knn_distance(
        bad, io["bad_out"], params.k
    )
    return params.preserve_w * preserve + params.steer_w * steer


class LowRankOutputs:
    """`x W^T` for the edited weight without forming W (d_out x d_in): with W0's products precomputed, an
    evaluation costs O(N d_in r + d_out d_in r) instead of O(N d_in d_out). Row norms of W0 + B A come from
    ||W0_i||^2 + 2 B_i (W0 A^T)_i + B_i (A A^T) B_i^T."""

    def __init__(self, w0: torch.Tensor, io: dict[str, torch.Tensor], magnitude: torch.Tensor | None) -> None:
        self.w0, self.io, self.magnitude = w0, io, magnitude
        self.good_base = io["good_in"] @ w0.T
        self.bad_base = io["bad_in"] @ w0.T
        self.w0_sq = (w0 * w0).sum(1)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        good = self.good_base + (self.io["good_in"] @ a.T) @ b.T
        bad = self.bad_base + (self.io["bad_in"] @ a.T) @ b.T
        if self.magnitude is None:
            return good, bad
        sq = self.w0_sq + 2.0 * (b * (self.w0 @ a.T)).sum(1) + ((b @ (a @ a.T)) * b).sum(1)
        scale = self.magnitude / sq.clamp_min(1e-30).sqrt()
        return good * scale, bad * scale


@dataclass(frozen=True)
class ModuleTask:
    """One module's optimisation: its vanilla weight, captured I/O, seed and (DoRA) magnitude."""

    w0: torch.Tensor
    io: dict[str, torch.Tensor]
    seed: int
    magnitude: torch.Tensor | None


class ModuleProblem:
    """L-BFGS over one module's adapter (A: [r, d_in], B: [d_out, r]) in float32 on w0's device.

    B starts at zero (the vanilla weight) and A at a seeded Gaussian, so the result depends only on the inputs,
    the parameters and the seed. On CUDA the loss and its gradient are captured once as a CUDA graph (`graph`):
    the same kernels, one launch per evaluation instead of dozens, so the result is bit-identical to eager.
    """

    def __init__(self, task: ModuleTask, params: AraParameters, rank: int, graph: bool = True) -> None:
        device = task.w0.device
        w0 = task.w0.detach().float()
        self.io = {name: t.to(device=device, dtype=torch.float32) for name, t in task.io.items()}
        d_out, d_in = w0.shape
        gen = torch.Generator(device="cpu").manual_seed(task.seed)
        self.a = (torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in)).to(device).requires_grad_(True)
        self.b = torch.zeros(d_out, rank, device=device, requires_grad=True)
        mag = task.magnitude.detach().float().to(device) if task.magnitude is not None else None
        self.outputs = LowRankOutputs(w0, self.io, mag)
        self.params = params
        self.opt = torch.optim.LBFGS([self.a, self.b], **LBFGS)
        # One stream per problem for warm-up, capture and solving: cuBLAS keeps a workspace per stream, and
        # problems solved at once must not share one (a shared capture stream would make their graphs share it).
        self.stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(device))
        self.closure = self._graphed() if self.stream is not None and graph else self._eager

    def _evaluate(self) -> torch.Tensor:
        loss = ara_loss(*self.outputs(self.a, self.b), self.io, self.params)
        loss.backward()
        return loss

    def _eager(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        return self._evaluate()

    def _graphed(self) -> Callable[[], torch.Tensor]:
        """L-BFGS updates A and B in place, so the graph reads their current values and leaves the gradients in
        the same (static) `.grad` tensors that L-BFGS reads."""
        with torch.cuda.stream(self.stream):  # warm-up outside capture, as CUDA graphs require
            for _ in range(2):
                self._eager()
            self.opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            loss = self._evaluate()

        def replay() -> torch.Tensor:
            graph.replay()
            return loss

        return replay

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Returns (A, B, final loss); safe to call from another thread."""
        with torch.cuda.stream(self.stream), torch.enable_grad():  # grad mode is per thread
            for _ in range(LBFGS_STEPS):
                self.opt.step(self.closure)
            with torch.no_grad():
                final = float(ara_loss(*self.outputs(self.a, self.b), self.io, self.params))
        if self.stream is not None:
            torch.cuda.current_stream(self.a.device).wait_stream(self.stream)
        return self.a.detach(), self.b.detach(), final


def optimise_module(
    task: ModuleTask, params: AraParameters, rank: int, graph: bool = True
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One module's (A, B, final loss)."""
    with torch.enable_grad():
        return ModuleProblem(task, params, rank, graph).solve()


def optimise_modules(
    tasks: list[ModuleTask], params: AraParameters, rank: int, workers: int, graph: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """`optimise_module` for every task, in order. One module's L-BFGS is bound by host-side launches and syncs,
    not by the GPU, so on CUDA up to `workers` modules are solved at once, each on its own stream and thread;
    their graphs are captured first, one at a time, since capture must not overlap other work. Every module's result
    depends only on its own task, so it is the same for any `workers`."""
    if workers <= 1 or not tasks or tasks[0].w0.device.type != "cuda":
        return [optimise_module(t, params, rank, graph) for t in tasks]

    results = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ara") as pool:
        for i in range(0, len(tasks), workers):  # a group at a time bounds the memory of live problems
            with torch.enable_grad():
                group = [ModuleProblem(t, params, rank, graph) for t in tasks[i : i + workers]]
            results += pool.map(ModuleProblem.solve, group)
    return results
