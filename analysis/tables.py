"""The tables a paper needs, from load_experiment's frame, as Markdown and LaTeX.

The protocol's number is the last epoch's test accuracy of each run; a cell is
mean +- std over the runs of that method and noise rate (the seeds; std with ddof=1, as papers
report a sample std). Runs that have not reached their last epoch are left out and counted in the
caption, so a table of a running study is honest about what it averages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.load import last_epoch

BASELINE = "coop"
ZEROSHOT = "zero-shot"  # the row of the plain prompt "a photo of a {class}." (no training)
BELOW_ZEROSHOT = "†"
DASH = "–"


@dataclass
class Cell:
    """mean +- std over n runs; std is NaN for a single run; `signed` prints a difference (+1.20);
    lo/hi an interval ([-1.20, +3.40]); `show_n` appends (n=k); `flag` a marker the caption explains."""
    mean: float
    std: float = math.nan
    n: int = 1
    bold: bool = False
    signed: bool = False
    lo: float = math.nan
    hi: float = math.nan
    show_n: bool = False
    flag: str = ""
    need: int = 0  # seeds a paired interval would need to exclude 0 at this mean and spread (0: none shown)

    def text(self, digits: int, latex: bool = False) -> str:
        if self.mean is None or not math.isfinite(self.mean):
            return "--" if latex else DASH
        fmt = (lambda v: f"{v:+.{digits}f}") if self.signed else (lambda v: f"{v:.{digits}f}")
        m = fmt(self.mean)
        interval = f" [{fmt(self.lo)}, {fmt(self.hi)}]" if math.isfinite(self.lo) and math.isfinite(self.hi) else ""
        n = f" (n={self.n}{f'; needs ~{self.need}' if self.need else ''})" if self.show_n else ""
        if latex:
            m = f"\\mathbf{{{m}}}" if self.bold else m
            body = f"${m} \\pm {self.std:.{digits}f}$" if math.isfinite(self.std) else f"${m}$"
            return body + interval + n + ("$^\\dagger$" if self.flag else "")
        m = f"**{m}**" if self.bold else m
        body = f"{m} ± {self.std:.{digits}f}" if math.isfinite(self.std) else m
        return body + interval + n + self.flag


@dataclass
class Table:
    """Rows x columns of Cells, with a title and a caption; `stats` holds the numbers behind it."""
    title: str
    rows: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], Cell]
    caption: str
    stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    row_header: str = "method"
    digits: int = 2

    def __bool__(self) -> bool:
        return bool(self.rows)

    def _cell(self, r, c, latex=False) -> str:
        cell = self.cells.get((r, c))
        return cell.text(self.digits, latex) if cell else ("--" if latex else DASH)

    def markdown(self) -> str:
        esc = lambda s: str(s).replace("|", "\\|")
        lines = ["| " + " | ".join([esc(self.row_header)] + [esc(c) for c in self.columns]) + " |",
                 "|" + "|".join([":---"] + ["---:"] * len(self.columns)) + "|"]
        for r in self.rows:
            lines.append("| " + " | ".join([esc(r)] + [self._cell(r, c) for c in self.columns]) + " |")
        return "\n".join(lines)

    def latex(self, label: str | None = None) -> str:
        cols = "l" + "r" * len(self.columns)
        lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex(self.caption)}}}"]
        if label:
            lines.append(f"\\label{{{label}}}")
        lines += [f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
                  " & ".join([_tex(self.row_header.capitalize())] + [_tex(c) for c in self.columns]) + " \\\\",
                  "\\midrule"]
        for r in self.rows:
            lines.append(" & ".join([_tex(r)] + [self._cell(r, c, latex=True) for c in self.columns]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines)


def _tex(s: str) -> str:
    out = str(s)
    for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                 ("±", "$\\pm$"), ("Δ", "$\\Delta$"), ("†", "$^\\dagger$"), (DASH, "--")):
        out = out.replace(a, b)
    return out


def noise_label(rate: float) -> str:
    return f"{rate * 100:g}%"


def method_order(df: pd.DataFrame) -> list[str]:
    """Variants in the study's order; otherwise by prompt blocks, then label."""
    study = df.attrs.get("study")
    present = list(dict.fromkeys(df["method"]))
    if study is not None and study.variants:
        order = [v["name"] for v in study.variants]
        return [m for m in order if m in present] + [m for m in present if m not in order]
    firsts = df.groupby("method", sort=False)["blocks"].first() if "blocks" in df else None
    key = (lambda m: (_number_or_last(firsts.get(m)), m)) if firsts is not None else (lambda m: (0, m))
    return sorted(present, key=key)


def _number_or_last(v) -> float:
    """A sort key: the number, or infinity (after every number) for what is none."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.inf


def cell_stats(df: pd.DataFrame, metric: str, scale: float = 1.0) -> pd.DataFrame:
    """mean, std (ddof=1), n of `metric` at the last epoch of complete runs, per method x noise rate."""
    last = last_epoch(df)
    if last.empty:
        return pd.DataFrame(columns=["method", "noise_rate", "mean", "std", "n"])
    vals = last.assign(v=last[metric].astype(float) * scale).dropna(subset=["v"])
    g = vals.groupby(["method", "noise_rate"])["v"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.size()}).reset_index()
    return out


def _left_out(df: pd.DataFrame) -> str:
    runs = df.groupby("run")
    done = set(last_epoch(df)["run"])
    missing = [r for r in runs.groups if r not in done]
    if not missing:
        return ""
    status = df.drop_duplicates("run").set_index("run").loc[missing, "status"].value_counts()
    words = {"TERMINATED": "stopped early", "ERROR": "error"}  # TERMINATED short of the last epoch: ASHA
    parts = ", ".join(f"{n} {words.get(s, s.lower())}" for s, n in status.items())
    return f" {len(missing)} run(s) not at their last epoch are left out ({parts})."


def zeroshot_stats(df: pd.DataFrame) -> pd.DataFrame:
    """mean, std, n of zeroshot_acc per noise rate over the complete runs (the same test split and model
    for every run, so std is 0 unless the study varies the backbone)."""
    if "zeroshot_acc" not in df:
        return pd.DataFrame(columns=["noise_rate", "mean", "std", "n"])
    stats = cell_stats(df.assign(method=ZEROSHOT), "zeroshot_acc")
    return stats.drop(columns="method")


def ablation_table(df: pd.DataFrame, metric: str = "test_acc", baseline: str = BASELINE, digits: int = 2) -> Table:
    """Rows: zero-shot (for test accuracy), then the methods; columns: noise rates, their mean, and the
    difference of that mean to CoOp."""
    stats = cell_stats(df, metric)
    rows = [m for m in method_order(df) if m in set(stats["method"])]
    rates = sorted(stats["noise_rate"].unique())
    columns = [noise_label(r) for r in rates] + ["mean"]
    cells: dict[tuple[str, str], Cell] = {}
    for s in stats.itertuples():
        cells[(s.method, noise_label(s.noise_rate))] = Cell(s.mean, s.std if s.n > 1 else math.nan, int(s.n))
    zs = zeroshot_stats(df) if metric == "test_acc" and rows else pd.DataFrame()
    if len(zs):
        rows.insert(0, ZEROSHOT)
        for s in zs.itertuples():
            # constant over seeds and noise: a std of 0 would only clutter the row
            cells[(ZEROSHOT, noise_label(s.noise_rate))] = Cell(s.mean, s.std if s.std > 1e-9 else math.nan, int(s.n))
    if ZEROSHOT in rows:  # a trained method that ends below not training at all is worth a mark
        for (r, col), cell in cells.items():
            zs_cell = cells.get((ZEROSHOT, col))
            if r != ZEROSHOT and zs_cell is not None and cell.mean < zs_cell.mean:
                cell.flag = BELOW_ZEROSHOT
    counts = {c.n for (r, _), c in cells.items() if r != ZEROSHOT}
    if len(counts) > 1:  # cells backed by different numbers of runs say so themselves
        for (r, _), cell in cells.items():
            cell.show_n = r != ZEROSHOT
    for col in columns[:-1]:  # bold the best mean of each noise rate
        best = max((cells[(r, col)].mean for r in rows if (r, col) in cells), default=None)
        for r in rows:
            if (r, col) in cells and len(rows) > 1 and cells[(r, col)].mean == best:
                cells[(r, col)].bold = True
    incomplete = []
    for r in rows:
        means = [cells[(r, c)].mean for c in columns[:-1] if (r, c) in cells]
        if len(means) == len(columns) - 1:
            cells[(r, "mean")] = Cell(float(np.mean(means)))
        else:
            incomplete.append(r)
    name = {"test_acc": "Test accuracy", "val_acc": "Validation accuracy"}.get(metric, metric)
    caption = (f"{name} (%) at the last epoch, mean ± std over seeds (sample std; a single run shows no std). "
               f"Columns: noise rate; mean: average over the noise rates.")
    if baseline in rows and (baseline, "mean") in cells:
        columns.append(f"Δ vs {baseline}")
        base = cells[(baseline, "mean")].mean
        for r in rows:
            if (r, "mean") in cells:
                cells[(r, columns[-1])] = Cell(cells[(r, "mean")].mean - base, signed=True)
        caption += f" Δ: the mean minus that of the CoOp baseline ({baseline})."
    else:
        caption += f" No CoOp baseline (a variant named '{baseline}') in this study, so no Δ column."
    if ZEROSHOT in rows:
        caption += (f" {ZEROSHOT}: the frozen model with the plain prompt 'a photo of a {{class}}.', no training "
                    "(the same for every seed and noise rate).")
    if any(c.flag for c in cells.values()):
        caption += f" {BELOW_ZEROSHOT}: the mean is below zero-shot."
    if incomplete:
        caption += f" No mean for {', '.join(incomplete)}: not every noise rate has a result."
    study = df.attrs.get("study")
    if study is not None and study.kind != "grid":
        caption += (" Each row pools every trial of the search with that setting (its other searched values, "
                    "e.g. alpha, differ).")
    ns = sorted(set(stats["n"].astype(int)))
    if len(ns) == 1:
        caption += f" Runs per cell: {ns[0]}."
    elif ns:
        caption += " Runs per cell differ: (n=k) in each cell."
    caption += _left_out(df)
    return Table(f"{name} (last epoch)", rows, columns, cells, caption, stats, "method", digits)


def paired_differences(df: pd.DataFrame, metric: str = "test_acc", baseline: str = BASELINE,
                       methods: list[str] | None = None) -> pd.DataFrame:
    """Per method, noise rate and seed: the method's last-epoch value minus the baseline's at the same noise
    rate and seed (the same draw), runs of one key averaged. Columns: method, noise_rate, seed, diff.
    `methods`: only these (default: every other method)."""
    last = last_epoch(df)
    if last.empty or baseline not in set(last["method"]) or "seed" not in last:
        return pd.DataFrame(columns=["method", "noise_rate", "seed", "diff"])
    per = last.groupby(["method", "noise_rate", "seed"])[metric].mean().reset_index()
    base = per[per["method"] == baseline].drop(columns="method").rename(columns={metric: "base"})
    others = per[per["method"] != baseline]
    if methods is not None:
        others = others[others["method"].isin(methods)]
    pairs = others.merge(base, on=["noise_rate", "seed"])
    return pairs.assign(diff=pairs[metric] - pairs["base"])[["method", "noise_rate", "seed", "diff"]]


def t_halfwidth(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half the width of the t-interval of a mean of n values with sample std sd (n - 1 degrees of freedom)."""
    from scipy import stats as st
    return float(st.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def paired_interval(diffs, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of paired differences: their mean and its t-interval (at least two pairs)."""
    x = np.asarray(diffs, dtype=float)
    half = t_halfwidth(x.std(ddof=1), len(x), confidence)
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def seeds_to_resolve(mean: float, sd: float, confidence: float = 0.95, cap: int = 10_000) -> int:
    """The fewest pairs whose t-interval would exclude 0 if the differences kept this mean and spread
    (cap + 1 when even `cap` would not)."""
    from scipy import stats as st
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == 0:
        return cap + 1

    def excludes(n: int) -> bool:
        return t_halfwidth(sd, n, confidence) < abs(mean)
    z = st.norm.ppf(0.5 + confidence / 2)
    n = int(min(max(2, (z * sd / abs(mean)) ** 2), cap))  # the normal approximation, a little low
    while n <= cap and not excludes(n):
        n += 1
    while n > 2 and excludes(n - 1):
        n -= 1
    return n


def paired_table(df: pd.DataFrame, metric: str = "test_acc", baseline: str = BASELINE, digits: int = 2,
                 confidence: float = 0.95, methods: list[str] | None = None) -> Table:
    """Rows: methods (default all but the baseline; or `methods`); columns: noise rates; cell: mean over
    seeds of (method - baseline) at the same seed, with its t-interval (n - 1 degrees of freedom), the
    number of pairs and, where the interval holds 0, about how many pairs would resolve the difference."""
    pairs = paired_differences(df, metric, baseline, methods)
    order = methods if methods is not None else method_order(df)
    rows = [m for m in order if m in set(pairs["method"])]
    rates = sorted(pairs["noise_rate"].unique())
    columns = [noise_label(r) for r in rates]
    cells = {}
    unresolved = False
    for (m, rate), d in pairs.groupby(["method", "noise_rate"]):
        x = d["diff"].to_numpy(dtype=float)
        n = len(x)
        cell = Cell(float(x.mean()), n=n, signed=True, show_n=True)
        if n > 1:
            sd = x.std(ddof=1)
            _, cell.lo, cell.hi = paired_interval(x, confidence)
            if cell.lo <= 0 <= cell.hi and sd > 0:
                cell.need, unresolved = seeds_to_resolve(cell.mean, sd, confidence), True
        cells[(m, noise_label(rate))] = cell
    name = {"test_acc": "test accuracy", "val_acc": "validation accuracy"}.get(metric, metric)
    caption = (f"Paired difference to {baseline} in {name} (points) at the last epoch: per seed, the method minus "
               f"{baseline} on the same draw (noise rate and seed), mean over seeds with the "
               f"{confidence:.0%} t-interval (n - 1 degrees of freedom; none for a single pair); n = seeds with both "
               "runs. An interval that excludes 0 is a difference these seeds resolve.")
    if unresolved:
        caption += (" needs ~k: where the interval holds 0, the seeds it would take to exclude 0 if the "
                    "differences kept this mean and spread (a rough guide: the spread itself is uncertain).")
    stats = pairs.groupby(["method", "noise_rate"])["diff"].agg(["mean", "std", "size"]).reset_index()
    return Table(f"Paired difference to {baseline} (last epoch)", rows, columns, cells, caption, stats, "method",
                 digits)


SELECTION = (("kept_frac", "kept"), ("select_precision", "precision"), ("select_recall", "recall"),
             ("noise_auroc", "AUROC"))


def selection_table(df: pd.DataFrame, digits: int = 1) -> Table:
    """Clean-sample selection at the last epoch, per method x noise rate: kept fraction, precision
    (clean share of kept), recall (kept share of clean), AUROC of G for clean vs noisy; all in %."""
    per = {key: cell_stats(df, key, scale=100.0) for key, _ in SELECTION}
    base = per["kept_frac"]
    order = method_order(df)
    keys = sorted({(m, r) for m, r in zip(base["method"], base["noise_rate"])},
                  key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1]))
    rows = [f"{m} @ {noise_label(r)}" for m, r in keys]
    columns = [f"{label} (%)" for _, label in SELECTION]
    cells = {}
    for (key, label), col in zip(SELECTION, columns):
        for s in per[key].itertuples():
            cells[(f"{s.method} @ {noise_label(s.noise_rate)}", col)] = Cell(
                s.mean, s.std if s.n > 1 else math.nan, int(s.n))
    caption = ("Clean-sample selection at the last epoch, mean ± std over seeds, in %: kept = share of the "
               "training set kept; precision = clean share of the kept samples; recall = share of the clean "
               "samples kept; AUROC of the robust similarity G for clean vs noisy (– where undefined, e.g. "
               "no noise)." + _left_out(df))
    stats = pd.concat([p.assign(metric=k) for k, p in per.items()], ignore_index=True)
    return Table("Clean-sample selection (last epoch)", rows, columns, cells, caption, stats,
                 "method @ noise", digits)


def best_trials(df: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The k trials with the best objective at their last epoch (complete ones), with searched params."""
    last = last_epoch(df)
    if last.empty:
        return pd.DataFrame()
    keys = [c for c in df.attrs.get("searched", []) if c in last]
    per = last.groupby("trial_id", sort=False).agg(
        method=("method", "first"), **{c: (c, "first") for c in keys},
        objective=("objective", "first"), test_acc=("test_acc", "mean")).reset_index()
    asc = df.attrs.get("mode", "max") == "min"
    return per.sort_values("objective", ascending=asc).head(k).reset_index(drop=True)


def frame_markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    """A plain DataFrame as a Markdown table (pandas' to_markdown needs tabulate, not a dependency)."""
    def fmt(v):
        if isinstance(v, float):
            return DASH if not math.isfinite(v) else f"{v:.{digits}g}"
        return str(v).replace("|", "\\|").replace("\n", " ")
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
