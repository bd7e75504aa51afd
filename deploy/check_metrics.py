#!/usr/bin/env python3
"""Checks deploy/ against the code and docs/OPERATIONS.md (stdlib only; run by deploy/check).

1. Every series named in deploy/prometheus/alerts.yml (rule expressions, and any
   ingress_*/sequencer_* word anywhere in the file) and in deploy/grafana/*.json (panel targets
   and template variable queries) is one the Rust code exports: a string literal of
   ingress/src or sequencer/src (test modules left out). `_sum` and `_count` are accepted on
   any exported name; `_bucket` only on a histogram the code gives buckets
   (set_buckets_for_metric), because the others are exported as summaries and have no
   buckets; a `quantile` label only on those summaries.
2. Every label named in a selector or in by/without/on/ignoring is one the code sets, or one
   Prometheus adds (job, instance, le, quantile).
3. Every alert of docs/OPERATIONS.md, "Alerts worth setting", has a rule named "Flash" + its
   name in CamelCase ("two writers claim" -> FlashTwoWritersClaim), every rule is such an
   alert, and the series the doc's conditions name are exported too.
4. Every rule has summary, description and a runbook annotation
   "docs/OPERATIONS.md#runbooks: Name; Name", each Name the start of a runbook's bold title.

Exits 1 with one line per problem, naming the file and the series, label or alert.

With `--dashboard-rules FILE` it also writes every dashboard expression, Grafana's variables
replaced ($__rate_interval by 1m, the others by .*), as a recording rule into FILE, for
`promtool check rules` to parse (deploy/check does).
"""

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy/grafana").glob("*.json"))
OPERATIONS = ROOT / "docs/OPERATIONS.md"
SOURCES = [ROOT / "ingress/src", ROOT / "sequencer/src"]

# Series Prometheus makes itself, not the code.
PROMETHEUS_SERIES = {
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added", "ALERTS", "ALERTS_FOR_STATE",
}
PROMETHEUS_LABELS = {"job", "instance", "le", "quantile", "__name__"}

AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"} | LABEL_LIST_KEYWORDS

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def rel(path):
    return path.relative_to(ROOT)


# --- what the code exports --------------------------------------------------------------------

def rust_sources():
    for base in SOURCES:
        for path in sorted(base.rglob("*.rs")):
            text = path.read_text()
            cut = re.search(r"^\s*#\[cfg\(test\)\]\s*\n\s*mod ", text, re.M)
            yield path, text[: cut.start()] if cut else text


def matching_paren(text, open_at):
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text)


def exported():
    names, bucketed, labels = set(), set(), set()
    for path, text in rust_sources():
        consts = dict(re.findall(r'const\s+(\w+)\s*:\s*&str\s*=\s*"([^"]*)"', text))
        names.update(re.findall(r'"((?:ingress|sequencer)_[a-z0-9_]+)"', text))
        for arg in re.findall(r"set_buckets_for_metric\(\s*Matcher::Full\(\s*([^)]*?)\s*(?:\.into\(\))?\)", text):
            arg = arg.strip()
            if arg.startswith('"'):
                bucketed.add(arg.strip('"'))
            elif arg in consts:
                bucketed.add(consts[arg])
        labels.update(re.findall(r'Label::new\(\s*"(\w+)"', text))
        for m in re.finditer(r"\b(?:counter|gauge|histogram)!\(", text):
            call = text[m.end() - 1 : matching_paren(text, m.end() - 1) + 1]
            labels.update(re.findall(r'"(\w+)"\s*=>', call))
    return names, bucketed, labels


# --- PromQL ----------------------------------------------------------------------------------

GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|[0-9.]+(?:[eE][+-]?[0-9]+)?)[a-zA-Z0-9]*")


def promql_refs(expr):
    """(series, label names) an expression refers to: series as [(name, {labels in its selector})]."""
    s = GRAFANA_VAR.sub("1", expr)
    series, labels = [], set()
    i, n = 0, len(s)

    def skip_space(j):
        while j < n and s[j].isspace():
            j += 1
        return j

    def skip_string(j):
        quote = s[j]
        j += 1
        while j < n and s[j] != quote:
            j += 2 if s[j] == "\\" and quote != "`" else 1
        return j + 1

    def read_selector(j):
        """s[j] is '{': returns (label names, index after '}')."""
        names = set()
        j += 1
        while j < n and s[j] != "}":
            if s[j] in "\"'`":
                j = skip_string(j)
                continue
            m = IDENT.match(s, j)
            if m:
                names.add(m.group())
                j = m.end()
                continue
            j += 1
        return names, j + 1

    while i < n:
        c = s[i]
        if c.isspace():
            i += 1
        elif c == "#":
            while i < n and s[i] != "\n":
                i += 1
        elif c in "\"'`":
            i = skip_string(i)
        elif c == "[":
            while i < n and s[i] != "]":
                i += 1
            i += 1
        elif c == "{":
            names, i = read_selector(i)
            labels |= names
        elif c.isdigit() or (c == "." and i + 1 < n and s[i + 1].isdigit()):
            i = NUMBER.match(s, i).end()
        elif IDENT.match(s, i):
            word = IDENT.match(s, i).group()
            i += len(word)
            j = skip_space(i)
            low = word.lower()
            if low in LABEL_LIST_KEYWORDS:
                if j < n and s[j] == "(":
                    end = matching_paren(s, j)
                    labels |= set(IDENT.findall(s[j + 1 : end]))
                    i = end + 1
            elif low == "offset":
                m = re.compile(r"-?\s*[0-9a-zA-Z]+").match(s, j)
                i = m.end() if m else j
            elif low in KEYWORDS or low in AGGREGATORS:
                pass
            elif j < n and s[j] == "(":
                pass  # a function
            else:
                sel = set()
                if j < n and s[j] == "{":
                    sel, i = read_selector(j)
                    labels |= sel
                series.append((word, sel))
        else:
            i += 1
    return series, labels


def check_expr(where, expr, names, bucketed, labels_known):
    series, labels = promql_refs(expr)
    for name, sel in series:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in PROMETHEUS_SERIES:
            continue
        if name not in names and base not in names:
            problem(where, f"series {name!r} is not exported by the code (no string literal "
                           f"\"{base}\" in ingress/src or sequencer/src)")
        elif name not in names and name.endswith("_bucket") and base not in bucketed:
            problem(where, f"series {name!r}: {base} has no buckets (no set_buckets_for_metric), "
                           "it is exported as a summary with quantile labels")
        if "quantile" in sel and base in bucketed:
            problem(where, f"series {name!r} has buckets, not quantile labels: use histogram_quantile")
    for label in sorted(labels - labels_known):
        problem(where, f"label {label!r} is set by no metric of the code")
    return series


# --- alerts.yml (the few YAML forms a rules file uses; no YAML library in the stdlib) --------

def yaml_values(text, key):
    """Values of every `key:` (also `- key:`): plain, quoted, or a block scalar, with the
    continuation lines more indented than the key."""
    lines = text.split("\n")
    out = []
    for k, line in enumerate(lines):
        m = re.match(r"^(\s*(?:-\s+)?)" + re.escape(key) + r":(?:\s+(.*))?$", line)
        if not m:
            continue
        indent = len(m.group(1))
        first = (m.group(2) or "").strip()
        block = re.match(r"^[>|][+-]?\d*$", first)
        parts = [] if block else [first]
        for nxt in lines[k + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            if nxt.strip().startswith("#") and not block:
                continue
            parts.append(nxt.strip())
        value = " ".join(p for p in parts if p).strip()
        if not block and len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out.append((k + 1, value))
    return out


def camel(name):
    return "Flash" + "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", name) if w)


def operations_alerts(doc):
    m = re.search(r"^## Alerts worth setting\n(.*?)(?=^## )", doc, re.M | re.S)
    if not m:
        problem(rel(OPERATIONS), 'no "## Alerts worth setting" section')
        return []
    rows = []
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] not in ("alert", "") \
                and not set(cells[0]) <= set("-: "):
            rows.append((cells[0], cells[1]))
    return rows


def runbook_titles(doc):
    m = re.search(r"^## Runbooks\n(.*)", doc, re.M | re.S)
    return [" ".join(t.split()) for t in re.findall(r"^\*\*([^*]+)\*\*", m.group(1), re.M)] if m else []


def write_dashboard_rules(path, exprs):
    lines = ["# Written by deploy/check_metrics.py: the dashboards' expressions, for promtool to parse.",
             "groups:", "  - name: dashboard-expressions", "    rules:"]
    for n, (what, expr) in enumerate(exprs, 1):
        expr = re.sub(r"\$__\w+|\$\{__\w+\}", "1m", expr)
        expr = re.sub(r"\$\{\w+\}|\$\w+|\[\[\w+\]\]", ".*", expr)
        name = re.sub(r"[^A-Za-z0-9_]+", "_", what.split(", ", 1)[-1]).strip("_")
        lines += [f"      # {what}", f"      - record: dashboard:{n}:{name}", f"        expr: {json.dumps(expr)}"]
    path.write_text("\n".join(lines) + "\n")


def main():
    names, bucketed, code_labels = exported()
    if len(names) < 10:
        problem("ingress/src, sequencer/src", f"found only {len(names)} metric names: is this the repository root?")
    labels_known = code_labels | PROMETHEUS_LABELS
    doc = OPERATIONS.read_text()

    # Alert rules.
    text = ALERTS.read_text()
    where = rel(ALERTS)
    for line, expr in yaml_values(text, "expr"):
        check_expr(f"{where}:{line}", expr, names, bucketed, labels_known)
    # Belt and braces: any ingress_*/sequencer_* word anywhere in the file (comments, annotations).
    reported = {m for m in re.findall(r"series '([^']+)'", " ".join(problems))}
    for k, line in enumerate(text.split("\n"), 1):
        for word in re.findall(r"\b(?:ingress|sequencer)_[a-z0-9_]+\b", line):
            base = re.sub(r"_(bucket|sum|count)$", "", word)
            if word not in names and base not in names and word not in reported:
                problem(f"{where}:{k}", f"series {word!r} is not exported by the code")
    titles = runbook_titles(doc)
    rules = yaml_values(text, "alert")
    rule_names = [name for _, name in rules]
    starts = [line for line, _ in rules] + [len(text.split("\n")) + 1]
    for idx, (line, name) in enumerate(rules):
        body = "\n".join(text.split("\n")[line - 1 : starts[idx + 1] - 1])
        for key in ("summary", "description", "runbook"):
            if not [v for _, v in yaml_values(body, key) if v]:
                problem(f"{where}:{line}", f"alert {name} has no {key} annotation")
        for _, runbook in yaml_values(body, "runbook"):
            m = re.match(r"^docs/OPERATIONS\.md#runbooks: (.+)$", runbook)
            if not m:
                problem(f"{where}:{line}", f"alert {name}: runbook {runbook!r} is not "
                                           '"docs/OPERATIONS.md#runbooks: Name; Name"')
                continue
            for title in (t.strip() for t in m.group(1).split(";")):
                if not any(t == title or t.startswith((title + ".", title + " (")) for t in titles):
                    problem(f"{where}:{line}", f"alert {name}: no runbook titled {title!r} in {rel(OPERATIONS)}")

    # Every alert of the doc has its rule, and the doc's conditions name exported series.
    wanted = {}
    for alert, condition in operations_alerts(doc):
        wanted[camel(alert)] = alert
        for word in re.findall(r"\b(?:ingress|sequencer)_[a-z0-9_]+\b", condition):
            base = re.sub(r"_(bucket|sum|count)$", "", word)
            if word not in names and base not in names:
                problem(rel(OPERATIONS), f'alert "{alert}" names series {word!r}, which the code does not export')
    if not wanted:
        problem(rel(OPERATIONS), 'no alerts found in "Alerts worth setting"')
    for rule, alert in wanted.items():
        if rule not in rule_names:
            problem(where, f'no rule {rule} for the alert "{alert}" of {rel(OPERATIONS)}')
    for rule in rule_names:
        if rule not in wanted:
            problem(where, f"rule {rule} is no alert of {rel(OPERATIONS)}, \"Alerts worth setting\"")
    for rule in {r for r in rule_names if rule_names.count(r) > 1}:
        problem(where, f"rule {rule} is defined more than once")

    # Dashboards.
    dashboard_exprs = []
    if not DASHBOARDS:
        problem("deploy/grafana", "no dashboard JSON")
    for path in DASHBOARDS:
        where = rel(path)
        try:
            dash = json.loads(path.read_text())
        except ValueError as e:
            problem(where, f"not JSON: {e}")
            continue
        exprs = []

        def walk(node, title):
            if isinstance(node, dict):
                title = node.get("title", title)
                for t in node.get("targets", []) or []:
                    if isinstance(t, dict) and t.get("expr"):
                        exprs.append((f"panel {title!r}", t["expr"]))
                for v in node.values():
                    walk(v, title)
            elif isinstance(node, list):
                for v in node:
                    walk(v, title)

        walk(dash.get("panels", []), None)
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            q = var.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            m = re.match(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$", q, re.S)
            if m:
                exprs.append((f"variable {var.get('name')!r}", m.group(1)))
                if m.group(2) not in labels_known:
                    problem(where, f"variable {var.get('name')!r}: label {m.group(2)!r} is set by no metric of the code")
            elif q:
                exprs.append((f"variable {var.get('name')!r}", re.sub(r"^\s*query_result\((.*)\)\s*$", r"\1", q, flags=re.S)))
        if not exprs:
            problem(where, "no panel targets found")
        dashboard_exprs += [(f"{where}, {what}", expr) for what, expr in exprs]
        for what, expr in exprs:
            series = check_expr(f"{where}, {what}", expr, names, bucketed, labels_known)
            if not series:
                problem(f"{where}, {what}", f"expression names no series: {expr!r}")

    if len(sys.argv) == 3 and sys.argv[1] == "--dashboard-rules":
        write_dashboard_rules(pathlib.Path(sys.argv[2]), dashboard_exprs)
    elif len(sys.argv) > 1:
        problem("usage", "deploy/check_metrics.py [--dashboard-rules FILE]")

    if problems:
        print("deploy/check_metrics.py: FAILED", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print(f"deploy/check_metrics.py: ok: {len(rule_names)} rules for {len(wanted)} documented alerts; "
          f"every series in {rel(ALERTS)} and {len(DASHBOARDS)} dashboard(s) is exported by the code "
          f"({len(names)} names, {len(bucketed)} with buckets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
