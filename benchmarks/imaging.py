"""Study preparation: a 300-slice CT from stored files to encoded images, against the source
document's per-slice path, in one run.

    python -m benchmarks.imaging [--slices 300] [--rounds 5]

The source document's path, per slice: read, rescale, window, normalise, JPEG, reopen,
convert('RGB'), JPEG with optimize=True, base64, one image per slice. Ours: series and slice
choice from the database, decode only the chosen slices, window, mosaic, one JPEG. Both run
pinned to one core. Prints the study time, the ratio, images, pixels, image tokens by each
provider's formula, and peak RSS.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from analysis.prepare import prepare_study
from analysis.vision.tokens import IMAGE_TOKEN_FORMULAS
from conf import ImagingSettings
from storage.db import make_engine, make_session_factory
from storage.files import InstanceStore
from tests.data.generate import write_series
from tests.data.ingest import ingest


def source_document_path(files: list[Path]) -> list[tuple[str, int, int]]:
    """The seed document's approach, one API image per slice."""
    encoded = []
    for path in files:
        ds = dcmread(path)
        values = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        low, high = 40 - 200, 40 + 200
        normalised = ((np.clip(values, low, high) - low) / (high - low) * 255).astype(np.uint8)
        first = io.BytesIO()
        Image.fromarray(normalised).save(first, format="JPEG")
        image = Image.open(io.BytesIO(first.getvalue())).convert("RGB")
        second = io.BytesIO()
        image.save(second, format="JPEG", quality=85, optimize=True)
        encoded.append((base64.b64encode(second.getvalue()).decode("ascii"), image.width, image.height))
    return encoded


def tokens(sizes: list[tuple[int, int]]) -> dict[str, int]:
    return {name: sum(formula(w, h) for w, h in sizes) for name, formula in IMAGE_TOKEN_FORMULAS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    with tempfile.TemporaryDirectory(prefix="ainode-imaging-") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.slices)
        store = InstanceStore(work / "var")
        store.prepare()
        database_url = f"sqlite:///{work}/ainode.db"
        study = ingest(files, store, database_url)
        settings = ImagingSettings()
        engine = make_engine(database_url)
        sessions = make_session_factory(engine)

        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            with sessions() as session:
                prepared = prepare_study(session, study, store.root, settings)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            baseline = source_document_path(
                [
                    store.root / p
                    for p in sorted(
                        str(f.relative_to(store.root)) for f in store.instances_dir.rglob("*.dcm")
                    )
                ]
            )
            theirs.append(time.perf_counter() - started)
        engine.dispose()

        our_sizes = [(image.width, image.height) for image in prepared.encoded]
        their_sizes = [(w, h) for _, w, h in baseline]
        ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
        print(f"study: {args.slices} CT slices 512x512x16 bit; one core; median of {args.rounds} rounds")
        print(
            f"  source-document path: {theirs_s:7.3f} s  {len(baseline):4d} images "
            f"{sum(w * h for w, h in their_sizes):>12,d} px  "
            f"{sum(len(b) * 3 // 4 for b, _, _ in baseline):>10,d} bytes"
        )
        print(
            f"  ainode prepare_study: {ours_s:7.3f} s  {len(prepared.encoded):4d} images "
            f"{sum(w * h for w, h in our_sizes):>12,d} px  "
            f"{sum(len(e.data) for e in prepared.encoded):>10,d} bytes"
        )
        print(f"  speed-up: {theirs_s / ours_s:.1f}x")
        their_tokens, our_tokens = tokens(their_sizes), tokens(our_sizes)
        for provider in their_tokens:
            print(
                f"  image tokens ({provider}): {their_tokens[provider]:>9,d} -> {our_tokens[provider]:>7,d} "
                f"({their_tokens[provider] / our_tokens[provider]:.0f}x fewer)"
            )
        print(
            f"  peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
