"""Score an on-device history with an edge bundle (`hyperrec export onnx`), no server.

Usage: python examples/edge_score.py EDGE_DIR ITEM_ID [ITEM_ID ...]

Needs only onnxruntime and numpy (and the standard library); it imports nothing from
hyperrec, so it runs wherever an edge bundle is copied. Prints the top 10 items by the edge
score, the history's own items excluded, ties to the lower item index: the same ranking the
served hybrid gives an anonymous user with this history (see the bundle's manifest.json,
"score"). Item ids the bundle does not know are reported on stderr and left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

FORMAT_VERSION = 1
TOP = 10


def load(edge_dir: Path) -> tuple[dict, list[str], list[str], ort.InferenceSession]:
    """The manifest, item ids, titles and an onnxruntime session of the edge bundle."""
    manifest = json.loads((edge_dir / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SystemExit(
            f"error: {edge_dir}: edge format {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    items = json.loads((edge_dir / manifest["items"]["file"]).read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(edge_dir / manifest["model"]["file"]), options, providers=["CPUExecutionProvider"]
    )
    return manifest, items["item_ids"], items["titles"], session


def recommend(session: ort.InferenceSession, history: np.ndarray, k: int = TOP) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best item indices (history excluded, ties to the lower index) and their scores."""
    scores = session.run(["scores"], {"history": history})[0]
    allowed = np.ones(len(scores), dtype=bool)
    allowed[history] = False
    candidates = np.flatnonzero(allowed)
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    return candidates[order], scores[candidates[order]]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    edge_dir = Path(argv[0])
    if not (edge_dir / "manifest.json").is_file():
        print(f"error: {edge_dir} is not an edge bundle (no manifest.json)", file=sys.stderr)
        return 1
    manifest, item_ids, titles, session = load(edge_dir)
    index = {item: i for i, item in enumerate(item_ids)}
    unknown = [item for item in argv[1:] if item not in index]
    if unknown:
        print(f"warning: {len(unknown)} item id(s) not in the bundle, left out: {unknown[:10]}", file=sys.stderr)
    history = np.unique(np.array([index[item] for item in argv[1:] if item in index], dtype=np.int64))
    top, scores = recommend(session, history)
    source = manifest["source_bundle"]["version"]
    print(f"top {len(top)} for a history of {len(history)} item(s) (edge bundle of model version {source}):")
    for rank, (i, score) in enumerate(zip(top.tolist(), scores.tolist()), start=1):
        print(f"{rank:>2}  {item_ids[i]}\t{score:.6f}\t{titles[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
