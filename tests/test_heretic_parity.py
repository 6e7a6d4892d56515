"""Peer parity with heretic 1.4.0's own CLI (#40, docs/parity.md).

The project's one-shot `mtp-abliterate abliterate <toml> --params <enqueued ARA candidate> --out C` against
`heretic --model <body> --evaluate-model C`, heretic configured by a config.toml in its working folder with the same
prompt files and splits, batch size, response length, system prompt, seed and dtype: the same refusal count, and the
same KL within the documented tolerance. On the organism the two KLs are one float (heretic prints 4 decimals, the
one-shot 5); on the release organism heretic tokenizes `<bos><bos>` where the project scores the single `<bos>` vLLM
serves, a measured 0.14 % apart, inside 1 %. Scoring the resident's DoRA adapters instead of the deployed weights
put the organism's KL 5.6 % above heretic's (0.01729 vs 0.0164), far outside the organism's tolerance.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit
import torch
from transformers import AutoModelForCausalLM

from mtp_abliterate.search.candidate.ara import AraParameters
from mtp_abliterate.search.candidate.resident import Resident
from mtp_abliterate.search.config import PromptSet, StudyConfig, load_config
from tests.conftest import CLI, ORGANISM_CONFIG, ORGANISM_TOML, RELEASE_TOML, write_study_config

HERETIC = Path(sys.executable).parent / "heretic"  # heretic-llm's own console script (heretic.main:main)
# The release organism is Gemma4ForConditionalGeneration: heretic's CLI loads its processor (only to save it with an
# export), and Gemma 4's processor imports torchvision, which the main environment does not have (README "Model
# formats"). So for it heretic's CLI runs with AutoProcessor stubbed, as the project's own loader does; the rest is
# heretic.main:main unchanged.
HERETIC_WITHOUT_PROCESSOR = (
    "import sys, heretic.model\n"
    "class NoProcessor:\n"
    "    from_pretrained = staticmethod(lambda *a, **k: None)\n"
    "heretic.model.AutoProcessor = NoProcessor\n"
    "from heretic.main import main\n"
    "sys.argv[0] = 'heretic'\n"
    "main()\n"
)
PRINTED = 0.5e-4 + 0.5e-5  # heretic prints KL to 4 decimals, the one-shot to 5
# (config, KL tolerance relative to heretic's value beyond the print rounding, why)
CASES = {
    "organism": (ORGANISM_TOML, 0.0),  # the same tokens, weights, batches and padding: the same float
    "release": (RELEASE_TOML, 0.01),  # heretic's `<bos><bos>` vs vLLM's `<bos>`: 0.14 % measured (docs/parity.md)
}


def _dataset(cfg: StudyConfig, ps: PromptSet) -> dict[str, str]:
    spec = {"dataset": ps.source}
    if ps.split is not None:
        spec["split"] = ps.split
    if ps.column is not None:
        spec["column"] = ps.column
    return spec


def heretic_config(cfg: StudyConfig) -> str:
    """heretic's config.toml for the settings the one-shot scores with (search/candidate/resident.py)."""
    ab = cfg.abliteration
    return tomlkit.dumps(
        {
            "dtypes": [cfg.model.dtype],
            "batch_size": ab.batch_size,
            "max_response_length": ab.max_response_length,
            "seed": cfg.search.seed,
            "system_prompt": cfg.model.system_prompt,
            # the first token after the template, as the project scores it; heretic's CLI would look for a common
            # response prefix (generating 200 answers) and finds none on either organism
            "response_prefix": "",
            "good_prompts": _dataset(cfg, cfg.prompts.harmless_train),
            "bad_prompts": _dataset(cfg, cfg.prompts.harmful_train),
            "good_evaluation_prompts": _dataset(cfg, cfg.prompts.harmless_eval),
            "bad_evaluation_prompts": _dataset(cfg, cfg.prompts.harmful_eval),
        }
    )


def _env() -> dict[str, str]:
    """This process's environment without HERETIC_* (heretic's Settings read them), offline, wide rich output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERETIC_")}
    return env | {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def _run(command: list[str], cwd: Path) -> str:
    proc = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _found(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text[-3000:]}"
    return match


@pytest.mark.parametrize("organism", list(CASES))
def test_heretic_cli_scores_the_saved_candidate_as_the_one_shot(organism: str, tmp_path: Path) -> None:
    toml, rel = CASES[organism]
    # runs under tmp_path (the module I/O cache too); the one-shot never serves, so any python passes the path check
    config = write_study_config(
        toml, tmp_path / "study.toml", runs_dir=tmp_path / "runs", serving={"python": sys.executable}
    )
    cfg = load_config(config)
    params = AraParameters(**cfg.search.enqueue[0])  # the organism's enqueued demo candidate
    candidate = tmp_path / "candidate"
    ours = _run(
        [*CLI, "abliterate", str(config), "--params", json.dumps(params.model_dump()), "--out", str(candidate)],
        tmp_path,
    )
    our_kl = float(_found(r"KL divergence\W+([0-9.]+)", ours).group(1))
    our_refusals = _found(r"(\d+)/(\d+) harmful eval prompts", ours).groups()

    work = tmp_path / "heretic"
    work.mkdir()
    (work / "config.toml").write_text(heretic_config(cfg))
    body = cfg.model.target
    launcher = [str(HERETIC)] if organism == "organism" else [sys.executable, "-c", HERETIC_WITHOUT_PROCESSOR]
    theirs = _run([*launcher, "--model", body, "--evaluate-model", str(candidate)], work)
    evaluated = theirs[theirs.index("Evaluating...") :]  # the candidate's score, after the vanilla model's
    their_kl = float(_found(r"KL divergence: ([0-9.]+)", evaluated).group(1))
    their_refusals = _found(r"Refusals: (\d+)/(\d+)", evaluated).groups()

    assert our_refusals == their_refusals
    assert abs(our_kl - their_kl) <= rel * their_kl + PRINTED, (our_kl, their_kl)


def _first_token_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


def test_deployed_is_the_saved_checkpoint_bit_for_bit_and_is_undone(resident: Resident, tmp_path: Path) -> None:
    """What the objectives score (`Abliterator.deployed`) is what the checkpoint computes, bit for bit; the adapters'
    own BF16 DoRA forward is not (the 5 % of #40), and leaving the context gives it back exactly."""
    resident.apply(AraParameters(**ORGANISM_CONFIG.search.enqueue[0]))
    tokenizer = resident.model.tokenizer
    rendered = resident.model.render(resident.prompts("good_evaluation_prompts")[:16])
    inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
    model = resident.model.model
    adapters = _first_token_logits(model, inputs)
    with resident.abliterator.deployed():
        deployed = _first_token_logits(model, inputs)
    assert torch.equal(_first_token_logits(model, inputs), adapters)
    out = resident.abliterator.save_merged(tmp_path / "candidate", resident.local_dir())
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype).eval()
    assert torch.equal(_first_token_logits(saved, inputs), deployed)
    assert not torch.equal(deployed, adapters)
