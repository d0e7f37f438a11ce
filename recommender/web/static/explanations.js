// SHAP explanations as waterfall figures, with the same numbers in a table for screen
// readers and for anyone who wants the exact values.
import { waterfall } from "./charts.js";
import { h, num, signed, words } from "./common.js";

function itemLabel(c, labelFor) {
  const label = labelFor(c.feature);
  return c.value ? `${label} = ${words(c.value)}` : label;
}

function contributionsTable(contributions, labelFor, first, last) {
  return h(
    "details",
    { class: "contrib-details" },
    h("summary", { text: "Show the contributions as a table" }),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "contributions" },
        h(
          "thead",
          {},
          h("tr", {}, ["Feature", "Patient's value", "SHAP (PEG points)", "What it did"].map((t) => h("th", { scope: "col", text: t }))),
        ),
        h(
          "tbody",
          {},
          h("tr", {}, h("td", { text: first[0] }), h("td", { text: "" }), h("td", { class: "num", text: num(first[1], 4) }), h("td", { text: "" })),
          contributions.map((c) =>
            h(
              "tr",
              {},
              h("td", { text: labelFor(c.feature) }),
              h("td", { text: words(c.value) }),
              h("td", { class: "num", text: signed(c.shap, 4) }),
              h("td", { text: c.phrase }),
            ),
          ),
          h("tr", { class: "total" }, h("td", { text: last[0] }), h("td", { text: "" }), h("td", { class: "num", text: num(last[1], 4) }), h("td", { text: "" })),
        ),
      ),
    ),
  );
}

/** One plan's explanation: base value → contributions → plan effect. */
export function planExplanation(explanation, plan, labelFor) {
  const start = ["Average patient (base value)", explanation.base_value];
  const end = ["Plan effect for this patient", explanation.plan_effect];
  return h(
    "figure",
    { class: "explanation", dataset: { plan } },
    h(
      "div",
      { class: "chart-scroll" },
      waterfall({
        title: `SHAP waterfall for ${plan}`,
        start: explanation.base_value,
        startLabel: start[0],
        items: explanation.contributions.map((c) => ({ label: itemLabel(c, labelFor), value: c.shap, detail: c.phrase })),
        end: explanation.plan_effect,
        endLabel: end[0],
      }),
    ),
    h("figcaption", { text: explanation.note }),
    contributionsTable(explanation.contributions, labelFor, start, end),
  );
}

/** A contrast A vs B (POST /explain): average patient's gap → contributions → utility gap. */
export function contrastExplanation(contrast, labelFor) {
  const { plan_a: a, plan_b: b } = contrast;
  const start = ["Average patient's gap (A − B)", contrast.average_patient_gap];
  const end = ["Utility gap for this patient (A − B)", contrast.utility_gap];
  const total = contrast.contributions.reduce((sum, c) => sum + c.shap, 0);
  return h(
    "figure",
    { class: "explanation contrast" },
    h(
      "div",
      { class: "chart-scroll" },
      waterfall({
        title: `Why ${a} and ${b} differ for this patient`,
        start: contrast.average_patient_gap,
        startLabel: start[0],
        items: contrast.contributions.map((c) => ({ label: itemLabel(c, labelFor), value: c.shap, detail: c.phrase })),
        end: contrast.utility_gap,
        endLabel: end[0],
      }),
    ),
    h(
      "figcaption",
      {},
      h("span", { class: "summary", text: `${contrast.summary}. ` }),
      h("span", {
        class: "sum-check",
        text: `Contributions sum to ${signed(total, 4)}; with the average patient's gap ${signed(contrast.average_patient_gap, 4)} that is the utility gap ${signed(contrast.utility_gap, 4)} PEG points.`,
      }),
    ),
    contributionsTable(contrast.contributions, labelFor, start, end),
  );
}
