"""trainer.compile_mode: torch.compile's mode reaches model.compile (reduce-overhead: CUDA graphs).

On the CPU the compile itself is not run here (minutes); what the CPU can check is the wiring, the
mode's meaning in Inductor, and that our ops carry no host sync (tests/test_count_ops.py counts
aten::_local_scalar_dense in a whole step on fake CUDA: zero), which a captured graph requires."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from dyrelu.errors import BadValueError
from engine.distributed import DistInfo
from engine.runtime import COMPILE_MODES, wrap_for_training

ROOT = Path(__file__).resolve().parents[1]


class _Model(torch.nn.Module):
    def compile(self, **kwargs):  # records what torch.compile would get
        self.compiled_with = kwargs


def _cfg(**trainer):
    return OmegaConf.create({"trainer": {"compile": True, **trainer}})


def test_default_config_names_the_mode():
    cfg = yaml.safe_load((ROOT / "configs/trainer/default.yaml").read_text())
    assert cfg["compile_mode"] == "default" and cfg["compile"] is False


@pytest.mark.parametrize("mode, passed", [("default", None), ("reduce-overhead", "reduce-overhead"),
                                          ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_mode_reaches_model_compile(mode, passed):
    m = wrap_for_training(_Model(), _cfg(compile_mode=mode), torch.device("cpu"), DistInfo())
    assert m.compiled_with == {"mode": passed}


def test_reduce_overhead_means_cuda_graphs_and_a_bad_mode_is_refused():
    assert torch._inductor.list_mode_options("reduce-overhead")["triton.cudagraphs"] is True
    assert set(COMPILE_MODES) >= {"default", "reduce-overhead"}
    with pytest.raises(BadValueError, match="compile_mode"):
        wrap_for_training(_Model(), _cfg(compile_mode="fast"), torch.device("cpu"), DistInfo())



def test_validate_has_a_rule_naming_the_valid_modes():
    """engine.validate refuses a bad trainer.compile_mode before anything is built, naming the valid
    ones (its one-line message: "<key>=<value> is not valid: expected <allowed>")."""
    from engine.validate import _RULES

    (ok, allowed), = [(ok, allowed) for key, ok, allowed in _RULES if key == "trainer.compile_mode"]
    assert allowed == "one of default, reduce-overhead, max-autotune-no-cudagraphs"
    assert all(ok(m) for m in COMPILE_MODES) and ok(None)
    assert not ok("max-autotune") and not ok("") and not ok(True)
