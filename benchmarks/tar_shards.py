"""What ILIAS at full scale costs beside extraction: listing WebDataset shards and writing similarity files
(prints figures, not a test; docs/FORMATS.md quotes them).

    python benchmarks/tar_shards.py [--samples 10000] [--queries 1232] [--k 1000]

1. Writes a shard of ``--samples`` samples (a 640x480 JPEG and a small json each, as ILIAS's YFCC shards)
   into a temporary folder, then times listing it (src/patchify/tar_images.py ``samples``: headers only),
   reading 2,000 images' sizes from their headers (``data.image_size``, as a dataset scan does) and 500
   images' bytes. The shard is in the page cache (just written): a cold disk adds its seeks.
2. Times writing ``--queries`` x ``--k`` random similarities with shard-style ids as similarity.json
   (``json.dumps``) and similarity.pkl (``report.similarity_arrays`` + ``pickle.dumps``), and sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from patchify.data import image_size  # noqa: E402
from patchify.report import similarity_arrays  # noqa: E402
from patchify.tar_images import read_image_bytes, samples  # noqa: E402


def shard_listing(count: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)).save(buffer, "JPEG", quality=85)
    photo = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        shard = Path(folder) / "00000.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(count):
                for extension, data in (("jpg", photo), ("json", b'{"id": %d}' % i)):
                    info = tarfile.TarInfo(f"{i:09d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        started = time.perf_counter()
        found, _ = samples(shard, ["jpg"])
        listing = time.perf_counter() - started
        started = time.perf_counter()
        for sample in found[:2000]:
            image_size(shard / sample.member)
        header = (time.perf_counter() - started) / min(2000, len(found))
        started = time.perf_counter()
        for sample in found[:500]:
            read_image_bytes(shard / sample.member)
        read = (time.perf_counter() - started) / min(500, len(found))
        print(f"shard of {count:,} samples ({shard.stat().st_size / 1e9:.2f} GB): listed in {listing:.2f} s "
              f"({listing / count * 1e6:.0f} us/sample); image_size {header * 1e6:.0f} us/image; "
              f"read_image_bytes {read * 1e6:.0f} us/image ({len(photo) / 1e3:.0f} kB)")


def similarity_writing(queries: int, k: int) -> None:
    rng = np.random.default_rng(0)
    ids = [f"{shard:05d}.tar/{key:09d}" for shard in range(100) for key in range(2000)]
    similarity = {}
    for q in range(queries):
        picked = rng.choice(len(ids), k, replace=False)
        scores = np.sort(rng.random(k)).astype(np.float32)[::-1]
        similarity[f"instance_{q:04d}/query/Q{q:04d}_00.jpg"] = dict(zip([ids[i] for i in picked], scores.astype(float).tolist()))
    started = time.perf_counter()
    text = json.dumps(similarity)
    as_json = time.perf_counter() - started
    started = time.perf_counter()
    data = pickle.dumps(similarity_arrays(similarity), protocol=4)
    as_pickle = time.perf_counter() - started
    print(f"{queries:,} queries x k={k}: similarity.json {as_json:.2f} s, {len(text) / 1e6:.0f} MB; "
          f"similarity.pkl {as_pickle:.2f} s, {len(data) / 1e6:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=1232)
    parser.add_argument("--k", type=int, default=1000)
    args = parser.parse_args()
    shard_listing(args.samples)
    similarity_writing(args.queries, args.k)


if __name__ == "__main__":
    main()
