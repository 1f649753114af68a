"""task=search end to end on a 1M-image bundle: load once, then per query; RAM of the serving process (prints figures).

A real 1M-image build is over an hour of both cores here, and a search's cost depends on the index's shape, not
its content. So, as ``mapped_refine_proxy.py``, the bundle holds an ``IVF16384,PQ64x8`` of the real shape with
random codes (``image_search_overhead.proxy_index``), optionally a real ``index.refine.npy`` of random SQ8 rows
(30 bytes x 384 per image, memory-mapped), and a real gallery table: ids, paths, one box per patch (the L0-L3
cells of a 640x480 image), each patch's image and id ``image * 30 + slot`` as a sharded build numbers them. It is
written by the project's ``write_bundle`` into the folder ``task=search`` reads for the same settings, then
``task=search`` runs in a fresh process (the packaged DINOv2 at ``extract.precision=auto``) on a folder of real
query images, exactly as a user runs it (``main.py`` overrides below); the child times its parts and reads its
memory from ``/proc/self/status``.

Reported: the bundle's load (read + every part's sha256 checked), per query the whole ``task=search`` time
(describe + search, as search.json says), the image search alone (p50 / p95), and per image of the gallery
the memory the bundle adds to the process: anonymous (the process's own: the index's lists and codes, loaded) and
mapped file pages (page cache the searches touched: the gallery rows of the results, the shortlist's refine
codes; shared and evictable, and counted whole per large folio: on this kernel one touched 384-byte row maps
~0.9 MB), each after the load and after the last query, and the peak RSS (both kinds). Result paths do not exist (the gallery is synthetic): search.json flags them ``missing``
and the pictures show placeholders; that costs a stat per result.

    python benchmarks/search_bundle_scale.py --images 1000000 --queries 40 --refine SQ8 --workdir /tmp
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "src"))

from image_search_overhead import D, PATCHES, nlist_for, proxy_index, unit  # noqa: E402
from mapped_refine_proxy import write_codes  # noqa: E402

from patchify.bundle import write_bundle  # noqa: E402
from patchify.index import MappedRefine, refine_codes_path  # noqa: E402
from patchify.pyramid import level_boxes  # noqa: E402

LEVELS = [0, 1, 2, 3]

CHILD = r"""
import json, sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[5])
from index_scale import status_bytes

def memory():
    return {name: status_bytes(name) for name in ("RssAnon", "RssFile", "VmHWM")}

import faiss
from hydra import compose, initialize_config_dir
import patchify.tasks.search as task
from patchify.pipeline import run

out = {"baseline": None, "load_s": None, "search_ms": []}
read_bundle, search_images = task.read_bundle, task.search_images

def timed_read(*args, **kwargs):
    out["baseline"] = memory()  # the model is loaded by now: what follows is the bundle's
    started = time.perf_counter()
    bundle = read_bundle(*args, **kwargs)
    out["load_s"] = time.perf_counter() - started
    out["loaded"] = memory()
    return bundle

def timed_search(*args, **kwargs):
    started = time.perf_counter()
    hits = search_images(*args, **kwargs)
    out["search_ms"].append(1000 * (time.perf_counter() - started))
    out["searched"] = memory()  # after the latest query, the bundle still mapped
    return hits

task.read_bundle, task.search_images = timed_read, timed_search
with initialize_config_dir(config_dir=sys.argv[2], version_base=None):
    cfg = compose(config_name="config", overrides=json.loads(sys.argv[3]))
faiss.omp_set_num_threads(1)  # one search thread, as the latency targets say; the encoder keeps its threads
started = time.perf_counter()
run(cfg, Path(sys.argv[4]))
out["run_s"] = time.perf_counter() - started
print("RESULT " + json.dumps(out))
"""


def gallery_table(images: int, lo: int = 0) -> dict[str, np.ndarray]:
    cells = np.concatenate([level_boxes(640, 480, level) for level in LEVELS]).astype(np.float32)
    return {"ids": np.char.add(np.char.add("img_", np.char.zfill(np.arange(images).astype(str), 7)), ".jpg"),
            "patch_image": np.repeat(np.arange(images, dtype=np.int64), PATCHES),
            "boxes": np.tile(cells, (images, 1)), "levels": np.asarray(LEVELS),
            "patch_ids": np.arange(images * PATCHES, dtype=np.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=40, help="query images (mini-ILIAS photo queries)")
    parser.add_argument("--query-folder", default=str(ROOT / "ilias" / "mini_photo_60x4_120" / "ilias_core"))
    parser.add_argument("--refine", default="none", choices=("none", "SQ8"))
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--k-factor", type=float, default=4)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--keep", action="store_true", help="keep the bundle (and its folder) for another run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if PATCHES != len(np.concatenate([level_boxes(8, 8, level) for level in LEVELS])):
        raise SystemExit("the proxy's patches per image are not L0-L3's")

    work = Path(args.workdir) / f"search_bundle_{args.images}_{args.refine}"
    work.mkdir(parents=True, exist_ok=True)
    queries = work / "queries"
    shutil.rmtree(queries, ignore_errors=True)
    queries.mkdir()
    found = sorted(Path(args.query_folder).rglob("query/*.jpg"))[:args.queries]
    for i, path in enumerate(found):
        shutil.copy(path, queries / f"q{i:03d}_{path.name}")
    (work / "gallery").mkdir(exist_ok=True)
    overrides = ["task=search", "dataset=folder", f"dataset.root={work / 'gallery'}", f"paths.indices={work / 'indices'}",
                 f"paths.features={work / 'features'}", "index=ivfpq", f"index.nlist={nlist_for(args.images * PATCHES)}",
                 "index.m=64", "index.nbits=8", "index.shards=2", f"index.nprobe={args.nprobe}",
                 f"query.path={queries}", f"query.top_k={args.top_k}", "pyramid.level=3",
                 *([f"index.refine={args.refine}", f"index.k_factor={args.k_factor:g}"] if args.refine != "none" else [])]

    from hydra import compose, initialize_config_dir

    from patchify.features import make_feature_source
    from patchify.indexing import bundle_folder

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    source = make_feature_source(cfg)
    if source.model.dim != D:
        raise SystemExit(f"the model's width {source.model.dim} is not the proxy's {D}")
    folder = bundle_folder(cfg, source.model.fingerprint, LEVELS)
    del source
    if not (folder / "current.json").exists():
        started = time.perf_counter()
        index, _ = proxy_index(args.images, args.nprobe, args.seed, clustered=False)
        if args.refine == "SQ8":
            codes = work / "codes.refine.npy"
            write_codes(codes, index.ntotal, args.seed)
            sq = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            sq.train(unit(np.random.default_rng([args.seed, 6]).standard_normal((65536, D)).astype(np.float32)))
            index = MappedRefine(index, sq, np.load(codes, mmap_mode="r"), args.k_factor, codes_path=codes)
        gallery = gallery_table(args.images)
        gallery["paths"] = np.char.add(f"{work / 'gallery'}/", gallery["ids"])
        build = write_bundle(folder, index, gallery)
        del index, gallery
        if args.refine == "SQ8":
            (work / "codes.refine.npy").unlink()  # the build holds a hard link
        print(f"wrote {build} in {time.perf_counter() - started:.0f} s", flush=True)
    build = folder / json.loads((folder / "current.json").read_text())["build"]
    sizes = {p.relative_to(build).as_posix(): p.stat().st_size for p in build.rglob("*") if p.is_file()}
    print(f"bundle: {args.images:,} images, {args.images * PATCHES:,} patches; per image on disk: " +
          ", ".join(f"{name} {size / args.images:,.0f} B" for name, size in sorted(sizes.items())), flush=True)
    if args.refine == "SQ8" and not refine_codes_path(build / "index.faiss").exists():
        raise SystemExit("the bundle lacks its refine codes")

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "src"), str(ROOT / "configs"),
                            json.dumps(overrides), str(run_dir), str(ROOT / "benchmarks")], capture_output=True, text=True)
    wall = time.perf_counter() - started
    line = [x for x in child.stdout.splitlines() if x.startswith("RESULT ")]
    if child.returncode or not line:
        raise SystemExit(f"task=search failed (rc {child.returncode}):\n{child.stderr[-3000:]}")
    out = json.loads(line[0][len("RESULT "):])
    entries = json.loads((run_dir / "search.json").read_text())["queries"]
    per_query = [1000 * e["seconds"] for e in entries]
    search = out["search_ms"]
    p = lambda t, q: float(np.percentile(t, q))  # noqa: E731
    b, loaded, after = out["baseline"], out["loaded"], out["searched"]
    per_image = lambda now, name: (now[name] - b[name]) / args.images  # noqa: E731
    print(f"task=search, {len(entries)} queries, top_k {args.top_k}, nprobe {args.nprobe}, refine {args.refine}"
          f"{f' k_factor {args.k_factor:g}' if args.refine != 'none' else ''}, 1 search thread: process {wall:.1f} s")
    print(f"process before the bundle (model loaded): anon {b['RssAnon'] / 1e9:.2f} GB, peak {b['VmHWM'] / 1e9:.2f} GB; "
          f"peak after the load {loaded['VmHWM'] / 1e9:.2f} GB")
    print("| bundle load s | per query ms, p50 / p95 (describe + search) | image search ms, p50 / p95 | "
          "RAM B/image after load: anon / mapped file | after the queries: anon / mapped file | peak RSS GB |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {out['load_s']:.1f} | {p(per_query, 50):.0f} / {p(per_query, 95):.0f} | {p(search, 50):.2f} / "
          f"{p(search, 95):.2f} | {per_image(loaded, 'RssAnon'):,.0f} / {per_image(loaded, 'RssFile'):,.0f} | "
          f"{per_image(after, 'RssAnon'):,.0f} / {per_image(after, 'RssFile'):,.0f} | {after['VmHWM'] / 1e9:.2f} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
