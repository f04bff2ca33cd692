"""Scoring captions: decoding a split for scoring (:mod:`satcli.scoring.decode`)."""
