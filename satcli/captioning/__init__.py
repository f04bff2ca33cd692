"""Captioning: stream photo directories through batched beam search into a results Parquet file.

One module per job: ``sources/`` (where pictures come from: local files, fsspec URLs, WebDataset tar shards and
Parquet, each yielding the same ``Sample``), ``samples`` (``caption_samples``: the one decode-and-caption path of
the Python API, sharded runs and the engine adapters), ``sharded`` (runs over input shards: one results file per
shard, resumed by shard), ``shards`` (which share of the images, and every part-file name),
``options`` (what was asked, what was done), ``loading`` (image decoding in DataLoader workers), ``model`` (the
captioner on its device), ``fingerprint`` (what a resumed run must match), ``state`` (the resume sidecar),
``writer`` (results to disk on a thread) and ``pipeline`` (the run that ties them together).

The pipeline keeps the model busy: DataLoader worker processes open, decode and shrink images (uint8, so
little crosses the process boundary); the main process normalises whole batches on the device and runs the
encoder and the batched beam search; a writer thread turns results into Arrow and writes them, so the device
never waits for the disk.

Resuming. Each batch of results is written as its own small Parquet file ("chunk"), atomically, into a
sidecar directory next to the output (``captions.parquet.partial/``). A rerun of the same command skips the
images already in chunks — batches are cut at fixed positions of the sorted input list, so the resumed run
sees exactly the batches an uninterrupted one would — and when every image is done the chunks are merged
into the output (temporary file + rename) and the sidecar is removed. A kill at any moment loses at most the
``UNSAVED_BATCHES`` (2) batches: the one being written and the one on the device; with a slow disk the device
waits rather than run ahead. A finished output is extended the same way when new images appear under the inputs.

Sharding. Under ``torchrun`` (``RANK``/``WORLD_SIZE``) or with ``--shard K/N``, rank K captions every N-th
image of the sorted list, starting at the K-th, into ``captions.part-K-of-N.parquet``; ``satcli merge``
joins the parts.
"""
