"""The lab's results: ``claims.json`` (a verdict per claim, with its rule, evidence and
settings), a PNG per claim, and ``report.html``: one self-contained page (the pictures
embedded) that opens offline, the claims table first, then a section per claim."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from .claims import CLAIMS, UNSURE


def settings(records: list[dict]) -> dict[str, list]:
    """Every config field of a claim's runs with the values it took (the key aside)."""
    values: dict[str, set] = {}
    for r in records:
        for k, v in r["config"].items():
            if k not in ("key", "exclusive"):
                values.setdefault(k, set()).add(json.dumps(v))
    return {k: [json.loads(v) for v in sorted(vs, key=lambda s: (len(s), s))] for k, vs in sorted(values.items())}


def verdicts(records: dict[int, list[dict]]) -> list[dict]:
    """One entry per claim: ``{"id", "claim", "verdict", "evidence", "rule", "runs",
    "settings"}``; inconclusive where no run of the claim is recorded."""
    out = []
    for i, mine in records.items():
        claim = CLAIMS[i]
        verdict, evidence = claim.verdict(mine) if mine else (UNSURE, {"recorded runs": 0})
        out.append({"id": i, "claim": claim.title, "verdict": verdict, "evidence": evidence, "rule": claim.rule,
                    "runs": len(mine), "settings": settings(mine)})
    return out


def _picture(claim_id: int, records: list[dict], directory: Path) -> bytes | None:
    claim = CLAIMS[claim_id]
    if claim.plot is None or not records:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(7.5, 3.6), layout="constrained")
    try:
        claim.plot(records, fig)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
    finally:
        plt.close(fig)
    (directory / f"claim{claim_id}.png").write_bytes(png.getvalue())
    return png.getvalue()


def _cell(value, nested: bool = False) -> str:
    """A value as table text: a dict a line per key (its inner dicts on one line)."""
    if isinstance(value, dict):
        return ("; " if nested else "<br>").join(f"{html.escape(str(k))}: {_cell(v, True)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value)) if value else "none"
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def _table(rows: dict) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"
                               for k, v in rows.items()) + "</table>"


def _verdict(v: str) -> str:
    return f'<span class="verdict {v.replace(" ", "-")}">{html.escape(v)}</span>'


def write(directory: str | Path, records: dict[int, list[dict]], header: str, seconds: float = 0.0) -> list[dict]:
    """Write ``claims.json``, the PNGs and ``report.html`` into ``directory`` from each
    claim's records; returns what ``claims.json`` holds."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results = verdicts(records)
    (directory / "claims.json").write_text(json.dumps(results, indent=2, default=str))
    unique = {r["key"]: r for mine in records.values() for r in mine}  # claims share runs
    run_time = sum(r.get("seconds", 0.0) for r in unique.values())
    rows, sections = [], []
    for result in results:
        i = result["id"]
        rows.append(f'<tr><td><a href="#claim{i}">{i}</a></td><td>{html.escape(result["claim"])}</td>'
                    f'<td>{_verdict(result["verdict"])}</td><td>{result["runs"]}</td></tr>')
        png = _picture(i, records[i], directory)
        image = (f'<img alt="claim {i}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                 if png else "")
        sections.append(
            f'<section id="claim{i}"><h2>Claim {i}: {html.escape(result["claim"])}</h2>'
            f'<p>Verdict: {_verdict(result["verdict"])} from {result["runs"]} runs.</p>{image}'
            f'<h3>Evidence</h3>{_table(result["evidence"])}'
            f'<h3>Rule</h3><p class="rule">{html.escape(result["rule"])}</p>'
            f'<h3>Settings</h3>{_table(result["settings"])}</section>')
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>addnorm lab report</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:62em;margin:2em auto;padding:0 1em;line-height:1.4}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border-top:1px solid #ddd;padding:.25em .6em;"
        "vertical-align:top;text-align:left;font-size:.9em}th{font-weight:600;max-width:22em}"
        ".verdict{font-weight:700}.holds{color:#070}.does-not-hold{color:#b00}.inconclusive{color:#a60}"
        "img{max-width:100%;display:block;margin:.5em 0}.rule{font-size:.9em;color:#333}"
        "section{border-top:2px solid #ccc;margin-top:2em}"
        "</style></head><body><h1>addnorm lab: the seed articles' claims, measured</h1>"
        f"<p>{html.escape(header)}; {run_time / 60:.1f} min of run time recorded (summed over workers); "
        f"this invocation took {seconds:.0f} s.</p>"
        "<table id='claims'><tr><th>#</th><th>claim</th><th>verdict</th><th>runs</th></tr>"
        f"{''.join(rows)}</table>{''.join(sections)}</body></html>"
    )
    (directory / "report.html").write_text(page)
    return results


__all__ = ["write", "verdicts", "settings"]
