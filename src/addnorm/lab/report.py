"""The lab's results: ``claims.json`` (a verdict per claim, its rule and evidence) and
``report.html`` (the same, with each claim's picture), written from ``runs.jsonl``."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .claims import CLAIMS, Claim


def verdicts(claims: list[Claim], records: list[dict]) -> list[dict]:
    out = []
    for claim in claims:
        mine = [r for r in records if r["claim"] == claim.id]
        verdict, evidence = claim.verdict(mine) if mine else ("inconclusive", {"runs": 0})
        out.append({"id": claim.id, "title": claim.title, "verdict": verdict, "rule": claim.rule,
                    "evidence": evidence, "runs": len(mine)})
    return out


def _picture(claim: Claim, records: list[dict], directory: Path) -> str | None:
    if claim.plot is None or not records:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
    claim.plot(records, ax)
    name = f"claim{claim.id}.png"
    fig.savefig(directory / name, dpi=120)
    plt.close(fig)
    return name


def write(directory: str | Path, claims: list[Claim], records: list[dict], header: str) -> list[dict]:
    directory = Path(directory)
    results = verdicts(claims, records)
    (directory / "claims.json").write_text(json.dumps(results, indent=2, default=str))
    sections = []
    for claim, result in zip(claims, results):
        picture = _picture(claim, [r for r in records if r["claim"] == claim.id], directory)
        evidence = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v, default=str))}</td></tr>"
                           for k, v in result["evidence"].items())
        sections.append(
            f'<section id="claim{claim.id}"><h2>Claim {claim.id}: {html.escape(claim.title)}</h2>'
            f'<p class="verdict {result["verdict"].replace(" ", "-")}">Verdict: <b>{result["verdict"]}</b> '
            f'({result["runs"]} runs)</p><p class="rule">Rule: {html.escape(claim.rule)}</p>'
            f"<table>{evidence}</table>"
            + (f'<img src="{picture}" alt="claim {claim.id}">' if picture else "")
            + "</section>"
        )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>addnorm lab</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "td{border-top:1px solid #ddd;padding:.2em .6em;vertical-align:top;font-size:.9em}"
        ".holds{color:#070}.does-not-hold{color:#a00}.inconclusive{color:#a60}img{max-width:100%}"
        f"</style></head><body><h1>addnorm lab</h1><p>{html.escape(header)}</p>{''.join(sections)}</body></html>"
    )
    (directory / "report.html").write_text(page)
    return results


__all__ = ["write", "verdicts", "CLAIMS"]
