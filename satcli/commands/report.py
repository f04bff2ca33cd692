"""``satcli report``: a results file as an HTML page (satcli.pictures.report does the work)."""

from __future__ import annotations

from satcli.pictures.report import ReportOptions, ReportSummary, build_report

__all__ = ["ReportOptions", "ReportSummary", "run"]


def run(options: ReportOptions) -> ReportSummary:
    """Run the command; the CLI prints what it returns."""
    return build_report(options)
