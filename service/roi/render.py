"""The ROI report as one self-contained HTML page (inline SVG charts, no script, no CDN) and
a CSV of every row. The machine that opens the page may have no internet: nothing is fetched.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from service.roi.analysis import ALL, RoiReport

__all__ = [
    "CSV_COLUMNS",
    "BarGroup",
    "ForestRow",
    "bars_svg",
    "forest_svg",
    "page",
    "report_csv",
    "report_html",
    "write_report",
]

CSV_COLUMNS: Final = (
    "experiment",
    "arm",
    "control",
    "channel",
    "category",
    "units",
    "orders",
    "attachment_rate",
    "would_have_bought_rate",
    "aov",
    "units_per_order",
    "net_revenue_per_order",
    "margin_per_order",
    "return_rate",
    "split_shipment_rate",
    "incremental_net_revenue_per_order",
    "incremental_net_revenue_per_order_low",
    "incremental_net_revenue_per_order_high",
    "incremental_margin_per_order",
    "incremental_margin_per_order_low",
    "incremental_margin_per_order_high",
    "significant",
    "mde_margin_per_order",
    "target_effect",
    "underpowered",
    "incremental_return_rate",
    "incremental_return_rate_low",
    "incremental_return_rate_high",
    "system_cost_per_order",
    "incremental_margin_after_system_cost",
)
_PALETTE: Final = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")
_STYLE: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; color: #222; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.meta { color: #555; } .cards { display: flex; gap: 1rem; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; min-width: 15rem; }
.card .value { font-size: 1.5rem; font-weight: 600; } .flag { font-weight: 600; }
.good { color: #2e7d32; } .bad { color: #c62828; } .warn { color: #b26a00; }
table { border-collapse: collapse; width: 100%; font-size: 12px; margin-top: .5rem; }
th, td { border-bottom: 1px solid #eee; padding: 3px 6px; text-align: right; }
th:nth-child(-n+4), td:nth-child(-n+4) { text-align: left; }
figure.chart { margin: 1rem 0; } figcaption { color: #555; font-size: 12px; }
ul.notes li { margin: .2rem 0; } .scroll { overflow-x: auto; }
"""


@dataclass(frozen=True)
class ForestRow:
    label: str
    point: float | None
    low: float | None
    high: float | None
    color: str = _PALETTE[0]


@dataclass(frozen=True)
class BarGroup:
    label: str
    values: Sequence[tuple[str, float | None]]  # (series, value)


def _number(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return html.escape(str(value))


def _percent(value: object) -> str:
    return f"{value * 100:.1f}%" if isinstance(value, float) and math.isfinite(value) else "–"


def forest_svg(rows: Sequence[ForestRow], *, title: str, unit: str) -> str:
    """Point estimates with 95% intervals, one line each, and the zero line."""
    label_width, plot_width, row_height, top = 260, 600, 26, 34
    height = top + row_height * max(1, len(rows)) + 34
    values = [v for row in rows for v in (row.point, row.low, row.high) if v is not None]
    low, high = (min([*values, 0.0]), max([*values, 0.0])) if values else (-1.0, 1.0)
    if high - low < 1e-9:
        low, high = low - 1.0, high + 1.0
    pad = (high - low) * 0.08
    low, high = low - pad, high + pad

    def x(value: float) -> float:
        return label_width + (value - low) / (high - low) * plot_width

    width = label_width + plot_width + 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{label_width}" y="18" font-size="13" font-weight="600">{html.escape(title)}'
        "</text>",
        f'<line x1="{x(0):.1f}" y1="{top - 8}" x2="{x(0):.1f}" y2="{height - 30}" '
        'stroke="#999" stroke-dasharray="4 3"/>',
    ]
    for tick in _ticks(low, high):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{height - 12}" font-size="11" text-anchor="middle" '
            f'fill="#555">{_number(tick)}</text>'
        )
    parts.append(
        f'<text x="{label_width + plot_width}" y="{height - 12}" font-size="11" '
        f'text-anchor="end" fill="#555" dy="12">{html.escape(unit)}</text>'
    )
    for position, row in enumerate(rows):
        y = top + row_height * position + row_height / 2
        parts.append(
            f'<text x="{label_width - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end">'
            f"{html.escape(row.label)}</text>"
        )
        if row.low is not None and row.high is not None:
            parts.append(
                f'<line class="interval" x1="{x(row.low):.1f}" y1="{y:.1f}" '
                f'x2="{x(row.high):.1f}" y2="{y:.1f}" stroke="{row.color}" stroke-width="2"/>'
            )
        if row.point is not None:
            parts.append(
                f'<circle class="estimate" cx="{x(row.point):.1f}" cy="{y:.1f}" r="5" '
                f'fill="{row.color}"><title>{html.escape(row.label)}: {_number(row.point)} '
                f"[{_number(row.low)}, {_number(row.high)}]</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(
    groups: Sequence[BarGroup],
    *,
    title: str,
    formatter: Callable[[float], str] = _number,
) -> str:
    """Grouped vertical bars: one group per label, one bar per series."""
    series = list(dict.fromkeys(name for group in groups for name, _ in group.values))
    bar, gap, left, top, plot_height = 26, 22, 60, 34, 220
    legend = 40 + 7 * max((len(name) for name in series), default=0)
    width = max(
        left + max(1, len(groups)) * (len(series) * bar + gap) + legend,
        left + 8 * len(title),  # room for the title, whatever the number of bars
    )
    height = top + plot_height + 60
    values = [v for group in groups for _, v in group.values if v is not None]
    low, high = min([*values, 0.0]), max([*values, 0.0])
    if high - low < 1e-12:
        high = low + 1.0

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * plot_height

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{left}" y="18" font-size="13" font-weight="600">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - legend}" y2="{y(0):.1f}" stroke="#999"/>',
    ]
    for tick in _ticks(low, high):
        parts.append(
            f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end" '
            f'fill="#555">{formatter(tick)}</text>'
        )
    for index, group in enumerate(groups):
        x0 = left + gap / 2 + index * (len(series) * bar + gap)
        for name, value in group.values:
            if value is None:
                continue
            position = series.index(name)
            top_y, bottom_y = sorted((y(value), y(0)))
            parts.append(
                f'<rect class="bar" x="{x0 + position * bar:.1f}" y="{top_y:.1f}" '
                f'width="{bar - 3}" height="{max(bottom_y - top_y, 0.5):.1f}" '
                f'fill="{_PALETTE[position % len(_PALETTE)]}"><title>{html.escape(group.label)}, '
                f"{html.escape(name)}: {formatter(value)}</title></rect>"
            )
        parts.append(
            f'<text x="{x0 + len(series) * bar / 2:.1f}" y="{top + plot_height + 18}" '
            f'font-size="12" text-anchor="middle">{html.escape(group.label)}</text>'
        )
    for position, name in enumerate(series):
        legend_y = top + 14 + position * 18
        parts.append(
            f'<rect x="{width - legend + 10}" y="{legend_y - 10}" width="12" height="12" '
            f'fill="{_PALETTE[position % len(_PALETTE)]}"/>'
            f'<text x="{width - legend + 28}" y="{legend_y}" font-size="12">'
            f"{html.escape(name)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = high - low
    if span <= 0 or not math.isfinite(span):
        return [low]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + 1e-12:
        ticks.append(round(value, 10))
        value += step
    return ticks


def figure(svg: str, *, name: str, caption: str) -> str:
    return (
        f'<figure class="chart" data-chart="{html.escape(name)}">{svg}'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        "</table></div>"
    )


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def _row(report: RoiReport, arm: str, channel: str = ALL, category: str = ALL) -> dict[str, object]:
    for row in report.rows:
        if (row["arm"], row["channel"], row["category"]) == (arm, channel, category):
            return row
    return {}


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def report_html(report: RoiReport, *, currency: str, generated_at: datetime | None = None) -> str:
    experiment = report.experiment
    generated = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    start, end = report.period
    treatments = [arm for arm in experiment.arms if arm.name != report.control]
    channels = sorted({str(row["channel"]) for row in report.rows if row["channel"] != ALL})
    categories = [
        str(row["category"])
        for row in report.rows
        if row["arm"] == report.control and row["channel"] == ALL and row["category"] != ALL
    ]

    cards = []
    for arm in treatments:
        row = _row(report, arm.name)
        point = _float(row.get("incremental_margin_per_order"))
        significant = row.get("significant")
        underpowered = row.get("underpowered")
        if not significant:
            verdict = '<span class="flag">no significant effect</span>'
        elif point is not None and point > 0:
            verdict = '<span class="flag good">significant gain</span>'
        else:
            verdict = '<span class="flag bad">significant loss</span>'
        if underpowered:
            verdict += ' · <span class="flag warn">underpowered</span> for the target effect'
        orders = row.get("orders")
        total = point * orders if point is not None and isinstance(orders, int) else None
        cards.append(
            f'<div class="card"><div>{html.escape(arm.name)} vs {html.escape(report.control)}: '
            f"incremental gross margin per order</div>"
            f'<div class="value">{_number(point)} {html.escape(currency)}</div>'
            f"<div>95% interval [{_number(row.get('incremental_margin_per_order_low'))}, "
            f"{_number(row.get('incremental_margin_per_order_high'))}] · {verdict}</div>"
            f"<div>minimum detectable effect {_number(row.get('mde_margin_per_order'))} "
            f"(target {_number(row.get('target_effect'))}) · "
            f"{_number(orders)} orders, about {_number(total, 0)} {html.escape(currency)} in all"
            f"</div>"
            f"<div>after system cost: "
            f"{_number(row.get('incremental_margin_after_system_cost'))}</div></div>"
        )

    forest_rows = []
    for index, arm in enumerate(treatments):
        color = _PALETTE[(index + 1) % len(_PALETTE)]
        for channel in [ALL, *channels]:
            row = _row(report, arm.name, channel)
            if row:
                forest_rows.append(
                    ForestRow(
                        label=f"{arm.name} · {channel}",
                        point=_float(row.get("incremental_margin_per_order")),
                        low=_float(row.get("incremental_margin_per_order_low")),
                        high=_float(row.get("incremental_margin_per_order_high")),
                        color=color,
                    )
                )
    category_rows = []
    for index, arm in enumerate(treatments):
        color = _PALETTE[(index + 1) % len(_PALETTE)]
        for category in categories:
            row = _row(report, arm.name, ALL, category)
            if row:
                category_rows.append(
                    ForestRow(
                        label=f"{arm.name} · {category}"[:40],
                        point=_float(row.get("incremental_margin_per_order")),
                        low=_float(row.get("incremental_margin_per_order_low")),
                        high=_float(row.get("incremental_margin_per_order_high")),
                        color=color,
                    )
                )
    arm_names = [arm.name for arm in experiment.arms]
    margin_groups = [
        BarGroup(
            label=channel,
            values=[
                (arm, _float(_row(report, arm, channel).get("margin_per_order")))
                for arm in arm_names
            ],
        )
        for channel in [ALL, *channels]
    ]
    attach_groups = [
        BarGroup(
            label=arm,
            values=[
                ("attached", _float(_row(report, arm).get("attachment_rate"))),
                (
                    "would have bought anyway",
                    _float(_row(report, arm).get("would_have_bought_rate")),
                ),
                ("split shipment", _float(_row(report, arm).get("split_shipment_rate"))),
            ],
        )
        for arm in arm_names
    ]

    def percent_tick(value: float) -> str:
        return f"{value * 100:.0f}%"

    detail = table(
        (
            [
                html.escape(str(row["arm"])),
                html.escape(str(row["channel"])),
                html.escape(str(row["category"])),
                _number(row["units"]),
                _number(row["orders"]),
                _percent(row["attachment_rate"]),
                _percent(row["would_have_bought_rate"]),
                _number(row["aov"]),
                _number(row["units_per_order"]),
                _number(row["margin_per_order"]),
                _percent(row["return_rate"]),
                _percent(row["split_shipment_rate"]),
                _interval(row, "incremental_net_revenue_per_order"),
                _interval(row, "incremental_margin_per_order"),
                _interval(row, "incremental_return_rate", percent=True),
                _number(row.get("mde_margin_per_order")),
                _number(row.get("underpowered")),
                _number(row.get("system_cost_per_order"), 4),
            ]
            for row in report.rows
        ),
        (
            "arm",
            "channel",
            "category",
            "units",
            "orders",
            "attach",
            "would have bought",
            "AOV",
            "units/order",
            "margin/order",
            "return rate",
            "split ship.",
            "Δ net revenue/order [95%]",
            "Δ margin/order [95%]",
            "Δ return rate [95%]",
            "MDE",
            "underpowered",
            "system cost/order",
        ),
    )
    arms_table = table(
        (
            [
                html.escape(arm.arm) + (" (control)" if arm.arm == report.control else ""),
                html.escape(arm.strategy),
                f"{arm.share:.0%}",
                _number(arm.units),
                _number(arm.exposures),
                _number(arm.items_shown),
            ]
            for arm in report.arms
        ),
        ("arm", "strategy", "share", "units", "exposures", "items shown"),
    )
    notes = [
        *report.notes,
        f"System cost: {report.system_cost_source}.",
        f"Intervals: {report.replicates:,} bootstrap resamples of units (customers, or sessions "
        f"for guests), seed {report.seed}; 95% percentile intervals of arm minus control.",
        "Minimum detectable effect: (1.96 + 0.84) x the bootstrap standard error of the "
        "difference (alpha 0.05 two-sided, power 0.8). Underpowered: it exceeds the target.",
        "Margin = (price paid - unit cost) x units kept - return handling per returned unit - "
        "the fulfilment cost of each extra shipment an attached item caused (once per node and "
        "order). Revenue per order (AOV) is gross; the incremental revenue is net of refunds.",
        "Attached: bought within the attribution window after it was shown to the same "
        "customer (or session) in this experiment. Would have bought anyway: the same, for "
        "items a holdout arm withheld: the part of 'influenced revenue' that is not incremental.",
    ]
    body = (
        f"<h1>ROI report: {html.escape(experiment.name)}</h1>"
        f'<p class="meta">{_period(start, end)} · attribution window '
        f"{report.window.total_seconds() / 3600:g} h · control arm "
        f"<b>{html.escape(report.control)}</b> · currency {html.escape(currency)} · generated "
        f"{generated}</p>"
        f'<div class="cards">{"".join(cards)}</div>'
        "<h2>Incremental gross margin per order</h2>"
        + figure(
            forest_svg(
                forest_rows,
                title="Incremental gross margin per order vs control, 95% interval",
                unit=currency,
            ),
            name="incremental-margin",
            caption="Net of returns and incremental fulfilment cost. An interval crossing the "
            "dashed zero line is no evidence of an effect.",
        )
        + figure(
            bars_svg(margin_groups, title=f"Gross margin per order ({currency}), by channel"),
            name="margin-per-order",
            caption="Every triggered order, by the channel of the exposure that triggered it.",
        )
        + figure(
            bars_svg(attach_groups, title="Share of orders", formatter=percent_tick),
            name="attachment",
            caption="Attached items vs items a holdout withheld and the customer bought anyway.",
        )
        + (
            figure(
                forest_svg(
                    category_rows,
                    title="Incremental gross margin per order, by category",
                    unit=currency,
                ),
                name="by-category",
                caption="Categories with the most revenue; each is per triggered order.",
            )
            if category_rows
            else ""
        )
        + "<h2>Arms</h2>"
        + arms_table
        + "<h2>Every arm, channel and category</h2>"
        + detail
        + '<h2>Notes and assumptions</h2><ul class="notes">'
        + "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        + "</ul>"
    )
    return page(f"ROI report: {experiment.name}", body)


def _interval(row: dict[str, object], name: str, *, percent: bool = False) -> str:
    show = _percent if percent else _number
    point = row.get(name)
    if point is None:
        return "–"
    return f"{show(point)} [{show(row.get(name + '_low'))}, {show(row.get(name + '_high'))}]"


def _period(start: datetime | None, end: datetime | None) -> str:
    if start is None:
        return "no exposures yet"
    return f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M}" if end else f"from {start:%Y-%m-%d}"


def report_csv(report: RoiReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in report.rows:
        writer.writerow(
            {name: "" if row.get(name) is None else row.get(name) for name in CSV_COLUMNS}
        )
    return buffer.getvalue()


def write_report(report: RoiReport, out_dir: Path, *, currency: str) -> list[Path]:
    """``roi_<experiment>.html`` and ``.csv`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path = out_dir / f"roi_{report.experiment.name}.html"
    csv_path = out_dir / f"roi_{report.experiment.name}.csv"
    html_path.write_text(report_html(report, currency=currency), "utf-8")
    csv_path.write_text(report_csv(report), "utf-8")
    return [html_path, csv_path]
