"""FP8_DYNAMIC candidates: llm-compressor's real output, checked per tensor against the config's ignore list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from search.config import load_config
from search.organism.layout import OrganismLayout
from search.quantize import QuantizationError, quantize_fp8_dynamic, verify

REPO = Path(__file__).resolve().parents[1]
IGNORE = load_config(REPO / "configs" / "organism.toml").quantization.ignore
LAYOUT = OrganismLayout()


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    return quantize_fp8_dynamic(LAYOUT.body, tmp_path_factory.mktemp("fp8") / "body", IGNORE).path


def test_dense_linears_are_fp8_and_the_rest_bf16(fp8: Path) -> None:
    checkpoint = verify(fp8, IGNORE)
    assert any(".self_attn.o_proj." in k for k in checkpoint.fp8)
    assert any(".mlp.down_proj." in k for k in checkpoint.fp8)
    for kept in (".experts.", ".router.", "norm", "embed_tokens"):
        assert not any(kept in k for k in checkpoint.fp8), kept
        assert any(kept in k for k in checkpoint.bf16), kept


def test_fp8_weights_follow_the_per_channel_formula(fp8: Path) -> None:
    """scale = amax(|w|) / 448 per output row (in BF16); w is recovered within FP8 E4M3 resolution."""
    vanilla = load_file(LAYOUT.body / "model.safetensors")
    quantized = load_file(fp8 / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    w, q, scale = vanilla[name], quantized[name], quantized[name + "_scale"]
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (w.shape[0], 1)
    torch.testing.assert_close(scale, (w.abs().amax(dim=1, keepdim=True) / 448).to(scale.dtype))
    torch.testing.assert_close(q.float() * scale.float(), w.float(), rtol=0.07, atol=1e-6)


def test_config_and_tokenizer_travel_with_the_checkpoint(fp8: Path) -> None:
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (fp8 / name).read_bytes() == (LAYOUT.body / name).read_bytes()
    assert '"quant_method": "compressed-tensors"' in (fp8 / "config.json").read_text()


def test_verify_rejects_a_checkpoint_that_breaks_the_ignore_list(fp8: Path) -> None:
    with pytest.raises(QuantizationError, match="o_proj.weight is FP8 but matches the ignore list"):
        verify(fp8, [*IGNORE, "re:.*o_proj.*"])
    with pytest.raises(QuantizationError, match="no tensor was quantized"):
        verify(LAYOUT.body, IGNORE)
