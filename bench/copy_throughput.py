"""Throughput of ``LocalFileSystemStorage.copy_workspace`` against ``cp -a``.

Writes a workspace of ``--files`` files totalling ``--total-mib`` MiB (default: 9,900 files
of 4-16 KiB over 100 directories plus 100 larger files making up the rest of 1 GiB; content
from a seeded generator) into a temporary directory under ``--dir``, then copies it with
``cp -a`` and with ``copy_workspace`` alternately (A B A B), ``--rounds`` times each, onto
the same file system. Prints MB/s (10^6 bytes) and files/s of each run, the means, and the
ratio ours/cp. Removes everything it wrote.

The page cache is dropped before each run when this process may write
``/proc/sys/vm/drop_caches``; otherwise every run is warm (the source was just written and
read) and the output says so. Dirty pages are flushed (``sync``, untimed) before each run so
one copy's write-back does not slow the next; neither copier fsyncs. Copies are kept until
the end when the disk has room (deleting them between runs slows the next run's creates).

    .venv/bin/python bench/copy_throughput.py [--dir /tmp] [--rounds 2] [--total-mib 1024]
                                              [--files 10000] [--seed 1] [--threads 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:  # `python bench/x.py`: bench/, not the repository, is on sys.path; harness adds it
    import harness
except ModuleNotFoundError:  # `python -m bench.x`
    from bench import harness
from controllers.base import CopyProgress, ExternalAccount
from controllers.storage.local_fs import LocalFileSystemStorage, copy_engine

MIN_FREE_BYTES = 4 << 30  # the source plus one copy at a time, with room to spare
DIRS = 100
SMALL_SIZES = (4 << 10, 16 << 10)


@dataclass
class Run:
    method: str
    seconds: float
    bytes: int
    files: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e6

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds


# --- the source tree ----------------------------------------------------------------------------


def layout(total: int, files: int, seed: int) -> list[tuple[str, int]]:
    """(relative name, size) of every file: 99% small ones, the rest large, filling ``total``."""
    rng = random.Random(seed)
    large = max(1, files // 100)
    small = files - large
    names = [(f"d{i % DIRS:03d}/small{i:05d}.dat", rng.randint(*SMALL_SIZES)) for i in range(small)]
    remaining = total - sum(size for _, size in names)
    if remaining < large:
        raise SystemExit("--total-mib is too small for that many files")
    for i in range(large):
        size = remaining // large + (1 if i < remaining % large else 0)
        names.append((f"d{i % DIRS:03d}/large{i:03d}.dat", size))
    return names


def write_tree(top: Path, files: list[tuple[str, int]], seed: int) -> None:
    rng = random.Random(seed)
    for name, size in files:
        path = top / name
        path.parent.mkdir(exist_ok=True)
        with open(path, "wb") as out:
            left = size
            while left:  # bounded pieces: a large file is not held in memory at once
                piece = min(left, 8 << 20)
                out.write(rng.randbytes(piece))
                left -= piece


# --- measuring ------------------------------------------------------------------------------------


def drop_caches() -> bool:
    """Flush dirty pages; drop the page cache if allowed. True when it was dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as knob:
            knob.write("3\n")
        return True
    except OSError:
        return False


def run_cp(src: Path, dst: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return time.perf_counter() - started


def run_ours(
    storage: LocalFileSystemStorage, account: ExternalAccount, src: Path, workspace_id: int
) -> tuple[float, CopyProgress, Path]:
    async def copy() -> tuple[float, CopyProgress, Path]:
        dst = storage.workspace_path(account, workspace_id)
        await storage.create_workspace(dst, account)  # what sharing does first; untimed
        latest: list[CopyProgress] = []
        started = time.perf_counter()
        result = await storage.copy_workspace(str(src), dst, account, progress=latest.append)
        return time.perf_counter() - started, result, Path(dst)

    return asyncio.run(copy())


def measure(args: argparse.Namespace, tmp: Path) -> list[Run]:
    user = pwd.getpwuid(os.getuid()).pw_name
    account = ExternalAccount(username=user, uid=os.getuid(), gid=os.getgid())
    storage = LocalFileSystemStorage(
        "local", LocalFileSystemStorage.Settings(root_dir=str(tmp / "root"))
    )
    files = layout(args.total_mib << 20, args.files, args.seed)
    total = sum(size for _, size in files)
    src = Path(storage.workspace_path(account, 1))
    asyncio.run(storage.create_workspace(str(src), account))
    print(f"writing {len(files)} files, {total / 1e6:.0f} MB, into {src} ...", flush=True)
    started = time.perf_counter()
    write_tree(src, files, args.seed)
    print(f"  written in {time.perf_counter() - started:.1f} s", flush=True)

    # Deleting a copy between runs would slow the next one: ext4's inode allocator skips
    # (and re-checks) recently freed inodes, seen in `perf` as recently_deleted(). So the
    # copies are kept until the end when there is room for all of them.
    keep = shutil.disk_usage(tmp).free > total * (2 * args.rounds + 1) + MIN_FREE_BYTES
    kept: list[Path] = []
    runs: list[Run] = []
    cold = True
    for round_no in range(args.rounds):
        for method in ("cp -a", "ours"):
            cold = drop_caches() and cold
            if method == "cp -a":
                dst = tmp / f"cp-{round_no}"
                seconds = run_cp(src, dst)
            else:
                seconds, result, dst = run_ours(storage, account, src, 100 + round_no)
                if (result.files_done, result.bytes_done) != (len(files), total):
                    raise SystemExit(f"incomplete copy: {result} of {len(files)} / {total}")
            run = Run(method, seconds, total, len(files))
            runs.append(run)
            print(
                f"  round {round_no + 1} {method:6} {seconds:6.2f} s "
                f"{run.mb_per_s:8.1f} MB/s {run.files_per_s:9.0f} files/s",
                flush=True,
            )
            if keep:
                kept.append(dst)
            else:
                shutil.rmtree(dst)  # untimed
    print("caches: dropped before each run" if cold else
          "caches: NOT dropped (no permission to write /proc/sys/vm/drop_caches): all runs warm")
    print("copies: kept until the end" if keep else "copies: deleted after each run")
    for dst in kept:
        shutil.rmtree(dst)
    return runs


def summarise(runs: list[Run]) -> None:
    means = {}
    for method in ("cp -a", "ours"):
        mine = [run for run in runs if run.method == method]
        mb = sum(run.mb_per_s for run in mine) / len(mine)
        fps = sum(run.files_per_s for run in mine) / len(mine)
        means[method] = mb
        print(f"mean {method:6} {mb:8.1f} MB/s {fps:9.0f} files/s over {len(mine)} runs")
        harness.emit("copy_throughput", f"{method} copy", mb, "MB/s")
        harness.emit("copy_throughput", f"{method} copy files", fps, "files/s")
    print(
        f"ratio ours/cp (throughput): {means['ours'] / means['cp -a']:.2f}"
        f" (ours: {copy_engine.COPY_THREADS} copy threads)"
    )
    harness.emit("copy_throughput", "ours/cp MB/s", means["ours"] / means["cp -a"], "ratio")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (one fs)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--total-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--threads", type=int, default=copy_engine.COPY_THREADS, help="files copied at once"
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    free = shutil.disk_usage(args.dir).free
    if free < MIN_FREE_BYTES:
        print(
            f"refusing to run: {free / 2**30:.1f} GiB free under {args.dir}, "
            f"need {MIN_FREE_BYTES / 2**30:.0f} GiB",
            file=sys.stderr,
        )
        return 2
    copy_engine.COPY_THREADS = args.threads
    tmp = Path(tempfile.mkdtemp(prefix="uws-copy-bench-", dir=args.dir))
    try:
        summarise(measure(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
