"""``mixgen stats``: what is in an OUT folder — rows, methods, class balance as canvas and as donor,
the weight distributions, and for semantic, box or teacher weights (SnapMix, --label-weights
semantic|boxes|teacher) how far they are from the area rule on the same pixels (the gap SnapMix
exists for). Reads the manifests only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rich import box
from rich.console import Console
from rich.table import Table

from mixgen.methods import MAP_RULES, TEACHER
from mixgen.output.manifest import manifest_paths
from mixgen.output.reader import load_rows, run_metadata

QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}
COLUMNS = ["index", "method", "label_a", "label_b", "weight_a", "weight_b", "area_ratio", "label_weights"]


def distribution(values: np.ndarray) -> dict[str, float | int | None]:
    """min, mean, std, quantiles and max of a 1-D sample (None everywhere when it is empty)."""
    values = np.asarray(values, dtype=np.float64)
    keys = ["count", "min", "mean", "std", *QUANTILES, "max"]
    if values.size == 0:
        return {key: 0 if key == "count" else None for key in keys}
    stats = {"count": int(values.size), "min": values.min(), "mean": values.mean(), "std": values.std()}
    stats.update(zip(QUANTILES, np.quantile(values, list(QUANTILES.values())), strict=True))
    stats["max"] = values.max()
    return {k: v if k == "count" else round(float(v), 6) for k, v in stats.items()}


def semantic_gap(
    weight_a: np.ndarray, weight_b: np.ndarray, area: np.ndarray, same: np.ndarray, mixed: np.ndarray
) -> dict[str, Any]:
    """Semantic weights against the area rule on the same pixels (b: area, a: 1 − area) on the rows
    where the comparison means something: something was pasted and the two labels differ
    (same-label rows carry ρ_a + ρ_b on both labels by design)."""
    keep = mixed & ~same
    wa, wb, ar = weight_a[keep], weight_b[keep], area[keep]
    if not keep.any():
        return {"rows": 0}
    gap_b, gap_a = wb - ar, (1 - wa) - ar
    return {
        "rows": int(keep.sum()),
        "excluded_same_label": int((mixed & same).sum()),
        "excluded_not_mixed": int((~mixed).sum()),
        "mean_abs_gap_b": round(float(np.abs(gap_b).mean()), 6),
        "mean_abs_gap_a": round(float(np.abs(gap_a).mean()), 6),
        "mean_gap_b": round(float(gap_b.mean()), 6),
        "mean_gap_a": round(float(gap_a.mean()), 6),
        "share_abs_gap_b_over_0.1": round(float((np.abs(gap_b) > 0.1).mean()), 6),
        # How often CutMix's area weights would name the other label as the larger one.
        "dominant_label_differs": round(float(((wb > wa) != (ar > 1 - ar)).mean()), 6),
        "abs_gap_b": distribution(np.abs(gap_b)),
    }


def compute_stats(out: Path) -> dict[str, Any]:
    """Everything ``mixgen stats`` shows, as JSON-ready values."""
    out = Path(out)
    meta = run_metadata(out)
    classes: list[str] = list(meta["classes"])
    table = load_rows(out, COLUMNS)
    label_a = table.column("label_a").to_numpy()
    label_b = table.column("label_b").to_numpy()
    weight_a = table.column("weight_a").to_numpy().astype(np.float64)
    weight_b = table.column("weight_b").to_numpy().astype(np.float64)
    area = table.column("area_ratio").to_numpy().astype(np.float64)
    methods = table.column("method")
    as_canvas = np.bincount(label_a, minlength=len(classes))
    as_donor = np.bincount(label_b, minlength=len(classes))
    same = label_a == label_b
    counts = pc.value_counts(methods).to_pylist()
    stats: dict[str, Any] = {
        "out": str(out),
        "rows": table.num_rows,
        "shards": len(manifest_paths(out)),
        "methods": {item["values"]: item["counts"] for item in sorted(counts, key=lambda i: i["values"])},
        "config": meta.get("config", {}),
        "classes": [
            {"class_id": k, "class": name, "as_canvas": int(as_canvas[k]), "as_donor": int(as_donor[k])}
            for k, name in enumerate(classes)
        ],
        "same_label_rows": int(same.sum()),
        "weights": {
            "weight_a": distribution(weight_a),
            "weight_b": distribution(weight_b),
            "weight_sum": distribution(weight_a + weight_b),
            "area_ratio": distribution(area),
        },
    }
    if "label_weights" in table.column_names:
        rules = pa.array((*MAP_RULES, TEACHER))  # every rule that is not the area's
        semantic = np.asarray(pc.is_in(table.column("label_weights"), rules).to_numpy(zero_copy_only=False), bool)
    else:  # schema 1 (mixgen 0.1): the run's same-label rule says whether it weighed semantically
        semantic = np.full(table.num_rows, meta.get("same_label_weights") == "sum")
    if semantic.any():
        mixed = area > 0
        stats["semantic_vs_area"] = semantic_gap(
            weight_a[semantic], weight_b[semantic], area[semantic], same[semantic], mixed[semantic]
        )
        if "label_weights" in table.column_names:  # which rules those are (semantic, boxes, teacher)
            found = pc.unique(table.column("label_weights").filter(pa.array(semantic))).to_pylist()
            stats["semantic_vs_area"]["label_weights"] = sorted(found)
    return stats


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def print_stats(stats: dict[str, Any], console: Console) -> None:
    """Rich tables: overview, class balance, weight distributions, SnapMix vs area weights."""
    overview = Table(title=f"mixgen stats: {stats['out']}", show_header=False, box=None)
    overview.add_row("rows", f"{stats['rows']:,} in {stats['shards']} shard(s)")
    overview.add_row("methods", ", ".join(f"{m} {n:,}" for m, n in stats["methods"].items()))
    overview.add_row("same-label rows", f"{stats['same_label_rows']:,}")
    console.print(overview)

    balance = Table(title="classes", box=box.SIMPLE_HEAD)
    for column in ("id", "class", "as canvas", "as donor"):
        balance.add_column(column, justify="left" if column == "class" else "right")
    for item in stats["classes"]:
        balance.add_row(str(item["class_id"]), item["class"], f"{item['as_canvas']:,}", f"{item['as_donor']:,}")
    console.print(balance)

    weights = Table(title="weight distributions", box=box.SIMPLE_HEAD)
    keys = ["min", *QUANTILES, "max", "mean"]
    weights.add_column("", no_wrap=True)
    for key in keys:
        weights.add_column(key, justify="right", no_wrap=True)
    names = {"weight_a": "weight_a", "weight_b": "weight_b", "weight_sum": "a + b", "area_ratio": "area"}
    for key, dist in stats["weights"].items():
        weights.add_row(names[key], *(_fmt(dist[k]) for k in keys))
    console.print(weights)

    gap = stats.get("semantic_vs_area")
    if gap and gap.get("rows"):
        rules = " and ".join(gap.get("label_weights") or ["semantic"])
        table = Table(title=f"{rules} weights vs the area rule on the same pixels", show_header=False, box=None)
        table.add_row("rows compared", f"{gap['rows']:,} (cross-label rows with a paste)")
        table.add_row("mean |weight_b − area|", _fmt(gap["mean_abs_gap_b"]))
        table.add_row("mean |(1 − weight_a) − area|", _fmt(gap["mean_abs_gap_a"]))
        table.add_row("mean weight_b − area", _fmt(gap["mean_gap_b"]))
        table.add_row("rows with |weight_b − area| > 0.1", f"{gap['share_abs_gap_b_over_0.1']:.1%}")
        table.add_row("rows where the larger label differs", f"{gap['dominant_label_differs']:.1%}")
        console.print(table)
