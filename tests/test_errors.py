"""User errors vs bugs, in process: which exceptions become one line, run-folder cleanup, sweep
markers and summary, eval.py's argument checks, and no FutureWarning from the fvcore import."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dyrelu
from dyrelu.errors import BadNameError, BadValueError, CorruptDataError, MissingPathError, UserError
from engine import errors
from runs import ROOT, compose, env


def test_user_errors_are_still_the_builtin_exceptions_callers_catch():
    from data.coco import CocoFormatError, CocoImageError
    from data.imagenet import BadImageError, DatasetRootError
    from dyrelu.errors import NonFiniteLossError
    from engine.validate import ConfigError

    assert issubclass(BadValueError, ValueError) and issubclass(BadNameError, ValueError)
    assert issubclass(MissingPathError, FileNotFoundError)
    assert issubclass(DatasetRootError, MissingPathError) and issubclass(DatasetRootError, ValueError)
    assert issubclass(BadImageError, CorruptDataError) and issubclass(BadImageError, RuntimeError)
    assert issubclass(CocoFormatError, CorruptDataError) and issubclass(CocoFormatError, ValueError)
    assert issubclass(CocoImageError, CorruptDataError) and issubclass(CocoImageError, OSError)
    assert issubclass(NonFiniteLossError, UserError) and issubclass(NonFiniteLossError, RuntimeError)
    assert issubclass(ConfigError, BadValueError)
    # DataLoader workers re-raise by type and message: the types must survive pickling.
    import pickle

    err = pickle.loads(pickle.dumps(BadImageError("/x.JPEG", "empty file")))
    assert isinstance(err, UserError) and err.path == "/x.JPEG"


def test_library_arguments_raise_user_errors():
    with pytest.raises(BadNameError, match="unknown activation 'swish'"):
        dyrelu.build_act("swish", 8)
    with pytest.raises(BadValueError, match="k=0"):
        dyrelu.DyReLU(8, k=0)
    act = dyrelu.DyReLU(8)
    with pytest.raises(ValueError) as e:  # a wrong input shape is the caller's code, not a setting
        act(torch.randn(2, 5, 4, 4))
    assert not isinstance(e.value, UserError)


def test_hydra_instantiate_wrapping_is_unwrapped_only_for_user_errors():
    with pytest.raises(InstantiationException) as e:
        instantiate({"_target_": "models.build_model", "name": "resnet18", "act": "maxout", "num_classes": 10})
    inner = errors.user_error(e.value)
    assert isinstance(inner, BadValueError) and "act=maxout" in str(inner)
    with pytest.raises(InstantiationException) as e:
        instantiate({"_target_": "builtins.int", "x": "not a number"})  # a plain ValueError inside
    assert errors.user_error(e.value) is None
    assert errors.user_error(ValueError("plain")) is None


def test_exit_on_user_error_exits_2_and_lets_bugs_through(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        with errors.exit_on_user_error():
            raise BadValueError("optim.lr='fast' is not valid")
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: optim.lr='fast' is not valid\n"
    with pytest.raises(ValueError, match="a bug"):
        with errors.exit_on_user_error():
            raise ValueError("a bug")


def test_an_error_from_a_dataloader_worker_is_still_one_line(capsys):
    from torch._utils import ExceptionWrapper

    from data.imagenet import BadImageError

    try:
        raise BadImageError("/data/val/n01/x.JPEG", "empty file (0 bytes)")
    except BadImageError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(SystemExit):
        with errors.exit_on_user_error():
            wrapped.reraise()  # what a DataLoader does in the main process
    assert capsys.readouterr().err == "error: bad image file /data/val/n01/x.JPEG: empty file (0 bytes)\n"


def test_a_failed_start_removes_only_an_untouched_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "outputs" / "cls" / "m-a" / "t1"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / "train.log").write_text("")
    trained = tmp_path / "outputs" / "cls" / "m-b" / "t1"
    (trained / "checkpoints").mkdir(parents=True)
    (trained / "train.log").write_text("")
    for run_dir in (fresh, trained):
        with pytest.raises(SystemExit):
            with errors.exit_on_user_error(run_dir):
                raise BadValueError("bad")
    assert not (tmp_path / "outputs" / "cls" / "m-a").exists()  # its empty parent went too
    assert (trained / "checkpoints").is_dir() and (trained / "train.log").is_file()
    # hydra.run.dir=. : the working directory itself is never removed
    here = tmp_path / "here"
    (here / ".hydra").mkdir(parents=True)
    monkeypatch.chdir(here)
    assert not errors.remove_if_untouched(here) and (here / ".hydra").is_dir()


def test_missing_mandatory_values_name_the_key_and_the_fix():
    cfg = compose(["data=imagenet"])
    with pytest.raises(BadValueError) as e:
        errors.check_mandatory(cfg, "python train.py")
    assert str(e.value) == "data.root is not set (???): run python train.py data.root=/path/to/dataset"
    errors.check_mandatory(compose(["data=imagenet", "data.root=/x"]), "python train.py")
    errors.check_mandatory(compose(["task=kpt", "data=coco"]), "python train.py")  # explicit paths may do


def test_eval_arguments():
    from engine.evaluate import apply_overrides, parse_command_line

    ckpt, data, over = parse_command_line(["ckpt=/r/0_act=relu,seed=1/checkpoints/best.pt", "data=coco",
                                           "data.root=/coco", "trainer.limit_val_batches=3", "+data.extra=1"])
    assert ckpt == "/r/0_act=relu,seed=1/checkpoints/best.pt" and data == "coco"
    assert over == {"data.root": ("/coco", False), "trainer.limit_val_batches": (3, False), "data.extra": (1, True)}
    with pytest.raises(BadValueError, match="ckpt is not set"):
        parse_command_line(["data.root=/x"])
    with pytest.raises(BadValueError, match="one checkpoint"):
        parse_command_line(["ckpt=a.pt", "data.batch_size=16,32"])
    cfg = OmegaConf.create({"data": {"root": None, "batch_size": 8}, "model": {"name": "m"}})
    apply_overrides(cfg, {"data.root": ("/x", False), "data.new": (1, True)})
    assert cfg.data.root == "/x" and cfg.data.new == 1
    with pytest.raises(BadNameError, match="did you mean data.batch_size"):
        apply_overrides(cfg, {"data.batch_sise": (4, False)})
    with pytest.raises(BadValueError, match="only data=<name>"):
        apply_overrides(cfg, {"model": ("resnet18", False)})


def test_eval_switching_to_a_data_config_with_a_mandatory_root_asks_for_it(tmp_path):
    from engine.evaluate import evaluate_checkpoint

    ckpt = tmp_path / "best.pt"
    torch.save({"config": OmegaConf.to_container(compose([]), resolve=True), "model": {}, "epoch": 1}, ckpt)
    with pytest.raises(BadValueError) as e:
        evaluate_checkpoint([f"ckpt={ckpt}", "data=imagenet"])
    assert str(e.value) == f"data.root is not set (???): run python eval.py ckpt={ckpt} data.root=/path/to/dataset"


def test_no_jit_script_future_warning_from_counting_complexity():
    """fvcore.nn runs torch.jit.script when imported; the import is the only place it is silenced."""
    code = ("import torch, dyrelu\nfrom dyrelu.flops import count_complexity\n"
            "count_complexity(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), dyrelu.build_act('dyrelu_b', 4)), (3, 16, 16))\n"
            "import warnings\nwith warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    torch.jit.script(torch.nn.ReLU())\nassert any('jit.script' in str(x.message) for x in w), 'torch stopped warning'\n")
    p = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FutureWarning" not in p.stderr
