// Ranked plans, their warnings and the exclusions, as the API returns them (POST /recommend)
// and as the audit trail keeps them (GET /audit/{id}: the same numbers, without components).
import { improvementBar, intervalDomain, riskBar } from "./charts.js";
import { h, num, pct, words } from "./common.js";

/** code → component name, from fields.json's catalog. */
export function componentNames(fields) {
  return new Map(fields.components.map((c) => [c.code, c.name]));
}

function planCell(plan, names) {
  const codes = plan.components ? plan.components.map((c) => c.code) : plan.plan.split("+");
  return h(
    "td",
    { dataset: { label: "Plan" } },
    h("code", { class: "plan-code", text: plan.plan }),
    h("ul", { class: "components" }, codes.map((code) => h("li", { text: names.get(code) || code }))),
  );
}

export function warningsList(warnings) {
  if (!warnings || warnings.length === 0) return h("span", { class: "muted", text: "none" });
  return h(
    "ul",
    { class: "warnings" },
    warnings.map((w) =>
      h(
        "li",
        {},
        h("span", { class: `badge badge-${String(w.action).toLowerCase()}`, text: w.action }),
        " ",
        h("span", { text: w.reason }),
        h("span", { class: "source", text: ` (${w.rule_id}${w.source ? `; ${w.source}` : ""})` }),
      ),
    ),
  );
}

/**
 * The plan table. `actions(plan)` may return nodes for a last column (buttons).
 * Bars share one scale per table, so their lengths compare across rows.
 */
export function plansTable(plans, { caption, names, actions } = {}) {
  const domain = intervalDomain(plans);
  const maxRisk = Math.max(0.05, ...plans.map((p) => p.p_adverse_event ?? 0));
  const riskScale = Math.ceil(maxRisk * 10) / 10;
  const head = [
    "Rank",
    "Plan",
    "Expected improvement (PEG points, 80 % interval)",
    "Chance of response",
    `Adverse-event risk (bar: 0–${pct(riskScale)})`,
    "Utility",
    "Warnings",
    actions ? "Actions" : null,
  ].filter(Boolean);
  const rows = plans.map((p, i) =>
    h(
      "tr",
      { dataset: { plan: p.plan } },
      h("td", { class: "num", dataset: { label: "Rank" }, text: p.rank ?? (p.allowed === false ? "excluded" : i + 1) }),
      planCell(p, names),
      h(
        "td",
        { dataset: { label: "Expected improvement" } },
        h(
          "div",
          { class: "with-bar" },
          improvementBar(p.expected_improvement, p.improvement_interval, domain),
          h(
            "span",
            { class: "bar-value" },
            num(p.expected_improvement),
            p.improvement_interval
              ? h("span", { class: "interval", text: ` (${num(p.improvement_interval[0])} to ${num(p.improvement_interval[1])})` })
              : null,
          ),
        ),
      ),
      h("td", { class: "num", dataset: { label: "Chance of response" }, text: pct(p.p_response) }),
      h(
        "td",
        { dataset: { label: "Adverse-event risk" } },
        h("div", { class: "with-bar" }, riskBar(p.p_adverse_event, riskScale), h("span", { class: "bar-value", text: pct(p.p_adverse_event, 1) })),
      ),
      h("td", { class: "num", dataset: { label: "Utility" }, text: num(p.utility) }),
      h("td", { dataset: { label: "Warnings" } }, warningsList(p.warnings)),
      actions ? h("td", { class: "actions", dataset: { label: "Actions" } }, actions(p)) : null,
    ),
  );
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "plans" },
      caption ? h("caption", { text: caption }) : null,
      h("thead", {}, h("tr", {}, head.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, rows),
    ),
  );
}

/** Excluded components and combinations with every rule that excluded them. */
export function exclusionsList(excluded, names) {
  if (!excluded || excluded.length === 0) {
    return h("p", { class: "muted", text: "No component or combination is excluded for this patient." });
  }
  return h(
    "ul",
    { class: "exclusions" },
    excluded.map((e) => {
      const what = e.component
        ? `${names.get(e.component) || e.component} (${e.component})`
        : `combination ${words(e.combination ?? "")}`;
      return h(
        "li",
        { dataset: { excluded: e.component || e.combination } },
        h("strong", { text: what }),
        h(
          "ul",
          {},
          e.rules.map((r) =>
            h(
              "li",
              {},
              h("span", { class: `badge badge-${String(r.action).toLowerCase()}`, text: r.action }),
              r.floor ? h("span", { class: "badge badge-floor", text: "safety floor" }) : null,
              " ",
              r.reason,
              h("span", { class: "source", text: ` (${r.rule_id}${r.source ? `; ${r.source}` : ""})` }),
            ),
          ),
        ),
      );
    }),
  );
}
