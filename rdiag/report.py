"""Figures, ``summary.json`` and one self-contained HTML report from a run store.

:func:`build_report` reads the finished runs of a :class:`~rdiag.runs.store.Store`
(typically an r x width x seed sweep), fits the width exponent of every metric
of :data:`rdiag.predictions.PREDICTIONS` the runs recorded (``h0``, ``delta_h``,
``f0``, ``delta_f``, ``dW_op``, ``dW_rel``, ``ntk_rel_change``, ``lin_error``),
read at initialization or at each run's last step, and puts each next to its
prediction (docs/theory.md section 2) with :func:`rdiag.predictions.fit_records`,
the function the coordinate check uses, judged as the coordinate check judges
(:func:`rdiag.verdicts.judge`: pass, fail or inconclusive, with the reason).
``report.html`` opens with those verdicts (failures first), then the tables and
figures; ``summary.json`` has ``verdict`` and ``reason`` in every fit and the
counts in ``verdicts``. Stores written by the release before
this one (other metric names) are reported the same: the store reads them back
under the current names (:mod:`rdiag.records`). Layer roles (for ``dW_op``) come from the
built-in family a run names.
Figures: kernel movement vs width, the coordinate check (``delta_h`` vs width),
preconditioned sharpness vs step for muP and NTK with the ``2/eta0`` line, the top
eNTK eigenvalue over time and loss curves. matplotlib and pandas are imported
inside the functions.

**The richness meter's section.** :func:`meter_section` renders a
:class:`~rdiag.meter.MeterResult` (or its ``meter.json``): the verdict,
``r_hat`` with its interval, one row per layer (role, problem, violated
exponents, fixes), every judged exponent and :func:`plot_meter`'s figure (the
fitted exponents against their predictions at the target ``r``; ``||dh||``,
``||dW||_op / ||W_0||_op`` and kernel movement against the width). The contract
is one file in one place: a ``meter.json`` in the *store's directory* is part of
that store's report. :func:`build_report` includes it (``report.html``,
``figures/meter.png``, ``summary["meter"]``); :func:`build_meter_report` writes
a meter alone as ``meter.html`` and ``meter.png`` (what ``rdiag meter --out
DIR`` does, and ``rdiag report --store DIR`` for a directory holding only a
``meter.json``). A meter is never looked up anywhere else (not in ``out_dir``,
not in parent directories).
"""

from __future__ import annotations

import base64
import html
import json
import math
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rdiag._optional import require
from rdiag.coord_check import plot_series
from rdiag.meter import METER_JSON
from rdiag.models import FAMILIES
from rdiag.parametrization import Parametrization, parse_parametrization
from rdiag.predictions import PREDICTIONS, fit_records, formulas, richness_of
from rdiag.records import TRAIN_LOSS
from rdiag.runs.store import Store
from rdiag.verdicts import judge_fits


def _parsed(label: str) -> Parametrization | None:
    try:
        return parse_parametrization(label)
    except (ValueError, TypeError):  # a run not made by the harness
        return None


def _r_of(label: str) -> float | None:
    param = _parsed(label)
    return None if param is None else param.r


def _plain(value: Any) -> Any:
    """A JSON-ready group value: pandas' missing values (NaN) become None."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


#: Config fields that name a run in the lists of failed runs (``param`` in old stores).
LABEL_FIELDS = ("parametrization", "param", "width", "seed", "lr")


def run_label(config: dict[str, Any]) -> str:
    """A run's grid point in words, e.g. ``"parametrization=r=0.5 width=64 seed=0 lr=4"``."""
    return " ".join(f"{k}={config[k]}" for k in LABEL_FIELDS if k in config)


def failed_runs(store: Store | str | Path) -> list[dict[str, Any]]:
    """The store's failed runs and why they failed.

    Returns:
        One ``{"run", "reason", "config"}`` per failed run (``config`` holds the
        :data:`LABEL_FIELDS` the run has; ``reason`` None if none was recorded).
    """
    store = store if isinstance(store, Store) else Store(store)
    out = []
    for rid in store.run_ids("failed"):
        config = store.config(rid)
        fields = {k: config[k] for k in LABEL_FIELDS if k in config}
        out.append({"run": rid, "reason": store.reason(rid), "config": fields})
    return out


def _failed_table(failed: list[dict[str, Any]]) -> str:
    if not failed:
        return ""
    rows = [
        [f["run"], run_label(f["config"]), f["reason"] or "not recorded"]
        for f in failed
    ]
    return (
        f"<h2>Failed runs ({len(failed)})</h2><p>Not in the fits and figures.</p>"
        + _table(["run", "config", "reason"], rows)
    )


def _frame(store: Store) -> Any:
    frame = store.query()
    if len(frame) == 0:
        raise ValueError(
            f"the store {store.root} has no records; run `rdiag sweep` or rdiag.train first"
        )
    frame = frame[frame["status"] == "finished"]
    if len(frame) == 0:
        raise ValueError(f"the store {store.root} has no finished runs yet")
    if "param" in frame.columns and "parametrization" not in frame.columns:
        frame = frame.rename(columns={"param": "parametrization"})  # an older store
    # Runs written by a bare Monitor may lack the harness's config fields.
    defaults = {"parametrization": "custom", "width": 0, "seed": 0, "lr": float("nan")}
    return frame.assign(**{k: v for k, v in defaults.items() if k not in frame.columns})


def _roles(info: dict[str, Any]) -> dict[str, str]:
    """Layer name -> role of the built-in family a run group names (else empty)."""
    family = FAMILIES.get(info.get("family"))
    if family is None:
        return {}
    depth = info.get("depth")
    try:
        with torch.device("meta"):
            model = family(8) if depth is None else family(8, depth=int(depth))
    except (TypeError, ValueError):
        return {}
    return dict(model.roles)


def fits(store: Store | str | Path) -> list[dict[str, Any]]:
    """Width exponents of every run group of the store, next to their predictions.

    Runs are grouped by every config field except ``width`` and ``seed``; a group
    with at least two widths gives one fit per metric and layer (see
    :func:`rdiag.predictions.fit_records`).

    Args:
        store: The store (or its directory).

    Returns:
        A list of ``{"metric", "layer", "parametrization", "r", "slope", "ci":
        [lo, hi], "predicted", "widths", "seeds", "group", "verdict", "reason",
        "passed", "tolerance", "inconclusive"}`` (``layer`` None for model-level
        metrics; ``r``/``predicted`` None where the parametrization has no r;
        ``ci`` ``[None, None]`` for a fit through two points). The verdict is
        the coordinate check's, :func:`rdiag.verdicts.judge` at the group's last
        step ``T`` and learning rate: ``"pass"``, ``"fail"``, ``"inconclusive"``
        (the tolerance cannot resolve the prediction, or no interval) or ``"no
        prediction"``, and ``reason`` says why in numbers.
    """
    store = store if isinstance(store, Store) else Store(store)
    frame = _frame(store)
    fitted = [p for p in PREDICTIONS.values() if p.fitted]
    frame = frame[frame["metric"].isin({p.source for p in fitted})]
    group_cols = [
        c
        for c in frame.columns
        if c
        not in ("run", "step", "metric", "layer", "value", "status", "width", "seed")
    ]
    at = {
        "first": frame.groupby("run")["step"].transform("min") == frame["step"],
        "step1": frame["step"] == 1,
        "last": frame.groupby("run")["step"].transform("max") == frame["step"],
    }
    out = []
    for key, g in frame.groupby(group_cols, dropna=False, sort=True):
        if g["width"].nunique() < 2:
            continue
        info = dict(zip(group_cols, key))
        roles = _roles(info)
        records = [
            {
                "width": int(row.width),
                "seed": row.seed,
                "metric": p.metric,
                "layer": row.layer or None,
                "role": roles.get(row.layer),
                "value": float(row.value),
            }
            for p in fitted
            for row in g[(g["metric"] == p.source) & at[p.when][g.index]].itertuples()
        ]
        param = _parsed(info["parametrization"])
        steps = int(g["step"].max())
        lr = _plain(info.get("lr"))
        judged = judge_fits(
            fit_records(records, param, steps),
            r=None if param is None else richness_of(param),
            steps=steps,
            lr=lr if isinstance(lr, (int, float)) else None,
        )
        for f in judged:
            if math.isnan(f["slope"]):
                continue
            lo, hi = f["ci"]
            f.update(
                parametrization=info["parametrization"],
                ci=[lo, hi] if math.isfinite(lo) else [None, None],
                group={k: _plain(v) for k, v in info.items() if k != "parametrization"},
            )
            out.append(f)
    return out


def _mean_curves(frame: Any, metric: str, layer: str = "") -> Any:
    rows = frame[(frame["metric"] == metric) & (frame["layer"] == layer)]
    return (
        rows.groupby(["parametrization", "width", "step"])["value"].mean().reset_index()
    )


def _sorted_params(params: Any) -> list[str]:
    return sorted(set(params), key=lambda p: (_r_of(p) is None, _r_of(p) or 0.0, p))


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fig_width_scaling(
    plt: Any,
    frame: Any,
    fit_list: list,
    metric: str,
    source: str,
    ylabel: str,
    path: Path,
) -> Path | None:
    rows = frame[frame["metric"] == source]
    if metric == "f0":
        rows = rows[rows.groupby("run")["step"].transform("min") == rows["step"]]
    else:
        rows = rows[rows.groupby("run")["step"].transform("max") == rows["step"]]
    if rows.empty or rows["width"].nunique() < 2:
        return None
    layers = sorted(rows["layer"].unique())
    fig, axes = plt.subplots(
        1, len(layers), figsize=(5 * len(layers), 4), squeeze=False
    )
    for ax, layer in zip(axes[0], layers):
        for param in _sorted_params(rows["parametrization"]):
            g = rows[(rows["layer"] == layer) & (rows["parametrization"] == param)]
            line = ax.plot(g["width"], g["value"], "o", alpha=0.35)[0]
            mean = g.groupby("width")["value"].mean()
            fit = next(
                (
                    f
                    for f in fit_list
                    if f["metric"] == metric
                    and f["parametrization"] == param
                    and (f["layer"] or "") == layer
                ),
                None,
            )
            label = param
            if fit is not None:
                pred = "n/a" if fit["predicted"] is None else f"{fit['predicted']:+.2f}"
                lo, hi = fit["ci"]
                ci = "" if lo is None else f" [{lo:+.2f}, {hi:+.2f}]"
                label += f": slope {fit['slope']:+.2f}{ci}, predicted {pred}"
            ax.plot(mean.index, mean.values, ":", color=line.get_color(), lw=1)
            if fit is not None:  # the fitted power law through the log-means
                lw, lv = (
                    np.log(g["width"].to_numpy(float)),
                    np.log(g["value"].to_numpy(float)),
                )
                grid = np.array(sorted(g["width"].unique()), dtype=float)
                curve = np.exp(lv.mean() + fit["slope"] * (np.log(grid) - lw.mean()))
                ax.plot(grid, curve, "-", color=line.get_color(), label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width n")
        ax.set_ylabel(ylabel)
        ax.set_title(layer or metric)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _fig_over_steps(
    plt: Any,
    frame: Any,
    metric: str,
    layer: str,
    ylabel: str,
    path: Path,
    *,
    params: list[str] | None = None,
    eos: bool = False,
    logy: bool = False,
) -> Path | None:
    curves = _mean_curves(frame, metric, layer)
    if curves.empty:
        return None
    params = [
        p
        for p in (params or _sorted_params(curves["parametrization"]))
        if p in set(curves["parametrization"])
    ]
    if not params:
        return None
    fig, axes = plt.subplots(
        1, len(params), figsize=(5 * len(params), 4), squeeze=False
    )
    for ax, param in zip(axes[0], params):
        g = curves[curves["parametrization"] == param]
        for width, gw in g.groupby("width"):
            ax.plot(gw["step"], gw["value"], marker=".", label=f"n={width}")
        if eos:
            for lr in sorted(
                frame[frame["parametrization"] == param]["lr"].dropna().unique()
            ):
                ax.axhline(
                    2 / lr, color="k", ls="--", lw=1, label=f"2/eta0 = {2 / lr:.3g}"
                )
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(param)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_figures(
    store: Store | str | Path, out_dir: str | Path, fit_list: list[dict] | None = None
) -> dict[str, Path]:
    """Draw the report's figures as PNG files into ``out_dir``.

    Args:
        store: The store (or its directory).
        out_dir: Directory for the PNGs (created if missing).
        fit_list: Fits from :func:`fits` (computed if None), quoted in legends.

    Returns:
        Figure key -> path, for the figures the store has data for.
    """
    require("matplotlib", "rdiag report figures").use("Agg")
    plt = require("matplotlib.pyplot", "rdiag report figures")
    store = store if isinstance(store, Store) else Store(store)
    frame = _frame(store)
    fit_list = fits(store) if fit_list is None else fit_list
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mu_ntk = [
        p for p in _sorted_params(frame["parametrization"]) if _r_of(p) in (0.0, 0.5)
    ]
    made = {
        "kernel_movement": _fig_width_scaling(
            plt,
            frame,
            fit_list,
            "ntk_rel_change",
            PREDICTIONS["ntk_rel_change"].source,
            "||K_T - K_0||_F / ||K_0||_F",
            out / "kernel_movement.png",
        ),
        "coord_check": _fig_width_scaling(
            plt,
            frame,
            fit_list,
            "delta_h",
            PREDICTIONS["delta_h"].source,
            "||h_T - h_0|| (mean over probe)",
            out / "coord_check.png",
        ),
        "sharpness": _fig_over_steps(
            plt,
            frame,
            "sharpness/precond",
            "",
            "lambda_max(M^1/2 H M^1/2)",
            out / "sharpness.png",
            params=mu_ntk or None,
            eos=True,
        ),
        "ntk_eigenvalues": _fig_over_steps(
            plt,
            frame,
            "ntk/eig",
            "0",
            "top eigenvalue of K_M",
            out / "ntk_eigenvalues.png",
            logy=True,
        ),
        "loss": _fig_over_steps(
            plt, frame, TRAIN_LOSS, "", "training loss", out / "loss.png", logy=True
        ),
    }
    return {k: v for k, v in made.items() if v is not None}


def _fit_table(fit_list: list[dict]) -> str:
    rows = []
    for f in fit_list:
        pred = "" if f["predicted"] is None else f"{f['predicted']:+.3f}"
        diff = "" if f["predicted"] is None else f"{f['slope'] - f['predicted']:+.3f}"
        lo, hi = f["ci"]
        ci = "n/a (2 points)" if lo is None else f"[{lo:+.3f}, {hi:+.3f}]"
        rows.append(
            [
                f["metric"],
                f["layer"] or "",
                f["parametrization"],
                f"{f['slope']:+.3f}",
                ci,
                pred,
                diff,
                f"{f['widths'][0]}..{f['widths'][-1]} ({len(f['widths'])})",
                str(f["seeds"]),
            ]
        )
    head = [
        "metric",
        "layer",
        "parametrization",
        "fitted slope",
        "95% CI",
        "predicted",
        "slope - predicted",
        "widths",
        "seeds",
    ]
    return _table(head, rows)


def _verdict_section(fit_list: list[dict]) -> str:
    """The report's opening: every prediction's verdict, failures first, with reasons."""
    judged = [f for f in fit_list if f.get("verdict") not in (None, "no prediction")]
    counts = {
        v: sum(f["verdict"] == v for f in judged)
        for v in ("pass", "fail", "inconclusive")
    }
    if not judged:
        headline = "No fit has a prediction (no parametrization on the richness scale)."
        cls = "none"
    elif counts["pass"] == len(judged):
        headline = f"All {len(judged)} predictions pass."
        cls = "pass"
    else:
        parts = [f"{counts[v]} {v}" for v in ("fail", "inconclusive") if counts[v]]
        headline = (
            f"{', '.join(parts)}, {counts['pass']} pass, of {len(judged)} predictions."
        )
        cls = "fail" if counts["fail"] else "inconclusive"
    order = {"fail": 0, "inconclusive": 1, "pass": 2}
    rows = [
        (
            f["verdict"],
            [
                f["verdict"],
                f["metric"],
                f["layer"] or "",
                f["parametrization"],
                f"{f['slope']:+.3f}",
                f"{f['predicted'] + 0.0:+.3f}",  # no "-0.000"
                f["reason"],
            ],
        )
        for f in sorted(judged, key=lambda f: order[f["verdict"]])
    ]
    head = [
        "verdict",
        "metric",
        "layer",
        "parametrization",
        "slope",
        "predicted",
        "reason",
    ]
    cells = "".join(
        f'<tr class="{verdict.replace(" ", "-")}">'
        + "".join(f"<td>{html.escape(c)}</td>" for c in row)
        + "</tr>"
        for verdict, row in rows
    )
    table = (
        '<table class="verdicts"><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + f"</tr>{cells}</table>"
    )
    return f"""<h2>Verdicts</h2>
<p class="headline {cls}">{html.escape(headline)}</p>
<p>Each fitted width exponent against its prediction (docs/theory.md section 2), judged as the
coordinate check judges (rdiag.verdicts.judge): within a tolerance of finite-width allowance
and seed scatter; inconclusive where that tolerance cannot tell the prediction from its
neighbours in r.</p>
{table}"""


def _prediction_text() -> str:
    return "; ".join(
        f"{metric} ~ n^({formula})" for metric, formula in formulas().items()
    )


def _image(key: str, path: Path, level: str = "h2") -> str:
    """A PNG embedded in the page under a heading."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"<{level}>{html.escape(key.replace('_', ' '))}</{level}>"
        f'<img alt="{key}" src="data:image/png;base64,{data}">'
    )


def _page(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
img{{max-width:100%}}tr.pass td:first-child{{color:#176f2c;font-weight:bold}}
tr.fail td:first-child{{color:#b00020;font-weight:bold}}
tr.inconclusive td:first-child{{color:#8a6d00;font-weight:bold}}
p.headline{{font-size:17px;font-weight:bold;padding:6px 10px;border-radius:4px}}
p.headline.pass{{background:#e3f4e6}}p.headline.fail{{background:#fbe3e6}}
p.headline.inconclusive,p.headline.none{{background:#fbf3dc}}</style></head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table of escaped cells (a cell's lines joined by ``<br>``)."""
    attr = f' class="{cls}"' if cls else ""
    cells = "".join(
        "<tr>"
        + "".join(
            "<td>" + "<br>".join(html.escape(x) for x in c.split("\n")) + "</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return (
        f"<table{attr}><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + f"</tr>{cells}</table>"
    )


# ---- the richness meter ------------------------------------------------------------
def load_meter(source: Any) -> dict[str, Any]:
    """A richness meter's result as the data of ``meter.json``.

    Args:
        source: A :class:`~rdiag.meter.MeterResult`, the data of its
            ``meter.json``, the file, or the directory holding it.

    Returns:
        The :meth:`~rdiag.meter.MeterResult.to_dict` data.

    Raises:
        FileNotFoundError: No ``meter.json`` there.
        ValueError: The file (named) is not JSON or not a meter's result.
    """
    if hasattr(source, "to_dict"):
        return source.to_dict()
    if isinstance(source, dict):
        return source
    path = Path(source)
    path = path / METER_JSON if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"no richness meter result at {path}; write one with `rdiag meter --out "
            "DIR` or MeterResult.save(DIR)"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"could not read the richness meter result {path}: {err}; write it "
            "again (rdiag meter --out DIR) or remove it"
        ) from err
    if not isinstance(payload, dict) or not {"verdict", "layers", "fits"} <= set(
        payload
    ):
        raise ValueError(
            f"expected {path} to be a meter.json (MeterResult.save), got other JSON"
        )
    return payload


def _num(value: float | None, fmt: str = "+.2f") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)


def _interval_text(interval: Any) -> str:
    lo, hi = interval
    if lo is None or not math.isfinite(lo):
        return "no interval (fewer than three seeds at every width)"
    return f"95% interval [{lo:.2f}, {hi:.2f}] from resampling seeds"


def _exponent_label(fit: dict[str, Any]) -> str:
    return f"{fit['metric']}[{fit['layer']}]" if fit["layer"] else fit["metric"]


def _judged(fit: dict[str, Any]) -> str:
    if "verdict" in fit:
        return {"fail": "FAIL", "no prediction": ""}.get(fit["verdict"], fit["verdict"])
    if fit.get("inconclusive"):  # a meter.json written before the verdict key
        return "inconclusive"
    return {True: "pass", False: "FAIL", None: ""}[fit.get("passed")]


def plot_meter(meter: Any, path: str | Path) -> Path:
    """The meter's figure: fitted exponents against their predictions, and the series.

    The first panel has every fitted exponent with its interval next to its
    prediction at the target richness (green: passes, red: violated, grey:
    inconclusive); the others the measured ``||dh||``, ``||dW||_op / ||W_0||_op``
    and (if measured) kernel movement against the width, per layer, with the
    predicted slopes dashed (as :func:`rdiag.coord_check.plot_coord_check`).
    Needs matplotlib (``pip install 'rdiag[plots]'``).

    Args:
        meter: A :class:`~rdiag.meter.MeterResult` or what :func:`load_meter` takes.
        path: The PNG to write.

    Returns:
        ``path``.
    """
    Figure = require("matplotlib.figure", "rdiag meter figures").Figure
    payload = load_meter(meter)
    fits = [
        {**f, "ci": [math.nan if c is None else c for c in f["ci"]]}
        for f in payload["fits"]
        if f["slope"] is not None
    ]
    shown = [f for f in fits if f["predicted"] is not None]
    series = [m for m in _METER_SERIES if any(f["metric"] == m for f in fits)]
    fig = Figure(figsize=(5.5 + 4.2 * len(series), 4.2))
    ax = fig.add_subplot(1, 1 + len(series), 1)
    colors = {"pass": "tab:green", "FAIL": "tab:red"}
    for i, f in enumerate(shown):
        lo, hi = f["ci"]
        err = None if math.isnan(lo) else [[f["slope"] - lo], [hi - f["slope"]]]
        color = colors.get(_judged(f), "tab:gray")
        ax.errorbar(i, f["slope"], yerr=err, fmt="o", ms=4, color=color, capsize=2)
        ax.plot(i, f["predicted"], "kx", ms=7)
    ax.plot([], [], "kx", label=f"predicted at r = {_num(payload['target'], '.2f')}")
    ax.plot([], [], "o", color="tab:gray", label="fitted (95% CI)")
    ax.set_xticks(range(len(shown)), [_exponent_label(f) for f in shown])
    ax.tick_params(axis="x", labelrotation=80, labelsize=6)
    ax.set(ylabel="width exponent", title="fitted vs predicted exponents")
    ax.legend(fontsize=7)
    for j, metric in enumerate(series):
        ax = fig.add_subplot(1, 1 + len(series), j + 2)
        for f in (f for f in fits if f["metric"] == metric):
            plot_series(ax, payload["records"], f)
        ax.set(xscale="log", yscale="log", xlabel="width", title=metric)
        ax.legend(fontsize=6)
    fig.suptitle(f"richness meter: {payload['verdict']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


#: The measured series the meter's figure draws against the width.
_METER_SERIES = ("delta_h", "dW_rel", "ntk_rel_change")


def meter_section(meter: Any, figure: str | Path | None = None) -> str:
    """The HTML section of a richness meter's result (a heading, no page around it).

    Args:
        meter: A :class:`~rdiag.meter.MeterResult` or what :func:`load_meter` takes.
        figure: A PNG to embed (:func:`plot_meter`), or None.

    Returns:
        The verdict, ``r_hat`` with its interval, the notes, one row per layer
        (role, problem, violated exponents, fixes), every judged exponent, the
        diverged runs and the figure.
    """
    payload = load_meter(meter)
    widths = payload["widths"]
    layers = _table(
        ["layer", "role", "problem", "violated exponents", "fixes"],
        [
            [
                d["name"],
                d["role"],
                d["problem"] or "ok",
                "\n".join(d["violations"]),
                "\n".join(d["fixes"]),
            ]
            for d in payload["layers"]
        ],
        "meter-layers",
    )
    exponents = _table(
        ["exponent", "fitted slope", "95% CI", "predicted", "verdict", "reason"],
        [
            [
                _exponent_label(f),
                _num(f["slope"], "+.3f"),
                "n/a"
                if f["ci"][0] is None
                else f"[{f['ci'][0]:+.3f}, {f['ci'][1]:+.3f}]",
                _num(f["predicted"], "+.3f"),
                _judged(f),
                f.get("reason", ""),
            ]
            for f in payload["fits"]
            if f["predicted"] is not None
        ],
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in payload["notes"])
    failed = "".join(
        f"<li>width {f['width']} seed {f['seed']}: {html.escape(f['reason'])}</li>"
        for f in payload["failed"]
    )
    image = "" if figure is None else _image("meter exponents", Path(figure), "h3")
    span = f"{widths[0]}..{widths[-1]} ({len(widths)})" if widths else "none"
    return f"""<h2>Richness meter</h2>
<p class="meter-verdict"><b>Verdict:</b> {html.escape(payload["verdict"])}</p>
<p>r_hat = {_num(payload["r"], ".3f")}, {_interval_text(payload["interval"])}
(finite-width bias bound +-{_num(payload["systematic"], ".2f")}); predictions and fixes
at r = {_num(payload["target"], ".2f")}. Widths {span}, {len(payload["seeds"])} seed(s),
{payload["steps"]} steps.</p>
{f"<ul>{notes}</ul>" if notes else ""}
<h3>Layers</h3>
{layers}
{f"<h3>Diverged runs</h3><ul>{failed}</ul>" if failed else ""}
<h3>Exponents</h3>
{exponents}
{image}
"""


def build_meter_report(meter: Any, out_dir: str | Path) -> dict[str, Path]:
    """Write ``meter.html`` (and ``meter.png``) for a richness meter's result.

    Args:
        meter: A :class:`~rdiag.meter.MeterResult` or what :func:`load_meter` takes.
        out_dir: Output directory (created if missing).

    Returns:
        ``{"html": path, "figure": path}`` (no figure without matplotlib).
    """
    payload = load_meter(meter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if find_spec("matplotlib") is not None:
        paths["figure"] = plot_meter(payload, out / "meter.png")
    body = meter_section(payload, paths.get("figure"))
    if "figure" not in paths:
        body += "<p>No figure: matplotlib is missing (pip install 'rdiag[plots]').</p>"
    page = _page("rdiag richness meter", body)
    (out / "meter.html").write_text(page, encoding="utf-8")
    return {"html": out / "meter.html", **paths}


def build_report(store: Store | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write figures, ``summary.json`` and a self-contained ``report.html``.

    A ``meter.json`` in the store's directory (``rdiag meter --out`` the same
    directory, or :meth:`~rdiag.meter.MeterResult.save`) adds the richness
    meter's section (:func:`meter_section`), its figure ``figures/meter.png``
    and ``summary["meter"]`` (verdict, kind, r, interval, target).

    Args:
        store: The store (or its directory) holding finished runs.
        out_dir: Output directory (created if missing); figures go to ``out_dir/figures``.

    Returns:
        ``{"html": path, "summary": path, <figure key>: path, ...}`` (``"meter"``:
        the meter's figure).

    Raises:
        ValueError: The store has no finished runs, or its ``meter.json`` is not
            a meter's result.
    """
    store = store if isinstance(store, Store) else Store(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fit_list = fits(store)
    figures = plot_figures(store, out / "figures", fit_list)
    meter_path = Path(store.root) / METER_JSON
    meter = load_meter(meter_path) if meter_path.is_file() else None
    extra = {}
    if meter is not None:
        extra["meter"] = plot_meter(meter, out / "figures" / "meter.png")
    run_ids = store.run_ids()
    statuses = {s: len(store.run_ids(s)) for s in ("finished", "running", "failed")}
    summary = {
        "verdicts": {
            v: sum(f["verdict"] == v for f in fit_list)
            for v in ("pass", "fail", "inconclusive", "no prediction")
        },
        "fits": fit_list,
        "runs": {"total": len(run_ids), **statuses},
        "failed": failed_runs(store),
        "figures": {
            k: str(v.relative_to(out)) for k, v in {**figures, **extra}.items()
        },
        "predictions": formulas(),
        "store": str(store.db_path),
    }
    if meter is not None:
        keys = ("verdict", "kind", "r", "interval", "target")
        summary["meter"] = {k: meter[k] for k in keys}
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, default=str, allow_nan=False))
    images = "".join(_image(key, path) for key, path in figures.items())
    section = "" if meter is None else meter_section(meter, extra["meter"])
    body = f"""{_verdict_section(fit_list)}
<p>Store: {html.escape(str(store.db_path))}. Runs: {html.escape(json.dumps(summary["runs"]))}.</p>
{section}
<h2>Fitted width exponents</h2>
<p>Least-squares slopes of log(metric) on log(width) over every (width, seed) point at the
last step (h0, f0: at initialization), with 95% t-intervals (seed scatter only; finite
widths bias slopes by up to ~0.2, most at r = 0). Predicted exponents of the width:
{html.escape(_prediction_text())}.</p>
{_fit_table(fit_list)}
{_failed_table(summary["failed"])}
{images}"""
    html_path = out / "report.html"
    html_path.write_text(_page("rdiag report", body), encoding="utf-8")
    return {"html": html_path, "summary": summary_path, **figures, **extra}
