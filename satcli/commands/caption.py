"""``satcli caption``: photos → one results Parquet row each (caption, words, attention), then, when asked, the
attention pictures. The work is :mod:`satcli.captioning`'s; cli.py prints the returned summary."""

from __future__ import annotations

from satcli.captioning.options import CaptionOptions, CaptionSummary
from satcli.captioning.pipeline import caption_images
from satcli.captioning.plan import CaptionPlan, plan_caption
from satcli.pictures.overlays import write_overlays

__all__ = ["CaptionOptions", "CaptionPlan", "CaptionSummary", "plan", "run"]


def run(options: CaptionOptions) -> CaptionSummary:
    """Caption every image named by ``options.inputs`` into ``options.output`` (or this shard's part), then
    draw the attention pictures into ``options.overlays`` when asked (after the Parquet: the captioning loop
    never waits for them, and an interrupted run keeps its captions)."""
    if options.engine == "ray":
        from satcli.engines.ray_job import caption_with_ray  # ray only when asked for

        summary = caption_with_ray(options)
    else:
        summary = caption_images(options)
    if options.overlays is not None:
        summary.overlays = write_overlays(summary.output, options.root, options.overlays, progress=options.progress)
    return summary


def plan(options: CaptionOptions) -> CaptionPlan:
    """``--dry-run``: the checks the run makes first, and what it would do; nothing is captioned or written."""
    return plan_caption(options)
