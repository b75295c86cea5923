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


def test_validate_refuses_a_bad_mode_before_anything_is_built():
    """engine.validate names the valid modes in one line (trainer.compile=false included: caught at once)."""
    from runs import compose

    from engine.validate import ConfigError, validate

    cfg = compose(["trainer.compile_mode=max-autotune"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value) == ("trainer.compile_mode='max-autotune' is not valid: expected one of "
                              "default, reduce-overhead, max-autotune-no-cudagraphs")
    validate(compose(["trainer.compile_mode=reduce-overhead"]))
