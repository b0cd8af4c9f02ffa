"""The conversion manifest (manifest.json) and the peak-memory watch that feeds it."""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from convert.recipes import Recipe
from convert.source import Source

PACKAGES = ("openvino", "openvino-genai", "openvino-tokenizers", "optimum-intel", "optimum", "nncf",
            "transformers", "torch")


def memory_now() -> tuple[int, int, int]:
    """(resident bytes, anonymous resident bytes, peak resident bytes so far) of this process; anonymous is
    what must fit in RAM, and the peak is the kernel's own high-water mark, which no sampling can miss.

    Linux: VmRSS, RssAnon and VmHWM. Elsewhere psutil: on Windows the working set, private bytes (memory no
    file backs, the nearest to anonymous) and the peak working set; on macOS RSS for all three.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text(encoding="utf-8").splitlines() if ":" in line)
        kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
        return kib("VmRSS"), kib("RssAnon"), kib("VmHWM")
    import psutil

    info = psutil.Process().memory_info()
    return info.rss, getattr(info, "private", info.rss), getattr(info, "peak_wset", info.rss)


class MemoryWatch:
    """This process's peak memory: resident from the kernel's high-water mark; anonymous sampled every 10 ms
    in a thread (no kernel keeps that peak; Windows keeps the peak of private bytes, read at the end)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.rss, self.anon = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            rss, anon, peak = memory_now()
            self.rss, self.anon = max(self.rss, rss, peak), max(self.anon, anon)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "MemoryWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        if sys.platform == "win32":
            import psutil

            self.anon = max(self.anon, getattr(psutil.Process().memory_info(), "peak_pagefile", 0))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_storage(model_xml: Path) -> dict[str, Any]:
    """Elements of the IR's weight constants per storage type (u4, i8, f16...) and their shares."""
    import openvino as ov

    model = ov.Core().read_model(model_xml)
    counts: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() == "Constant" and op.get_output_partial_shape(0).rank.get_length() >= 2:
            shape = op.get_output_shape(0)
            size = 1
            for dim in shape:
                size *= dim
            if size >= 1024:  # weights, not scales of tiny layers or shape constants
                counts[op.get_output_element_type(0).get_type_name()] += size
    total = sum(counts.values()) or 1
    return {"elements": dict(counts), "share": {k: v / total for k, v in counts.most_common()},
            "total_bytes": (model_xml.with_suffix(".bin")).stat().st_size}


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def write_manifest(folder: Path, source: Source, recipe: Recipe, checks: dict[str, Any],
                   duration: float, memory: MemoryWatch) -> dict[str, Any]:
    """Write ``folder/manifest.json`` describing how the folder was made, and return it."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = {
        "source": {"model": source.path, "family": source.family, "model_type": source.model_type,
                   "revision": source.revision, "local": source.local},
        "settings": recipe.as_dict(),
        "versions": versions(),
        "weights": weight_storage(folder / "openvino_model.xml"),
        "files": files,
        "checks": checks,
        "duration_s": round(duration, 1),
        "peak_memory": {"rss_bytes": memory.rss, "anon_bytes": memory.anon},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
