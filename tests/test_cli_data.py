"""`modsquad data synth` and `modsquad data check` through typer's CliRunner."""

import shutil

from typer.testing import CliRunner

from modsquad.cli import app

runner = CliRunner()


def _flat(res) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(res.output.split())


def test_synth_then_check(tmp_path):
    out = tmp_path / "synth"
    res = runner.invoke(app, ["data", "synth", str(out), "--images", "6", "--size", "24", "--seed", "2",
                              "--buildings", "3"])
    assert res.exit_code == 0, res.output
    assert "wrote 6 images of 24x24" in res.output and "train" in res.output
    assert len(list((out / "rgb").rglob("*.png"))) == 6

    res = runner.invoke(app, ["data", "synth", str(out), "--images", "6", "--size", "24", "--seed", "2",
                              "--buildings", "3"])
    assert res.exit_code == 0 and "already holds" in res.output

    res = runner.invoke(app, ["data", "check", str(out), "--tasks", "normal,depth_euclidean"])
    assert res.exit_code == 0, res.output
    assert "ok for normal, depth_euclidean" in res.output

    bad = sorted((out / "normal").rglob("*.png"))[0]
    bad.write_bytes(b"garbage")
    res = runner.invoke(app, ["data", "check", str(out), "--tasks", "normal"])
    assert res.exit_code == 2
    assert "error:" in res.output and "normal: 1 unreadable" in _flat(res)
    assert "unreadable" in res.output and bad.name in res.output
    res = runner.invoke(app, ["data", "check", str(out), "--tasks", "depth_euclidean"])
    assert res.exit_code == 0, res.output


def test_check_pascal_and_bad_input(tmp_path):
    from data.pascal_fixture import make_pascal_context_tree

    make_pascal_context_tree(tmp_path / "pascal")
    res = runner.invoke(app, ["data", "check", str(tmp_path / "pascal"), "--format", "pascal-context"])
    assert res.exit_code == 0, res.output
    shutil.rmtree(tmp_path / "pascal" / "sal_distill")
    res = runner.invoke(app, ["data", "check", str(tmp_path / "pascal"), "--format", "pascal-context",
                              "--tasks", "sal"])
    assert res.exit_code == 2 and "sal: no usable files" in _flat(res)

    for args in (["data", "check", str(tmp_path / "nowhere")],
                 ["data", "check", str(tmp_path), "--format", "coco"],
                 ["data", "synth", str(tmp_path / "s"), "--images", "2", "--buildings", "3"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "error:" in res.output and "Traceback" not in res.output, args
