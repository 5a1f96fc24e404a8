"""Each exercise checker fails on the untouched exercise, passes on the solution, and names typical bugs."""

from pathlib import Path

import pytest

from rso_np.check import EXERCISES, main, run_check

EX = Path(__file__).resolve().parents[1] / "tutorials" / "exercises"


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_untouched_exercise_fails(name):
    ok, msg = run_check(name, EX / EXERCISES[name])
    assert not ok
    assert "not written yet" in msg and "TODO" in msg


@pytest.mark.parametrize("name", sorted(EXERCISES))
def test_solution_passes(name, capsys):
    assert main([name, str(EX / "solutions" / EXERCISES[name])]) == 0
    assert capsys.readouterr().out.startswith("PASS: ")


def write(tmp_path, text):
    p = tmp_path / "student.py"
    p.write_text(text)
    return p


def test_checker_names_wrong_shape_and_element(tmp_path):
    sol = (EX / "solutions" / "ex1_conv.py").read_text()
    # forgot to transpose the output back to NCHW
    bug = sol.replace("return out.reshape(N, OH, OW, C_out).transpose(0, 3, 1, 2)", "return out.reshape(N, OH, OW, C_out)")
    ok, msg = run_check("conv", write(tmp_path, bug))
    assert not ok and msg.startswith("conv2d(") and "shape (1, 3, 3, 1), expected (1, 1, 3, 3)" in msg
    # a kernel offset read from the wrong place: the first wrong element is named with expected vs got
    bug = sol.replace("xpad[:, :, i:i + stride * OH:stride, j:j + stride * OW:stride]",
                      "xpad[:, :, j:j + stride * OH:stride, i:i + stride * OW:stride]")
    ok, msg = run_check("conv", write(tmp_path, bug))
    assert not ok and "im2col(" in msg and "first at index" in msg and "expected" in msg and "got" in msg


def test_checker_explains_overflow(tmp_path):
    naive = ("import numpy as np\n"
             "def logit_cross_entropy(logits, labels):\n"
             "    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)\n"
             "    return float(-np.log(p[np.arange(len(labels)), labels]).mean())\n")
    ok, msg = run_check("xent", write(tmp_path, naive))
    assert not ok and "log-sum-exp" in msg


def test_checker_rso_step_tie_rule(tmp_path):
    sol = (EX / "solutions" / "ex4_rso_step.py").read_text()
    bug = sol.replace("k = 1 if losses[1] == best else (0 if losses[0] == best else 2)",
                      "k = losses.index(best)")      # a tie picks +dW instead of keeping W
    ok, msg = run_check("rso_step", write(tmp_path, bug))
    assert not ok and "expected choice keep, got +dW" in msg


def test_checker_frozen_bn_names_the_semantics(tmp_path):
    sol = (EX / "solutions" / "ex5_frozen_bn.py").read_text()
    # the pseudocode's per-trial statistics: each batch norm normalises x with x's own
    bug = sol.replace("mean, var = batch_stats(h_ref)", "mean, var = batch_stats(h)")
    ok, msg = run_check("frozen_bn", write(tmp_path, bug))
    assert not ok and "statistics of x itself" in msg and "reference batch" in msg
    # the unbiased variance
    bug = sol.replace("var = x.var(axis=(0, 2, 3), dtype=np.float64)", "var = x.var(axis=(0, 2, 3), dtype=np.float64, ddof=1)")
    ok, msg = run_check("frozen_bn", write(tmp_path, bug))
    assert not ok and "unbiased variance" in msg
    # the reference batch not normalised on its way
    bug = sol.replace("h_ref = batch_norm2d(h_ref, g, b, mean, var, layer.eps)", "pass")
    ok, msg = run_check("frozen_bn", write(tmp_path, bug))
    assert not ok and "x_ref went past a batch norm without being normalised" in msg
    # the layer's epsilon left out: the first element that differs
    bug = sol.replace("h = batch_norm2d(h, g, b, mean, var, layer.eps)", "h = batch_norm2d(h, g, b, mean, var)")
    assert bug != sol
    ok, msg = run_check("frozen_bn", write(tmp_path, bug))
    assert not ok and msg.startswith("stored_input(model.layers[:7], x_ref, x), the input of conv3") and "expected" in msg


def test_unknown_exercise_and_missing_file(tmp_path):
    assert run_check("backprop") == (False, "unknown exercise 'backprop'; choose one of "
                                            "['conv', 'frozen_bn', 'maxpool', 'rso_step', 'xent']")
    ok, msg = run_check("conv", tmp_path / "nope.py")
    assert not ok and "no such file" in msg
