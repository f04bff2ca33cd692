import pytest
from typer.testing import CliRunner

from satcli.cli import app
from satcli.core.errors import SatcliError
from satcli.core.version import __version__

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("encoders",):
        assert command in result.output


@pytest.mark.parametrize("command", ["encoders"])
def test_each_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_encoders_lists_offline_weights():
    result = runner.invoke(app, ["encoders"])
    assert result.exit_code == 0
    assert "efficientnet-lite0" in result.output and "resnet101" in result.output and "vgg16" in result.output
    assert "7×7" in result.output


def test_user_errors_are_one_red_line_and_exit_1(monkeypatch):
    import models.encoders

    def broken():
        raise SatcliError("something the user can fix", "photos/cat.jpg")

    monkeypatch.setattr(models.encoders, "ENCODERS", _Raising(broken))
    result = runner.invoke(app, ["encoders"])
    assert result.exit_code == 1
    assert "photos/cat.jpg: something the user can fix" in result.output
    assert "Traceback" not in result.output


class _Raising(dict):
    def __init__(self, raise_):
        super().__init__()
        self._raise = raise_

    def items(self):
        self._raise()


def test_train_passes_its_options_through(monkeypatch, tmp_path):
    import satcli.commands.train
    from satcli.training import TrainResult

    received = []

    def run(options):
        received.append(options)
        return TrainResult(tmp_path, tmp_path / "best.pt", tmp_path / "last.pt", 0, -1.0)

    monkeypatch.setattr(satcli.commands.train, "run", run)
    result = runner.invoke(app, ["train", "--dataset", "shapes", "--data-root", str(tmp_path), "--attention", "hard",
                                 "--lr-patience", "1", "--patience", "6", "--decoder-lr", "2e-3", "--epochs", "6"])
    assert result.exit_code == 0, result.output
    (options,) = received
    assert (options.dataset, options.attention, options.lr_patience, options.patience) == ("shapes", "hard", 1, 6)
    assert (options.decoder_lr, options.epochs, options.out) == (2e-3, 6, None)
    assert options.data_root == tmp_path


def test_train_command_defaults_are_the_libraries_defaults():
    # `satcli train` with no options must train what `satcli.api.train(TrainOptions(...))` trains: the CLI spells
    # its defaults out (it keeps torch unimported), so a default changed in one place only would split the two.
    import dataclasses

    import typer.main

    from satcli.training.options import TrainOptions

    library = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}
    command = typer.main.get_command(app).commands["train"]
    shared = [p for p in command.params if p.name in library]
    assert len(shared) >= 30
    assert {p.name: p.default for p in shared} == {p.name: library[p.name] for p in shared}
