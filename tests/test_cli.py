from typer.testing import CliRunner

from mlx_diffgemma import __version__
from mlx_diffgemma.cli import app

runner = CliRunner()


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and f"mlx_diffgemma {__version__}" in r.output
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "parity" in r.output and "info" in r.output


def test_info(checkpoint):
    r = runner.invoke(app, ["info", str(checkpoint("two_full"))])
    assert r.exit_code == 0, r.output
    assert "8 (3 full: [1, 4, 7]; sliding window 8)" in r.output
    assert "16 experts x 32, top-4" in r.output


def test_info_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["info", str(tmp_path / "nope")])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [f"error: model folder {tmp_path / 'nope'} does not exist"]
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    r = runner.invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 1 and "model_type is 'bert'" in r.output
