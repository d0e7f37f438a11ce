// Inline SVG charts: the SHAP waterfall and the small bars of the plan table. Drawn from
// the numbers in the API's answer; each chart is role="img" with a text alternative, and
// the pages also show the same numbers as text or in a table.
import { num, pct, signed, svg } from "./common.js";

let chartCount = 0;

function niceStep(span) {
  const raw = span / 4;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].find((m) => m * magnitude >= raw) * magnitude;
  return step;
}

function truncate(text, max) {
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}

/**
 * SHAP waterfall: a start bar (0 → start), one floating bar per contribution (running total
 * → running total + value), and an end bar (0 → end). `items`: [{label, value, detail}].
 * With exact SHAP values start + Σ values = end, which the chart makes visible.
 */
export function waterfall({ title, start, startLabel, items, end, endLabel, unit = "PEG points" }) {
  const W = 760;
  const labelW = 330;
  const valueW = 70;
  const rowH = 28;
  const top = 6;
  const axisH = 34;
  const rows = [{ kind: "start", label: startLabel, from: 0, to: start, detail: startLabel }];
  let running = start;
  for (const item of items) {
    rows.push({ kind: item.value >= 0 ? "up" : "down", ...item, from: running, to: running + item.value });
    running += item.value;
  }
  rows.push({ kind: "end", label: endLabel, from: 0, to: end, detail: endLabel });

  const values = rows.flatMap((r) => [r.from, r.to]).concat(0);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-9) hi = lo + 1;
  const step = niceStep(hi - lo);
  lo = Math.floor(lo / step) * step;
  hi = Math.ceil(hi / step) * step;
  const plotL = labelW + 8;
  const plotR = W - valueW - 8;
  const x = (v) => plotL + ((v - lo) / (hi - lo)) * (plotR - plotL);
  const H = top + rows.length * rowH + axisH;
  const id = `chart-${++chartCount}`;

  const parts = [];
  rows.forEach((r, i) => {
    const y = top + i * rowH;
    const x0 = Math.min(x(r.from), x(r.to));
    const width = Math.max(1.5, Math.abs(x(r.to) - x(r.from)));
    const shown = r.kind === "start" || r.kind === "end" ? num(r.to) : signed(r.value);
    parts.push(
      svg(
        "g",
        { class: `row row-${r.kind}` },
        svg("title", { text: `${r.detail || r.label}: ${shown} ${unit}` }),
        svg("text", { x: labelW, y: y + rowH / 2, class: "label", "text-anchor": "end", "dominant-baseline": "middle", text: truncate(r.label, 42) }),
        svg("rect", { x: x0, y: y + 5, width, height: rowH - 10, rx: 2, class: "bar" }),
        svg("text", { x: W - 4, y: y + rowH / 2, class: "value", "text-anchor": "end", "dominant-baseline": "middle", text: shown }),
      ),
    );
    // Connector to the next bar: where this bar ends, the next one starts.
    if (i < rows.length - 1 && r.kind !== "end") {
      parts.push(svg("line", { x1: x(r.to), x2: x(r.to), y1: y + rowH - 5, y2: y + rowH + 5, class: "connector" }));
    }
  });
  const axisY = top + rows.length * rowH;
  parts.push(svg("line", { x1: x(0), x2: x(0), y1: top, y2: axisY, class: "zero" }));
  parts.push(svg("line", { x1: plotL, x2: plotR, y1: axisY, y2: axisY, class: "axis" }));
  for (let k = 0; lo + k * step <= hi + step / 2; k++) {
    const v = lo + k * step; // by index: repeated addition would drift (0.30000000000000004)
    parts.push(svg("line", { x1: x(v), x2: x(v), y1: axisY, y2: axisY + 4, class: "axis" }));
    parts.push(svg("text", { x: x(v), y: axisY + 16, "text-anchor": "middle", class: "tick", text: num(v, step < 0.1 ? 2 : 1) }));
  }
  parts.push(svg("text", { x: (plotL + plotR) / 2, y: axisY + 30, "text-anchor": "middle", class: "tick", text: unit }));

  const description = `${startLabel} ${num(start)}; ${items
    .map((it) => `${it.label} ${signed(it.value)}`)
    .join("; ")}; ${endLabel} ${num(end)} ${unit}.`;
  return svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, class: "waterfall", role: "img", "aria-labelledby": `${id}-t ${id}-d`, preserveAspectRatio: "xMinYMin meet" },
    svg("title", { id: `${id}-t`, text: title }),
    svg("desc", { id: `${id}-d`, text: description }),
    parts,
  );
}

/** Domain [lo, hi] (with 0) shared by the interval bars of one table, so rows compare. */
export function intervalDomain(plans) {
  const values = plans.flatMap((p) => [p.expected_improvement, ...(p.improvement_interval || [])]);
  return [Math.min(0, ...values), Math.max(0, ...values)];
}

/** Expected improvement as a bar from 0 with its 80 % interval as a whisker. */
export function improvementBar(value, interval, [lo, hi]) {
  const W = 160;
  const H = 22;
  const x = (v) => 4 + ((v - lo) / (hi - lo || 1)) * (W - 8);
  const label = interval
    ? `${num(value)} PEG points, 80 % interval ${num(interval[0])} to ${num(interval[1])}`
    : `${num(value)} PEG points`;
  return svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, class: "minibar improvement", role: "img", "aria-label": label },
    svg("rect", { x: Math.min(x(0), x(value)), y: 6, width: Math.max(1, Math.abs(x(value) - x(0))), height: 10, class: "bar" }),
    interval
      ? svg(
          "g",
          { class: "whisker" },
          svg("line", { x1: x(interval[0]), x2: x(interval[1]), y1: 11, y2: 11 }),
          svg("line", { x1: x(interval[0]), x2: x(interval[0]), y1: 5, y2: 17 }),
          svg("line", { x1: x(interval[1]), x2: x(interval[1]), y1: 5, y2: 17 }),
        )
      : null,
    svg("line", { x1: x(0), x2: x(0), y1: 1, y2: H - 1, class: "zero" }),
  );
}

/** A probability as a bar on a shared scale 0..max. */
export function riskBar(p, max) {
  const W = 120;
  const H = 22;
  const width = Math.max(1, (p / (max || 1)) * (W - 4));
  return svg(
    "svg",
    { viewBox: `0 0 ${W} ${H}`, class: "minibar risk", role: "img", "aria-label": `adverse-event risk ${pct(p, 1)}` },
    svg("rect", { x: 2, y: 6, width: W - 4, height: 10, class: "track" }),
    svg("rect", { x: 2, y: 6, width, height: 10, class: "bar" }),
  );
}
