"""Rendering for the ``npquant`` command line: rich tables and matplotlib plots (nothing else prints).

The CLI (:mod:`npquant.cli`) parses arguments and calls the library; these
functions turn the library's rows into what a person reads.
"""

from __future__ import annotations

import math

__all__ = [
    "fmt",
    "print_table",
    "print_layer_table",
    "plot_sqnr",
    "print_gptq_table",
    "print_eval",
    "plot_eval",
    "print_plan",
]


def fmt(key: str, v) -> str:
    if key == "scheme":
        return v
    if key == "bytes":
        return f"{v:,}"
    if key == "bits_per_weight":
        return f"{v:.3g}" if v < 10 else f"{v:.0f}"
    if key == "saving":
        return f"{v:.2f}x"
    if key == "sqnr_db":
        return "inf" if math.isinf(v) else f"{v:.1f}"
    return "0" if v == 0 else f"{v:.2e}"


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    headers = {
        "scheme": "scheme",
        "bits_per_weight": "bits/w",
        "bytes": "bytes",
        "saving": "saving",
        "rel_error": "rel error",
        "sqnr_db": "SQNR dB",
        "max_abs_error": "max abs err",
        "output_rel_error": "output err",
    }
    table = Table(title=title, title_justify="left")
    for key, head in headers.items():
        table.add_column(head, justify="left" if key == "scheme" else "right")
    for r in rows:
        table.add_row(*(fmt(k, r[k]) for k in headers))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # pipes and files get the whole table, unwrapped
    console.print(table)


def print_inspect(title: str, rows: list[dict]) -> None:
    """One line per quantized module of a loaded checkpoint."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for head in ("module", "codes", "blocks", "scales", "act-order", "shape", "bits/w", "bytes"):
        table.add_column(head, justify="left" if head in ("module", "codes", "blocks", "scales") else "right")
    for r in rows:
        table.add_row(r["module"], r["codes"], r["blocks"], r["scales"], "yes" if r["act_order"] else "",
                      " x ".join(map(str, r["shape"])), f"{r['bits_per_weight']:.3f}", f"{r['bytes']:,}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def plot_sqnr(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers) + 2), 4.5))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        by = {r["name"]: r["sqnr_db"] for r in rows if r["scheme"] == scheme}
        ax.plot(range(len(layers)), [by.get(n, float("nan")) for n in layers], marker="o", ms=3, label=scheme)
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in layers], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB), higher is better")
    ax.set_title("Per-layer weight SQNR")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    import os

    os.replace(tmp, path)


def print_layer_table(model: str, rows, sums, skipped, worst: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    worst_keys = set()
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        ranked = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["sqnr_db"])
        worst_keys |= {(r["name"], scheme) for r in ranked[:worst]}
    table = Table(title=f"{model}: per layer (worst {worst} per scheme in bold red)", title_justify="left")
    for head in ("layer", "shape", "scheme", "bits/w", "bytes before", "bytes after", "rel error", "SQNR dB", "outlier"):
        table.add_column(head, justify="left" if head in ("layer", "scheme") else "right")
    for r in rows:
        style = "bold red" if (r["name"], r["scheme"]) in worst_keys else None
        table.add_row(
            r["name"].removesuffix(".weight"), "x".join(map(str, r["shape"])), r["scheme"],
            f"{r['bits_per_weight']:.3g}", f"{r['bytes_before']:,}", f"{r['bytes_after']:,}",
            fmt("rel_error", r["rel_error"]), fmt("sqnr_db", r["sqnr_db"]), f"{r['outlier_ratio']:.1f}",
            style=style,
        )
    console.print(table)
    tot = Table(title="totals per scheme (linear layers only)", title_justify="left")
    for head in ("scheme", "layers", "bytes before", "bytes after", "saving", "rms rel error", "worst SQNR dB", "worst layer"):
        tot.add_column(head, justify="left" if head in ("scheme", "worst layer") else "right")
    for t in sums:
        tot.add_row(t["scheme"], str(t["layers"]), f"{t['bytes_before']:,}", f"{t['bytes_after']:,}",
                    f"{t['saving']:.2f}x", fmt("rel_error", t["rms_rel_error"]), fmt("sqnr_db", t["worst_sqnr_db"]),
                    t["worst_layer"].removesuffix(".weight"))
    console.print(tot)
    if skipped:
        reasons = {}
        for name, why in skipped:
            reasons.setdefault(why, []).append(name)
        console.print("left alone:")
        for why, names in reasons.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            console.print(f"  {why}: {shown}", highlight=False)


def print_gptq_table(console, rows, args) -> None:
    from rich.table import Table

    table = Table(title=f"GPTQ per layer ({args.scheme}, observer {args.observer}): output error on the calibration "
                        f"tokens, tr(dW H dW^T) / tr(W H W^T)", title_justify="left")
    for head in ("layer", "shape", "tokens", "RTN loss", "GPTQ loss", "GPTQ / RTN", "seconds"):
        table.add_column(head, justify="left" if head == "layer" else "right")
    for r in rows:
        table.add_row(r["name"].removesuffix(".weight"), "x".join(map(str, r["shape"])), f"{r['tokens']:,}",
                      f"{r['rtn_loss']:.3e}", f"{r['gptq_loss']:.3e}", f"{r['ratio']:.3f}", f"{r['seconds']:.2f}")
    console.print(table)
    total = sum(r["seconds"] for r in rows)
    console.print(f"GPTQ: {len(rows)} layers, mean loss ratio {sum(r['ratio'] for r in rows) / len(rows):.3f}, "
                  f"{total:.1f} s in the solver", highlight=False)


def print_plan(plan: dict, out) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    table = Table(title=f"size plan for {plan['model']} ({plan['method']})", title_justify="left")
    for head in ("layer", "shape", "scheme", "bytes", "predicted cost"):
        table.add_column(head, justify="left" if head in ("layer", "scheme") else "right")
    for name, e in plan["layers"].items():
        table.add_row(name.removesuffix(".weight"), "x".join(map(str, e["shape"])), e["scheme"], f"{e['bytes']:,}",
                      f"{e['cost']:.3e}")
    console.print(table)
    counts = {}
    for e in plan["layers"].values():
        counts[e["scheme"]] = counts.get(e["scheme"], 0) + 1
    console.print(f"budget {plan['budget']['bytes']:,} bytes; plan {plan['total_bytes']:,} bytes = "
                  f"{plan['bits_per_weight']:.3f} bits per weight; predicted cost {plan['predicted_cost']:.4e}; "
                  + ", ".join(f"{k}: {v} layers" for k, v in counts.items()), highlight=False)
    for label, u in plan["uniform"].items():
        weights = 8.0 * plan["total_bytes"] / plan["bits_per_weight"] if plan["bits_per_weight"] else 0
        bits = 8.0 * u["bytes"] / weights if weights else 0.0
        console.print(f"  uniform {label:<12} {bits:6.3f} bits per weight, predicted cost {u['predicted_cost']:.4e}",
                      highlight=False)
    console.print(f"cost: {plan['cost']}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


def print_eval(rows, n_sentences) -> None:
    from rich.console import Console
    from rich.table import Table

    from .fidelity import SENTENCES

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    n = n_sentences or len(SENTENCES)
    table = Table(title=f"sentence embeddings, {n} sentences: quantized vs float32", title_justify="left")
    for head in ("scheme", "bits/w", "model bytes", "mean cosine", "min cosine", "top-1 agreement"):
        table.add_column(head, justify="left" if head == "scheme" else "right")
    for r in rows:
        table.add_row(r["scheme"], f"{r['bits_per_weight']:.3g}", f"{r['model_bytes']:,}", f"{r['mean_cosine']:.6f}",
                      f"{r['min_cosine']:.6f}", f"{100 * r['top1_agreement']:.1f}%")
    console.print(table)
    console.print("worst sentences (lowest cosine):")
    for r in rows[1:]:
        w = r["worst"][0]
        text = w["sentence"] if len(w["sentence"]) <= 70 else w["sentence"][:67] + "..."
        console.print(f"  {r['scheme']:<12} {w['cosine']:.4f}  {text}", highlight=False)


def plot_eval(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = rows[1:]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(q) + 2), 4))
    xs = range(len(q))
    ax.bar([x - 0.2 for x in xs], [1 - r["mean_cosine"] for r in q], width=0.4, label="1 - mean cosine")
    ax.bar([x + 0.2 for x in xs], [1 - r["min_cosine"] for r in q], width=0.4, label="1 - min cosine")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['scheme']}\n{r['bits_per_weight']:.2f} b/w" for r in q])
    ax.set_ylabel("embedding error (lower is better)")
    ax.set_title("Quantized vs float32 sentence embeddings")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    import os

    os.replace(tmp, path)
