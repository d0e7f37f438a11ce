// Auditor page: GET /model on sign-in (which also tells an auditor key from a clinician
// key: the API answers 403), GET /audit to search, GET /audit/{id} to open one record.
import { contrastExplanation, planExplanation } from "./explanations.js";
import {
  $, announce, callApi, errorText, featureLabeller, fill, focusOn, h, loadFields, showErrorBox,
  utcTime, words,
} from "./common.js";
import { clearFieldErrors, showFieldErrors } from "./patient_form.js";
import { componentNames, exclusionsList, plansTable } from "./plans.js";
import { setupSignIn } from "./signin.js";

const state = { fields: null, labelFor: null, names: null, model: null };
let signIn;

const today = () => new Date().toISOString().slice(0, 10);

function nextDay(date) {
  const d = new Date(`${date}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().slice(0, 10);
}

function showArea(which) {
  $("#signin-needed").hidden = which !== "signin";
  $("#refusal").hidden = which !== "refused";
  $("#audit-area").hidden = which !== "audit";
}

/** After sign-in (or on load with a kept key): is this an auditor key? */
async function checkKey(key) {
  state.model = null;
  if (!key) {
    showArea("signin");
    return;
  }
  announce("Checking the key…");
  const result = await callApi("model");
  if (result.status === 401) {
    showArea("signin");
    signIn.reject(errorText(result));
    announce("");
    return;
  }
  if (!result.ok) {
    $("#refusal-text").textContent =
      result.status === 403
        ? `The audit trail is open to auditors only, and the service refused this key (403: ${result.data.message})`
        : errorText(result);
    showArea("refused");
    announce("Access refused.");
    focusOn($("#refusal"));
    return;
  }
  state.model = result.data;
  const m = result.data.model;
  $("#served-model").textContent = `The service now serves ${m.name} version ${m.version} (${m.tag}).`;
  showArea("audit");
  announce("Signed in as an auditor.");
  await search();
}

async function search(event) {
  event?.preventDefault();
  const form = $("#search-form");
  const box = $("#search-errors");
  clearFieldErrors(form);
  showErrorBox(box, "");
  const requestId = $("#request_id").value.trim();
  if (requestId) {
    const result = await callApi(`audit/${encodeURIComponent(requestId)}`);
    if (!result.ok) return refused(form, box, result);
    showRecords({ count: 1, records: [result.data] });
    openRecord(result.data);
    return;
  }
  const since = $("#since").value;
  const until = $("#until").value;
  // The API's "until" is exclusive; the form's "to" date is included, so ask for the next day.
  const query = {
    since,
    until: until ? nextDay(until) : "",
    model_version: $("#model_version").value.trim(),
    limit: $("#limit").value.trim(),
  };
  announce("Searching…");
  const result = await callApi("audit", { query });
  if (!result.ok) return refused(form, box, result);
  showRecords(result.data);
  announce(`${result.data.count} record(s) found.`);
  if (event) focusOn($("#results-heading"));
}

function refused(form, box, result) {
  if (result.status === 401) signIn.reject(errorText(result));
  const violations = result.data?.violations || [];
  showErrorBox(box, errorText(result), showFieldErrors(form, violations));
  announce("The search was refused.");
  focusOn(box);
}

function plansOf(record) {
  if (record.endpoint === "explain") return `${record.parameters.plan_a} vs ${record.parameters.plan_b}`;
  return record.shown_plans.join(", ");
}

function showRecords(data) {
  $("#results").hidden = false;
  fill($("#results-heading"), `Records (${data.count})`);
  if (data.count === 0) {
    fill($("#records"), h("p", { text: "No record matches." }));
    return;
  }
  const more = data.limit && data.count >= data.limit ? ` Showing the first ${data.limit}; narrow the dates to see later ones.` : "";
  fill(
    $("#records"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "records" },
        h("caption", { text: `Oldest first.${more}` }),
        h(
          "thead",
          {},
          h("tr", {}, ["Time", "Request id", "Kind", "Model version", "Patient (pseudonym)", "Plans", ""].map((t) => h("th", { scope: "col", text: t }))),
        ),
        h(
          "tbody",
          {},
          data.records.map((r) =>
            h(
              "tr",
              { dataset: { requestId: r.request_id } },
              h("td", { dataset: { label: "Time" }, text: utcTime(r.created_at) }),
              h("td", { dataset: { label: "Request id" } }, h("code", { text: r.request_id })),
              h("td", { dataset: { label: "Kind" }, text: r.endpoint === "explain" ? "comparison" : "recommendation" }),
              h("td", { dataset: { label: "Model version" }, text: r.model_version }),
              h("td", { dataset: { label: "Patient" } }, h("code", { title: r.patient_key ?? "", text: r.patient_key ? `${r.patient_key.slice(0, 12)}…` : "—" })),
              h("td", { dataset: { label: "Plans" }, text: plansOf(r) }),
              h(
                "td",
                { class: "actions" },
                h("button", { type: "button", onclick: () => openRecord(r) }, "Open", h("span", { class: "visually-hidden", text: ` record ${r.request_id}` })),
              ),
            ),
          ),
        ),
      ),
    ),
  );
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", {}, v ?? "—")]));
}

function profileTables(profile) {
  const shown = (v) => (v === null || v === undefined ? "missing" : typeof v === "boolean" ? (v ? "yes" : "no") : words(v));
  return state.fields.sections.map((section) => {
    const rows = section.fields.filter((f) => f.name in profile);
    if (!rows.length) return null;
    return h(
      "table",
      { class: "profile" },
      h("caption", { text: section.title }),
      h("tbody", {}, rows.map((f) => h("tr", {}, h("th", { scope: "row", text: f.label }), h("td", { text: shown(profile[f.name]) })))),
    );
  });
}

function explanationsView(record) {
  if (record.endpoint === "explain") return contrastExplanation(record.explanations[0], state.labelFor);
  if (!record.explanations.length) return h("p", { text: "No plan was ranked." });
  const holder = h("div", {});
  const show = (plan) => {
    const e = record.explanations.find((x) => x.plan === plan);
    fill(holder, planExplanation(e, e.plan, state.labelFor));
  };
  const select = h(
    "select",
    { id: "record-plan", onchange: (ev) => show(ev.target.value) },
    record.explanations.map((e) => h("option", { value: e.plan, text: e.plan })),
  );
  show(record.explanations[0].plan);
  return h("div", {}, h("div", { class: "field field-inline" }, h("label", { for: "record-plan", text: "Explanation of plan" }), select), holder);
}

function modelView(record) {
  const served = state.model;
  const same = served && served.model.tag === record.model_tag;
  const lineage = same ? served.lineage : {};
  return [
    facts([
      ["Model", `${record.model_name} version ${record.model_version}`],
      ["BentoML tag", h("code", { text: record.model_tag })],
      ["MLflow run", h("code", { text: record.mlflow_run_id ?? "—" })],
      ["Safety ruleset", record.ruleset_version],
      ...Object.entries(lineage)
        .filter(([k]) => !["registered_model", "registered_version", "mlflow_run_id", "ruleset_version"].includes(k))
        .map(([k, v]) => [words(k).replace(/^./, (c) => c.toUpperCase()), h("code", { text: String(v ?? "—") })]),
    ]),
    same
      ? h("details", { class: "model-card" }, h("summary", { text: "Model card" }), h("pre", { text: served.model_card || "(this model has no model card)" }))
      : h("p", { class: "notice", text: `The service now serves ${served?.model.tag ?? "another model"}; the lineage and model card of ${record.model_tag} are in the MLflow registry.` }),
  ];
}

function openRecord(record) {
  fill($("#record-heading"), `Record ${record.request_id}`);
  // A comparison keeps its two plans as A and B, not as a ranking.
  const ranked = record.ranked.map((p, i) => ({ ...p, rank: p.rank ?? (record.endpoint === "explain" ? "AB"[i] : i + 1) }));
  fill(
    $("#record-body"),
    facts([
      ["Time", utcTime(record.created_at)],
      ["Kind", record.endpoint === "explain" ? "comparison (POST /explain)" : "recommendation (POST /recommend)"],
      ["Patient (pseudonym)", h("code", { class: "wrap", text: record.patient_key ?? "—" })],
      ["Input SHA-256", h("code", { class: "wrap", text: record.input_sha256 })],
      ["Parameters", Object.entries(record.parameters).map(([k, v]) => `${k} = ${v}`).join(", ")],
      ["Plans shown", record.shown_plans.length ? record.shown_plans.join(", ") : "—"],
    ]),
    h("h3", { text: "Inputs (pseudonymised profile)" }),
    h("div", { class: "profile-tables" }, profileTables(record.profile)),
    record.input_warnings.length ? h("ul", { class: "notice" }, record.input_warnings.map((w) => h("li", { text: w }))) : null,
    h("h3", { text: "Outputs" }),
    plansTable(ranked, { caption: record.endpoint === "explain" ? "The two plans compared" : "Ranked plans, best first", names: state.names }),
    h("h3", { text: "Exclusions" }),
    exclusionsList(record.exclusions, state.names),
    h("h3", { text: "Explanation (SHAP)" }),
    explanationsView(record),
    h("h3", { text: "Outcome reports" }),
    record.outcomes.length
      ? h("ul", {}, record.outcomes.map((o) => h("li", { text: `${utcTime(o.recorded_at)}: ${o.plan}, PEG at 12 weeks ${o.peg_12wk}, adverse event ${o.adverse_event ? "yes" : "no"}` })))
      : h("p", { class: "muted", text: "None reported yet." }),
    h("h3", { text: "Model and lineage" }),
    modelView(record),
  );
  $("#record").hidden = false;
  focusOn($("#record-heading"));
}

async function main() {
  try {
    state.fields = await loadFields();
  } catch (err) {
    announce(`The page could not be loaded (${err.message}).`);
    return;
  }
  state.labelFor = featureLabeller(state.fields);
  state.names = componentNames(state.fields);
  $("#since").value = today();
  $("#until").value = today();
  $("#search-form").addEventListener("submit", search);
  signIn = setupSignIn(checkKey);
  document.body.dataset.ready = "true"; // wired (browser tests wait for this)
}

main();
