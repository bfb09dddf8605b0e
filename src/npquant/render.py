"""Rendering for the ``npquant`` command line: tables and matplotlib plots (nothing else prints).

The CLI (:mod:`npquant.cli`) parses arguments and calls the library; these
functions turn the library's rows into what a person reads.

Every table is printed whole: a number is never cut, and neither is a
layer name. Where the table fits the console it is a rich table; where it
does not (80 columns, say), it is printed as plain columns with headers
wrapped at their spaces, and if that is still too wide, its long text
column (the layer name) moves to a line of its own: above the rows of
that layer when it is the first column, under its row otherwise. Pipes and
files get 160 columns unless ``COLUMNS`` says otherwise.
"""

from __future__ import annotations

import math
import os

__all__ = [
    "fmt",
    "console",
    "print_rows",
    "print_table",
    "print_inspect",
    "print_layer_table",
    "plot_sqnr",
    "print_gptq_table",
    "print_quantized",
    "print_eval",
    "plot_eval",
    "print_plan",
]

#: Columns between two columns of a plain table.
_GAP = 2
#: Indent of the rows under a layer name printed on a line of its own.
_INDENT = 2


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


def console():
    """A rich Console on stdout: the terminal's width, or for pipes and files 160 columns (``COLUMNS`` wins)."""
    from rich.console import Console

    out = Console()
    if out.is_terminal or os.environ.get("COLUMNS", "").isdigit():
        return out
    return Console(width=160)  # pipes and files get the whole table, unwrapped


def print_rows(out, title: str, columns, rows, styles=None, long: int | None = None) -> None:
    """Print a table whole on console ``out``: a rich table where it fits, else plain columns.

    Parameters
    ----------
    out : rich Console
    title : str
    columns : list of ``(header, justify)``, justify ``"left"`` or ``"right"``
    rows : list of lists of str, one str per column
    styles : list of rich styles (or None), one per row; default none
    long : index of the column that goes on a line of its own when the
        plain columns are still wider than the console (a layer name);
        None: no column moves and a too-wide table runs past the width,
        uncut
    """
    from rich.cells import cell_len
    from rich.table import Table

    styles = styles or [None] * len(rows)
    natural = [max([cell_len(head)] + [cell_len(r[c]) for r in rows]) for c, (head, _) in enumerate(columns)]
    if sum(natural) + 3 * len(columns) + 1 <= out.width:  # cells, a space each side, a rule between and around
        table = Table(title=title, title_justify="left")
        for head, justify in columns:
            table.add_column(head, justify=justify)
        for row, style in zip(rows, styles):
            table.add_row(*row, style=style)
        out.print(table)
        return
    keep = list(range(len(columns)))
    widths = {c: max([max(map(cell_len, columns[c][0].split()))] + [cell_len(r[c]) for r in rows]) for c in keep}
    if long is not None and sum(widths.values()) + _GAP * (len(keep) - 1) > out.width:
        keep.remove(long)
    indent = _INDENT if long == 0 and long not in keep else 0  # a moved first column heads its rows

    def line(cells) -> str:
        return " " * indent + _line(cells, [widths[c] for c in keep], [columns[c][1] for c in keep])

    heads = {c: _wrap_words(columns[c][0], widths[c]) for c in keep}
    depth = max(len(h) for h in heads.values())
    header = [line([heads[c][k - depth + len(heads[c])] if k >= depth - len(heads[c]) else "" for c in keep])
              for k in range(depth)]  # bottom-aligned, as rich aligns them
    if indent:  # the moved column's header where the first header line has room for it, else a line of its own
        name = columns[long][0]
        room = len(header[0]) - len(header[0].lstrip())
        header = [name + header[0][len(name):]] + header[1:] if room > len(name) else [name] + header
    plain = {"highlight": False, "markup": False, "soft_wrap": True}  # names are text, never markup; nothing is cut
    out.print(title, style="italic", highlight=False, markup=False)  # wrapped at its spaces
    for text in header:
        out.print(text, style="bold", **plain)
    out.print(" " * indent + "─" * (sum(widths[c] for c in keep) + _GAP * (len(keep) - 1)), style="dim", **plain)
    previous = None
    for row, style in zip(rows, styles):
        if indent and row[long] != previous:
            out.print(row[long], style="bold", **plain)
            previous = row[long]
        out.print(line([row[c] for c in keep]), style=style, **plain)
        if long is not None and long not in keep and not indent:
            out.print(" " * (2 * _INDENT) + f"{columns[long][0]}: {row[long]}", style=style, **plain)


def _wrap_words(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` cells, broken at spaces only (a longer word stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _line(cells, widths, justify) -> str:
    """One line of plain columns: each cell padded to its width, ``_GAP`` spaces between."""
    from rich.cells import cell_len

    padded = []
    for cell, width, how in zip(cells, widths, justify):
        pad = " " * (width - cell_len(cell))
        padded.append(cell + pad if how == "left" else pad + cell)
    return (" " * _GAP).join(padded).rstrip()


def print_table(title: str, rows: list[dict]) -> None:
    """The demo's rows: one per scheme."""
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
    columns = [(head, "left" if key == "scheme" else "right") for key, head in headers.items()]
    print_rows(console(), title, columns, [[fmt(k, r[k]) for k in headers] for r in rows], long=0)


def print_inspect(title: str, rows: list[dict]) -> None:
    """One line per quantized module of a loaded checkpoint."""
    heads = ("module", "codes", "blocks", "scales", "activations", "act-order", "shape", "bits/w", "bytes")
    columns = [(h, "left" if h in ("module", "codes", "blocks", "scales", "activations") else "right") for h in heads]
    cells = [[r["module"], r["codes"], r["blocks"], r["scales"], r["activations"], "yes" if r["act_order"] else "",
              " x ".join(map(str, r["shape"])), f"{r['bits_per_weight']:.3f}", f"{r['bytes']:,}"] for r in rows]
    print_rows(console(), title, columns, cells, long=0)


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
    os.replace(tmp, path)


def print_layer_table(model: str, rows, sums, skipped, worst: int) -> None:
    """``report``: one row per layer and scheme, the worst ``worst`` per scheme in bold red, then totals."""
    out = console()
    worst_keys = set()
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        ranked = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["sqnr_db"])
        worst_keys |= {(r["name"], scheme) for r in ranked[:worst]}
    heads = ("layer", "shape", "scheme", "bits/w", "bytes before", "bytes after", "rel error", "SQNR dB", "outlier")
    columns = [(h, "left" if h in ("layer", "scheme") else "right") for h in heads]
    cells = [[r["name"].removesuffix(".weight"), "x".join(map(str, r["shape"])), r["scheme"],
              f"{r['bits_per_weight']:.3g}", f"{r['bytes_before']:,}", f"{r['bytes_after']:,}",
              fmt("rel_error", r["rel_error"]), fmt("sqnr_db", r["sqnr_db"]), f"{r['outlier_ratio']:.1f}"]
             for r in rows]
    styles = ["bold red" if (r["name"], r["scheme"]) in worst_keys else None for r in rows]
    print_rows(out, f"{model}: per layer (worst {worst} per scheme in bold red)", columns, cells, styles, long=0)
    heads = ("scheme", "layers", "bytes before", "bytes after", "saving", "rms rel error", "worst SQNR dB", "worst layer")
    columns = [(h, "left" if h in ("scheme", "worst layer") else "right") for h in heads]
    cells = [[t["scheme"], str(t["layers"]), f"{t['bytes_before']:,}", f"{t['bytes_after']:,}", f"{t['saving']:.2f}x",
              fmt("rel_error", t["rms_rel_error"]), fmt("sqnr_db", t["worst_sqnr_db"]),
              t["worst_layer"].removesuffix(".weight")] for t in sums]
    print_rows(out, "totals per scheme (linear layers only)", columns, cells, long=len(heads) - 1)
    if skipped:
        reasons = {}
        for name, why in skipped:
            reasons.setdefault(why, []).append(name)
        out.print("left alone:")
        for why, names in reasons.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            out.print(f"  {why}: {shown}", highlight=False)


def print_gptq_table(out, rows, scheme: str, observer: str) -> None:
    """``quantize --method gptq|awq|awq+gptq``: each layer's loss and RTN's on the calibration tokens (and AWQ's a)."""
    label = str(rows[0].get("method", "gptq")).upper()
    awq = any("alpha" in r for r in rows)
    heads = ("layer", "shape", "tokens", "RTN loss", f"{label} loss", f"{label} / RTN", *(("AWQ a",) if awq else ()),
             "seconds")
    columns = [(h, "left" if h == "layer" else "right") for h in heads]
    cells = [[r["name"].removesuffix(".weight"), "x".join(map(str, r["shape"])), f"{r['tokens']:,}",
              f"{r['rtn_loss']:.3e}", f"{r.get('loss', r.get('gptq_loss')):.3e}", f"{r['ratio']:.3f}",
              *((("-" if r.get("alpha") is None else f"{r['alpha']:.2f}"),) if awq else ()), f"{r['seconds']:.2f}"]
             for r in rows]
    if any(r.get("objective") == "model" for r in rows):
        measure = ("the float model's output at the layer, ||X W^T - X~ Q^T||^2 / ||X W^T||^2 (X the float model's "
                   "inputs, X~ the quantized model's)")
    else:
        measure = "tr(dW H dW^T) / tr(W H W^T)"
    print_rows(out, f"{label} per layer ({scheme}, observer {observer}): output error on the calibration tokens, "
                    f"{measure}", columns, cells, long=0)
    total = sum(r["seconds"] for r in rows)
    out.print(f"{label}: {len(rows)} layers, mean loss ratio {sum(r['ratio'] for r in rows) / len(rows):.3f}, "
              f"{total:.1f} s in the solver" + ("; AWQ a: the exponent of the input scale mean|x|^a, '-' where "
                                                "the layer is not scaled" if awq else ""), highlight=False)
    if any("weight_error" in r for r in rows):
        out.print("the rel error and SQNR of a folded weight below are against the folded float weight its codes "
                  "stand for", highlight=False)


def print_quantized(summary: dict, scheme: str, observer: str, gptq_rows, rtn_only) -> None:
    """``quantize``: GPTQ's table (if it ran), each layer's bytes and error, the totals.

    ``rtn_only``: names of the layers rounded to nearest in a calibrated run (not on the path it runs).
    """
    out = console()
    if gptq_rows:
        print_gptq_table(out, gptq_rows, scheme, observer)
    layers = summary["layers"]
    method = str(gptq_rows[0].get("method", "gptq")).upper() if gptq_rows else "round to nearest"
    heads = ("layer", "shape", "bytes before", "bytes after", "rel error", "SQNR dB")
    columns = [(h, "left" if h == "layer" else "right") for h in heads]
    cells = [[r.name.removesuffix(".weight"), "x".join(map(str, r.shape)), f"{r.bytes_before:,}", f"{r.bytes_after:,}",
              fmt("rel_error", r.rel_error), fmt("sqnr_db", r.sqnr_db)] for r in layers]
    print_rows(out, f"{summary['out']}: {scheme} ({method}), {len(layers)} layers quantized", columns, cells, long=0)
    before, after = summary["bytes_before"], summary["bytes_after"]
    out.print(f"linear layers: {before:,} -> {after:,} bytes ({before / after:.2f}x smaller); "
              f"{len(summary['skipped'])} tensors left alone", highlight=False)
    if rtn_only:
        out.print(f"rounded to nearest (not on the path {method} runs): "
                  f"{', '.join(n.removesuffix('.weight') for n in rtn_only)}", highlight=False)


def print_plan(plan: dict, path) -> None:
    """``plan``: each layer's chosen scheme, the plan's size and predicted cost beside each uniform candidate's."""
    out = console()
    columns = [(h, "left" if h in ("layer", "scheme") else "right")
               for h in ("layer", "shape", "scheme", "bytes", "predicted cost")]
    cells = [[name.removesuffix(".weight"), "x".join(map(str, e["shape"])), e["scheme"], f"{e['bytes']:,}",
              f"{e['cost']:.3e}"] for name, e in plan["layers"].items()]
    print_rows(out, f"size plan for {plan['model']} ({plan['method']})", columns, cells, long=0)
    counts = {}
    for e in plan["layers"].values():
        counts[e["scheme"]] = counts.get(e["scheme"], 0) + 1
    out.print(f"budget {plan['budget']['bytes']:,} bytes; plan {plan['total_bytes']:,} bytes = "
              f"{plan['bits_per_weight']:.3f} bits per weight; predicted cost {plan['predicted_cost']:.4e}; "
              + ", ".join(f"{k}: {v} layers" for k, v in counts.items()), highlight=False)
    for label, u in plan["uniform"].items():
        weights = 8.0 * plan["total_bytes"] / plan["bits_per_weight"] if plan["bits_per_weight"] else 0
        bits = 8.0 * u["bytes"] / weights if weights else 0.0
        out.print(f"  uniform {label:<12} {bits:6.3f} bits per weight, predicted cost {u['predicted_cost']:.4e}",
                  highlight=False)
    out.print(f"cost: {plan['cost']}", highlight=False)
    out.print(f"wrote {path}", highlight=False)


def print_eval(rows, n_sentences) -> None:
    """``eval``: one row per scheme (and plan), then each one's worst sentence."""
    from .fidelity import SENTENCES

    out = console()
    n = n_sentences or len(SENTENCES)
    columns = [(h, "left" if h == "scheme" else "right")
               for h in ("scheme", "bits/w", "model bytes", "mean cosine", "min cosine", "top-1 agreement")]
    cells = [[r["scheme"], f"{r['bits_per_weight']:.3g}", f"{r['model_bytes']:,}", f"{r['mean_cosine']:.6f}",
              f"{r['min_cosine']:.6f}", f"{100 * r['top1_agreement']:.1f}%"] for r in rows]
    print_rows(out, f"sentence embeddings, {n} sentences: quantized vs float32", columns, cells, long=0)
    out.print("worst sentences (lowest cosine):")
    for r in rows[1:]:
        w = r["worst"][0]
        text = w["sentence"] if len(w["sentence"]) <= 70 else w["sentence"][:67] + "..."
        out.print(f"  {r['scheme']:<12} {w['cosine']:.4f}  {text}", highlight=False)


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
    os.replace(tmp, path)
