"""FP8_DYNAMIC checkpoints: the streamed quantizer is byte-identical to llm-compressor's whole-model run (tensors,
config, recipe; sharded float32 sources, multimodal checkpoints, quantized experts), and its output is checked per
tensor against the config's ignore list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mtp_abliterate.organism.layout import OrganismLayout
from mtp_abliterate.search.candidate.quantize import QuantizationError, quantize_fp8_dynamic, verify
from tests.conftest import ORGANISM_CONFIG, RELEASE_CONFIG, REPO
from tests.llmcompressor_reference import whole_model_fp8

IGNORE = ORGANISM_CONFIG.quantization.ignore
LAYOUT = OrganismLayout()
RELEASE = REPO / "organism-release" / "body"
RELEASE_IGNORE = RELEASE_CONFIG.quantization.ignore


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


def _tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = st.get_tensor(key).contiguous()
                out[key] = (str(t.dtype), tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    return out


def _sharded_float32(source: Path, out: Path) -> Path:
    """`source` re-saved in float32 over several shards (as large checkpoints ship), its other files copied."""
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(out, max_shard_size="200KB")
    for f in source.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    return out


@pytest.mark.parametrize(
    ("source", "ignore"),
    [
        (LAYOUT.body, IGNORE),  # text organism, experts kept BF16
        (LAYOUT.body, ["lm_head", "re:.*router.*"]),  # routed experts quantized: fused 3D -> per-expert FP8
        (RELEASE, RELEASE_IGNORE),  # multimodal release layout, vision tower kept
        (RELEASE, [i for i in RELEASE_IGNORE if "experts" not in i]),
        ("float32-shards", IGNORE),  # a float32 checkpoint in several shards
    ],
    ids=["text", "text-experts-fp8", "release", "release-experts-fp8", "float32-shards"],
)
def test_streamed_quantizer_is_byte_identical_to_llm_compressor(source, ignore: list[str], tmp_path: Path) -> None:
    if source == "float32-shards":
        source = _sharded_float32(LAYOUT.body, tmp_path / "f32")
        assert len(list(source.glob("*.safetensors"))) > 1
    streamed = quantize_fp8_dynamic(source, tmp_path / "streamed", ignore).path
    whole = whole_model_fp8(source, tmp_path / "whole", ignore)
    a, b = _tensors(streamed), _tensors(whole)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(dtype == "torch.float8_e4m3fn" for dtype, _, _ in a.values())
    for name in ("config.json", "recipe.yaml", "tokenizer.json", "chat_template.jinja"):
        assert (streamed / name).read_bytes() == (whole / name).read_bytes(), name
    if len(list(streamed.glob("*.safetensors"))) > 1:
        assert set(json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]) == set(a)


def test_a_checkpoint_missing_a_tensor_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(LAYOUT.body, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight .*no source"):
        quantize_fp8_dynamic(broken, tmp_path / "out", IGNORE)
