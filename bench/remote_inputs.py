"""Remote shards against local files: images/s of ``satcli caption`` over (a) a local folder of JPEGs, (b) the
same JPEGs as WebDataset tar shards on a local S3 server, (c) the same shards through Ray Data with 2 actors, and
resident memory over many shards.

    python -m bench.remote_inputs [--images 256] [--shard-size 32] [--memory-shards 100] [--write]
    python -m bench.remote_inputs --quick [--write]     # 64 images, 640×480, 100 small shards for memory

Each shard is captioned as its own stream (its file is written as soon as its last batch is done), so a
shard's first batch is read and decoded before the device starts on it and its last batch has nothing to
overlap with: shards much larger than a batch (img2dataset writes 10,000 samples a shard) make that cost
vanish; shards of one or two batches show it.

The S3 server is moto's (``python -m moto.server``) on 127.0.0.1 in a process of its own, so the memory measured
is satcli's alone. (a) and (b) caption the same images with the same checkpoint (EfficientNet-Lite0 with its
ImageNet weights, a random 512/512/512 decoder, 2,500 words: ``bench.caption_throughput.make_checkpoint``), batch
size, beam and maximum length, in-process through ``satcli.commands.caption.run``, timed from the call to its
return: (a) with its DataLoader workers and one results file, (b) listing, streaming each shard from the server,
decoding in threads and uploading one results file per shard. The memory run captions ``--memory-shards``
shards from the server into a local folder, sampling the process's resident memory (RSS) every 0.2 s with the
number of shards done: it must not grow with the shards.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from bench.caption_throughput import make_checkpoint, make_photos
from bench.common import command, machine, write_section
from satcli.captioning.options import CaptionOptions
from satcli.commands.caption import run


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, dict]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    return server, {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}


def shard_bytes(files: list[Path]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for file in files:
            archive.add(file, arcname=file.name)
    return buffer.getvalue()


def upload_shards(fs, bucket: str, files: list[Path], shard_size: int, prefix: str) -> str:
    """The files as tar shards ``bucket/prefix/NNNNN.tar``; returns the brace pattern naming them."""
    n = 0
    for n, start in enumerate(range(0, len(files), shard_size)):
        fs.pipe_file(f"{bucket}/{prefix}/{n:05d}.tar", shard_bytes(files[start:start + shard_size]))
    return f"s3://{bucket}/{prefix}/{{00000..{n:05d}}}.tar"


def timed(options: CaptionOptions) -> float:
    start = time.perf_counter()
    summary = run(options)
    seconds = time.perf_counter() - start
    assert summary.n_captioned == summary.n_images and summary.n_errors == 0, "every bench image must be captioned"
    return summary.n_images / seconds


def memory_run(options: CaptionOptions, output: Path, n_shards: int) -> list[tuple[int, float]]:
    """(shards done, RSS MiB) samples while ``options`` runs."""
    samples: list[tuple[int, float]] = [(0, rss_mib())]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((len(list(output.glob("*.parquet"))) if output.exists() else 0, rss_mib()))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        summary = run(options)
    finally:
        done.set()
        thread.join()
    samples.append((n_shards, rss_mib()))
    assert summary.n_shards == n_shards and summary.n_errors == 0
    return samples


def ray_run(pattern: str, storage: dict, common: dict, actors: int) -> float | None:
    """(c): the same shards through ``satcli caption --engine ray`` with ``actors`` actors on a local Ray cluster
    of 2 CPUs, started (and its actors' first start paid) before the timed run; None without ray."""
    try:
        import ray
    except ImportError:
        return None
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = dict(inputs=(pattern,), storage_options=storage, engine="ray", actors=actors, **common)
        run(CaptionOptions(output="s3://bench/ray-warm", **options))  # the actors' pool, once
        return timed(CaptionOptions(output="s3://bench/ray-out", **options))
    finally:
        ray.shutdown()


def ray_row(rate: float | None, local: float, n_shards: int, actors: int) -> str:
    if rate is None:
        return "| (c) the same shards through Ray: not run (`pip install 'satcli[ray]'`) | | |"
    return (f"| (c) the same {n_shards} shards from S3 through `--engine ray`, {actors} actors of 1 thread, on a local "
            f"Ray cluster of 2 CPUs | {rate:.1f} | {rate / local:.2f} |")


def at(samples: list[tuple[int, float]], shards: int) -> float:
    return max((rss for done, rss in samples if done <= shards), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="1600x1200", help="JPEG size, WxH")
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--memory-shards", type=int, default=100)
    parser.add_argument("--memory-shard-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=12)
    parser.add_argument("--quick", action="store_true",
                        help="64 640×480 images in shards of 32, batches of 16; memory over 100 shards of 2")
    parser.add_argument("--actors", type=int, default=2, help="(c): Ray actors (0: skip Ray)")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.quick:
        args.images, args.size, args.shard_size, args.batch_size, args.memory_shard_size = 64, "640x480", 32, 16, 2
    width, height = (int(v) for v in args.size.split("x"))
    import s3fs

    server, storage = start_s3()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            files = make_photos(root / "photos", args.images, (width, height))
            checkpoint = make_checkpoint(root, "efficientnet-lite0")
            fs = s3fs.S3FileSystem(endpoint_url=storage["endpoint_url"], key="bench", secret="bench",
                                   skip_instance_cache=True)
            fs.mkdir("bench")
            pattern = upload_shards(fs, "bench", files, args.shard_size, "shards")
            common = dict(model=checkpoint, batch_size=args.batch_size, beam_size=args.beam,
                          max_length=args.max_length, device="cpu", progress=False)
            run(CaptionOptions(inputs=(str(files[0]),), output=root / "warm.parquet", **common))  # warm the caches
            local = timed(CaptionOptions(inputs=(str(root / "photos"),), output=root / "local.parquet", **common))
            remote = timed(CaptionOptions(inputs=(pattern,), output="s3://bench/out", storage_options=storage,
                                          **common))
            ray_rate = ray_run(pattern, storage, common, args.actors) if args.actors else None
            memory_files = (files * (1 + args.memory_shards * args.memory_shard_size // len(files)))[
                : args.memory_shards * args.memory_shard_size]
            many = upload_shards(fs, "bench", memory_files, args.memory_shard_size, "many")
            samples = memory_run(CaptionOptions(inputs=(many,), output=root / "many", storage_options=storage,
                                                **common), root / "many", args.memory_shards)
    finally:
        server.terminate()
        server.wait()
    n = args.memory_shards
    n_shards = -(-args.images // args.shard_size)
    body = f"""Command: `{command()}`

Machine: {machine()}

{args.images} JPEGs of {width}×{height}, EfficientNet-Lite0 224 px, random 512/512/512 decoder, beam {args.beam}, max
length {args.max_length}, batch size {args.batch_size}; S3: moto's server on 127.0.0.1 in its own process.

| input | images/s | ratio to (a) |
|---|---:|---:|
| (a) local folder of JPEGs, one results file | {local:.1f} | 1.00 |
| (b) the same JPEGs as {n_shards} WebDataset shards on S3, a results file per shard on S3 | {remote:.1f} | \
{remote / local:.2f} |
{ray_row(ray_rate, local, n_shards, args.actors)}

Resident memory (RSS, MiB) captioning {n} shards of {args.memory_shard_size} images from S3 into a local folder:
before {samples[0][1]:.0f}; up to shard {max(1, n // 10)} {at(samples, max(1, n // 10)):.0f}; up to shard {n // 2}
{at(samples, n // 2):.0f}; up to shard {n} {at(samples, n):.0f}; peak {max(r for _, r in samples):.0f}.
"""
    print(body)
    if args.write:
        write_section("Remote shards against local files (bench/remote_inputs.py)", body)


if __name__ == "__main__":
    main()
