"""Losses, metrics and forward adapters that do not fit the model are refused before the first point, in one line
that names the callable (issue 21, items 4, 5 and 16)."""

from __future__ import annotations

import importlib
import textwrap

import pytest
import torch
import torch.nn.functional as F

import widthkit
from widthkit.engine.objectives import Objective

rays_cmd = importlib.import_module("widthkit.rays")

pytestmark = pytest.mark.usefixtures("one_thread")

# the user's own module of losses and adapters, imported by name as --loss / --forward do
USER_MODULE = '''
import torch.nn.functional as F


def short(output, target):  # one value too few
    return F.cross_entropy(output, target, reduction="none")[1:]


def matrix(output, target):  # (B, C): the per-class log-probabilities, not one value per example
    return -F.log_softmax(output, dim=1)


def pair(model, x):  # a model API returning (logits, features)
    out = model(x)
    return out, out.detach()


def wrong_call(model, x):  # TypeError from the model: the adapter passes an argument it does not take
    return model(x, 3)


def refuses(model, x):
    raise ValueError("no images of this kind")


def loss_typo(output, target):
    return F.cross_entropy(output, target, reduce_mode="none")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mylab.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mylab"
    import sys

    sys.modules.pop("mylab", None)


def _rays(ckpt, out, *flags):
    return rays_cmd.main(["--ckpt", ckpt, "--dirs", "1", "--steps", "2", "--bn", "keep", "--quiet", "--no-plot",
                          "--train-subset", "20", "--test-subset", "20", "--out", str(out), *flags])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("loss, shape", [("short", "(1,)"), ("matrix", "(2, 10)")])
def test_a_loss_returning_the_wrong_shape_is_refused_before_the_first_point(digits_ckpts, tmp_path, capsys,
                                                                            user_module, loss, shape):
    out = tmp_path / "r.h5"
    assert _rays(digits_ckpts["sgd"], out, "--loss", f"mylab:{loss}") == 2
    err = _one_line(capsys)
    assert f"loss mylab:{loss} returned values shaped {shape} for a batch of 2 examples; it must return one value " \
           "per example, shaped (2,)" in err, err
    assert not out.exists() and not list(tmp_path.glob(".r.h5*"))


def test_a_metric_callable_returning_the_wrong_shape_names_itself(digits_ckpts, tmp_path):
    def margin(output, target):  # per class, not per example
        return output - output.gather(1, target[:, None])

    with pytest.raises(ValueError, match=r"metric margin \(.*test_faults_objectives:.*margin\) returned values "
                                         r"shaped \(2, 10\) for a batch of 2 examples"):
        widthkit.rays(digits_ckpts["sgd"], dirs=1, steps=2, bn_mode="keep", metrics={"margin": margin},
                      out=tmp_path / "r.h5")
    assert not (tmp_path / "r.h5").exists()


def test_per_example_values_are_checked_on_every_batch_shape():
    """The check follows the batch: a last batch of 3 wants (3,); a correct callable gives the mean of its values."""
    obj = Objective(metrics={"first": lambda o, y: o[:, 0]})
    out = torch.zeros(2, dtype=torch.float64)
    logits = torch.arange(30.0).reshape(3, 10)
    obj.accumulate(logits, torch.tensor([0, 1, 2]), out)
    assert out.tolist() == [0.0 + 10.0 + 20.0, 3.0]
    obj = Objective(metrics={"first": lambda o, y: o[1:, 0]})
    with pytest.raises(ValueError, match=r"returned values shaped \(2,\) for a batch of 3 examples"):
        obj.accumulate(logits, torch.tensor([0, 1, 2]), out)


def test_a_class_error_beyond_the_models_outputs_is_refused_before_work(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "r.h5"
    assert _rays(digits_ckpts["sgd"], out, "--metrics", "loss,class_err:99") == 2
    err = _one_line(capsys)
    assert "class_err:99 asks for class 99, but the model has 10 outputs: the class index must be in 0..9" in err
    assert not out.exists()


def test_the_last_class_is_accepted_and_measured(digits_ckpts, tmp_path):
    """class_err:9 on the 10-class model: its value is the error among the test images of class 9, as a direct
    computation finds it."""
    from widthkit.inputs.checkpoints import load_checkpoint
    from widthkit.inputs.data import load_dataset

    res = widthkit.rays(digits_ckpts["sgd"], dirs=1, steps=2, bn_mode="keep", metrics="loss,class_err:9",
                        out=tmp_path / "r.h5", device="cpu")
    test = load_dataset("digits", split="test")
    model = load_checkpoint(digits_ckpts["sgd"]).model
    with torch.no_grad():
        pred = model(test.normalized()).argmax(1)
    nine = test.labels == 9
    expected = 100.0 * float((pred[nine] != 9).sum()) / int(nine.sum())
    assert res.metric("test_class_err_9")[0, 0] == pytest.approx(expected, abs=1e-9)


def test_a_forward_returning_a_tuple_is_one_line_with_the_fix(digits_ckpts, tmp_path, capsys, user_module):
    out = tmp_path / "r.h5"
    assert _rays(digits_ckpts["sgd"], out, "--forward", "mylab:pair") == 2
    err = _one_line(capsys)
    assert "forward=mylab:pair returned a tuple of 2 items (Tensor (2, 10), Tensor (2, 10)); the metrics " \
           "['loss', 'err'] need the model's output as one tensor (batch, classes): make it return the logits, " \
           "e.g. lambda m, x: m(x)[0]" in err, err
    assert not out.exists()


@pytest.mark.parametrize("flag, name, said", [
    ("--forward", "wrong_call", "forward=mylab:wrong_call raised TypeError: DigitsCNN.forward() takes 2 positional "
                                "arguments but 3 were given"),
    ("--forward", "refuses", "forward=mylab:refuses raised ValueError: no images of this kind"),
    ("--loss", "loss_typo", "loss mylab:loss_typo raised TypeError: cross_entropy() got an unexpected keyword "
                            "argument 'reduce_mode'"),
])
def test_a_callable_that_raises_is_named_in_one_line(digits_ckpts, tmp_path, capsys, user_module, flag, name, said):
    out = tmp_path / "r.h5"
    assert _rays(digits_ckpts["sgd"], out, flag, f"mylab:{name}") == 2
    assert _one_line(capsys) == f"error: {said}"
    assert not out.exists()


def test_a_model_returning_a_tuple_without_an_adapter_is_told_to_pass_one():
    obj = Objective()
    with pytest.raises(ValueError, match=r"the model returned a tuple of 2 items \(Tensor \(4, 10\), Tensor \(4, "
                                         r"3\)\); the metrics \['loss', 'err'\] need .* pass forward= \(CLI: "
                                         r"--forward module:function\)"):
        obj.accumulate((torch.zeros(4, 10), torch.zeros(4, 3)), torch.zeros(4, dtype=torch.long),
                       torch.zeros(4, dtype=torch.float64))


def test_own_loss_and_metrics_may_take_any_output():
    """A user's loss and metrics that read a tuple output are not refused: the tuple is theirs to interpret."""
    def loss(out, y):
        return F.cross_entropy(out[0], y, reduction="none")

    obj = Objective(loss=loss, metrics="loss")
    acc = torch.zeros(2, dtype=torch.float64)
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    obj.accumulate((logits, None), y, acc)
    assert acc[0].item() == pytest.approx(F.cross_entropy(logits.double(), y, reduction="sum").item(), rel=1e-6)
