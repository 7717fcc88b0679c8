"""Fill FINDINGS.template.md from three combined reports (a one-off for #7, deleted once the final FINDINGS.md is in).

Usage: python fill_findings.py ALL_DIR FAM23_DIR FAM26_DIR TEMPLATE OUT"""

import re
import sys
from pathlib import Path

all_d, d23, d26, tmpl, out = sys.argv[1:6]


def md(d: str) -> str:
    return Path(d, "results.md").read_text()


def table_after(text: str, heading: str, nth: int = 0) -> list[list[str]]:
    """Rows (list of cells) of the nth markdown table after a line containing heading."""
    lines = text.splitlines()
    idx = [i for i, line in enumerate(lines) if heading in line][nth]
    rows = []
    started = False
    for line in lines[idx + 1 :]:
        if line.startswith("|"):
            started = True
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif started:
            break
    return rows[2:]  # drop header + rule


def claims(text: str, which: str) -> list[list[str]]:
    heading = "## The paper's claims, checked (Kill)" if which == "kill" else "Skip-Next:"
    return table_after(text, heading)


A, F23, F26 = md(all_d), md(d23), md(d26)


def ratios(text: str, which: str) -> list[str]:
    return [r[3] for r in claims(text, which)]


def comp(text: str) -> list[str]:
    return [f"{r[5]} vs {r[6]}" for r in claims(text, "kill")]


levels = [r[0].split(":")[0] for r in claims(A, "kill")]
lines = [
    "Kill, TimeBill's average score / the best fixed α's at each budget level, with the paired bootstrap 90 % "
    "interval over tasks (the report's claims table); target ≥ 1.10 at every level:",
    "",
    "| tasks | " + " | ".join(levels) + " |",
    "|---|" + "---|" * len(levels),
]
for name, t in (("all 160 (both machines)", A), ("parts 0-2 (family 23)", F23), ("parts 3-15 (family 26)", F26)):
    lines.append(f"| {name} | " + " | ".join(ratios(t, "kill")) + " |")
lines += [
    "",
    "Best fixed α at each level (all 160): "
    + ", ".join(f"{r[0].split(':')[0]} {r[2]}" for r in claims(A, "kill"))
    + ".",
    "",
    "Completion, TimeBill vs fixed α = 0.95 (all 160, Kill): "
    + ", ".join(f"{lv} {c}" for lv, c in zip(levels, comp(A), strict=False))
    + ".",
    "",
    "Skip-Next (no interval: a stream's jobs are not independent), all 160: "
    + ", ".join(f"{lv} {r}" for lv, r in zip(levels, ratios(A, "skip"), strict=False))
    + ".",
]
s = Path(tmpl).read_text().replace("PLACEHOLDER-CLAIMS", "\n".join(lines))


def grab(pattern: str, text: str = A) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else "??"


vals = {}
vals["PLANNED"] = grab(r"How `timebill` planned \((\d+) planned runs")
vals["A0"] = grab(r"α chosen: 0 in (\d+ %)")
vals["ACAP"] = grab(r"the cap 0.95 in (\d+ %)")
m = re.search(
    r"prefill ([\d.]+) \(median\), ([\d.]+) \(p90\); "
    r"end to end at the generated length ([\d.]+) \(median\), ([\d.]+) \(p90\)",
    A,
)
vals["PRE_MED"], vals["PRE_P90"], vals["E2E_MED"], vals["E2E_P90"] = m.groups() if m else ("??",) * 4
cost26 = {r[0]: r for r in table_after(F26, "Decode cost per method")}
vals["STEP95"], vals["STEP75"] = cost26["snapkv-0.95"][5], cost26["snapkv-0.75"][5]
hard = table_after(A, "What makes a budget hard")
vals["REFUSED20"] = hard[0][3]
vals["OVERRUN95_20"] = hard[0][2]
san = {r[0]: r for r in table_after(A, "## Sanity: vanilla")}
vals["CHAT_NMAX"] = san["chat"][6]
vals["CODE_SAN"] = san["code"][2]
outc = {r[0]: r for r in table_after(A, "How `timebill`'s jobs ended")}
vals["CHAT_CAP"], vals["CHAT_GUARD"] = outc["chat"][8], outc["chat"][6]
vals["CHAT_TB_OK"], vals["CHAT_VAN_OK"] = outc["chat"][3], outc["chat"][2]


def kind_table(kind: str) -> dict[str, list[str]]:
    return {r[0]: r for r in table_after(A, f"**{kind}**")}


kill = {r[0]: r for r in table_after(A, "## Average score (completion rate) — kill")}
vals["V75_ALL"] = kill["snapkv-0.75"][-1].split()[0]
vals["VAN_ALL"] = kill["vanilla"][-1].split()[0]
code, ret = kind_table("code"), kind_table("retrieval")
vals["CODE75"], vals["CODEVAN"] = code["snapkv-0.75"][-1], code["vanilla"][-1]
vals["RET95"], vals["RETVAN"] = ret["snapkv-0.95"][-1], ret["vanilla"][-1]
kinds_n = {m.group(1): int(m.group(2)) for m in re.finditer(r"\*\*(\w+)\*\* \((\d+) tasks?\)", A)}
best_loose = claims(A, "kill")[-1][2].split()[0]
gaps = {k: kinds_n[k] * (float(kind_table(k)[best_loose][-1]) - float(kind_table(k)["timebill"][-1])) for k in kinds_n}
total = sum(gaps.values())
n_all = sum(kinds_n.values())
vals["GAP_TOTAL"] = f"{total / n_all:.1f}"
for k, key in (("code", "GAP_CODE"), ("chat", "GAP_CHAT"), ("retrieval", "GAP_RET")):
    vals[key] = f"{gaps[k] / n_all:.1f}"
vals["STEP95_OFF"] = f"{100 * (1 - float(vals['STEP95'].rstrip('×'))):.0f} %"
kill26 = {r[0]: r for r in table_after(F26, "## Average score (completion rate) — kill")}
vals["INT4_26_ROW"] = ", ".join(c.split()[0] for c in kill26["int4"][1:])
vals["BEST_26_ROW"] = ", ".join(r[2].split()[1].strip("()") for r in claims(F26, "kill"))
vals["SKIP_RATIOS"] = ", ".join(ratios(A, "skip"))


def scores(name: str, t: dict[str, list[str]] = kill) -> list[str]:
    return [c.split()[0] for c in t[name][1:]]


tb = scores("timebill")
vals["VS95"] = ", ".join(
    f"{float(a) / float(b):.1f}" if float(b) else "∞" for a, b in zip(tb, scores("snapkv-0.95"), strict=True)
)
cl = claims(A, "kill")
vals["COMP_WORDS"] = ", ".join(f"{r[5]} vs {r[6]}" for r in cl)
vals["CONF_ROW"] = ", ".join(scores("timebill-conformal"))
vals["REPLAN_ROW"] = ", ".join(scores("timebill-replan"))
vals["TB_ROW"] = ", ".join(tb)
vals["INT4_ROW"] = ", ".join(scores("int4"))
vals["BEST_ROW"] = ", ".join(r[2].split()[1].strip("()") for r in cl)
cost23 = {r[0]: r for r in table_after(F23, "Decode cost per method")}
vals["INT8_23"], vals["INT8_26"] = cost23["int8"][5], cost26["int8"][5]
vals["INT4_23"], vals["INT4_26"] = cost23["int4"][5], cost26["int4"][5]
for k, v in vals.items():
    s = s.replace("{" + k + "}", v)
Path(out).write_text(s)
left = re.findall(r"\{[A-Z0-9_]+\}|PLACEHOLDER-\w+", s)
print("unfilled:", left)
print(vals)
