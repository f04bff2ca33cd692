"""Commands return their results and the CLI prints them: a Python caller of ``run()`` gets the result without
the command writing tables to the terminal, and ``satcli <command>`` still shows them (``-q``: not at all)."""

from typer.testing import CliRunner

from satcli.cli import app
from satcli.commands.preprocess import run
from satcli.core.console import console
from satcli.data.preprocess import PreprocessOptions, summary_table
from satcli.data.store import DatasetKind


def test_preprocess_returns_its_summary_and_only_the_cli_prints_it(tmp_path):
    options = PreprocessOptions(DatasetKind.shapes, data_root=tmp_path / "data", n_train=6, n_val=2, n_test=2,
                                n_heldout=0, min_word_freq=1)
    with console.capture() as captured:
        result = run(options)
    assert "Preprocessed" not in captured.get()
    with console.capture() as captured:
        console.print(summary_table(result, options))
    assert "Preprocessed shapes" in captured.get() and "total" in captured.get()

    arguments = ["preprocess", "--dataset", "shapes", "--n-train", "6", "--n-val", "2", "--n-test", "2",
                 "--n-heldout", "0", "--data-root", str(tmp_path / "cli"), "--min-word-freq", "1"]
    shown = CliRunner().invoke(app, arguments)
    assert shown.exit_code == 0 and "Preprocessed shapes" in shown.output
    quiet = CliRunner().invoke(app, [*arguments[:-4], "--data-root", str(tmp_path / "quiet"), "--min-word-freq",
                                     "1", "-q"])
    assert quiet.exit_code == 0 and "Preprocessed" not in quiet.output
