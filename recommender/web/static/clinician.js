// Clinician page: patient form → POST /recommend → ranked plans, exclusions, a plan's SHAP
// waterfall, and POST /explain to contrast two plans.
import { contrastExplanation, planExplanation } from "./explanations.js";
import {
  $, announce, apiKey, callApi, errorText, featureLabeller, fill, focusOn, h, loadFields, num, pct,
  showErrorBox, utcTime,
} from "./common.js";
import { buildPatientForm, clearFieldErrors, readPatient, showFieldErrors } from "./patient_form.js";
import { componentNames, exclusionsList, plansTable, warningsList } from "./plans.js";
import { setupSignIn } from "./signin.js";

const state = {
  fields: null,
  labelFor: null,
  names: null,
  input: null, // what the shown ranking was computed from: {patient} or {fhir_bundle}
  answer: null,
  busy: false,
};

let signIn;

function mode() {
  return $("#patient-form").elements.namedItem("mode").value || "profile";
}

/** The patient part of a request, or {problems} found before asking the service. */
function readInput(form) {
  if (mode() === "fhir") {
    try {
      return { input: { fhir_bundle: JSON.parse($("#fhir_bundle").value) }, problems: [] };
    } catch (err) {
      return { problems: [{ field: "fhir_bundle", problem: `not valid JSON (${err.message})`, value: null }] };
    }
  }
  const { patient, problems } = readPatient(form, state.fields);
  return { input: { patient }, problems };
}

/** Show a refused request: each violation under its field, all of them in the summary. */
function showRefusal(form, box, result, title) {
  const violations = result.data?.violations || [];
  const placed = showFieldErrors(form, violations).map((v) => ({
    ...v,
    message: v.message || `${v.field}: ${v.problem}`,
  }));
  showErrorBox(box, violations.length ? `${title}: ${violations.length} problem(s)` : errorText(result), placed);
}

async function recommend(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const box = $("#form-errors");
  if (state.busy) return;
  clearFieldErrors(form);
  showErrorBox(box, "");
  if (!apiKey.get()) {
    showErrorBox(box, "Sign in with your API key first.");
    signIn.focus();
    return;
  }
  const { input, problems } = readInput(form);
  if (problems.length) {
    showRefusal(form, box, { status: 400, data: { violations: problems } }, "Please correct the form");
    focusOn(box);
    return;
  }
  const topK = $("#top_k").value.trim();
  const body = { ...input, top_k: topK === "" ? state.fields.top_k.default : Number(topK) };
  state.busy = true;
  form.setAttribute("aria-busy", "true");
  announce("Ranking plans…");
  const result = await callApi("recommend", { method: "POST", body });
  state.busy = false;
  form.removeAttribute("aria-busy");
  if (!result.ok) {
    if (result.status === 401) signIn.reject(errorText(result));
    showRefusal(form, box, result, "The service refused the patient");
    announce("The request was refused; see the messages next to the fields.");
    if (result.status !== 401) focusOn(box);
    return;
  }
  state.input = input;
  state.answer = result.data;
  showResults(result.data);
  announce(`${result.data.plans.length} plans ranked.`);
  focusOn($("#results-heading"));
}

function showResults(answer) {
  const m = answer.model;
  fill(
    $("#results-meta"),
    `Model ${m.name} version ${m.version} (${m.tag}; MLflow run ${m.mlflow_run_id ?? "—"}), safety ruleset ${m.ruleset_version}. `,
    `Request ${answer.request_id}, ${utcTime(answer.created_at)}.`,
  );
  fill(
    $("#input-warnings"),
    answer.input_warnings.length
      ? h("div", { class: "notice" }, h("p", { text: "Notes on the input:" }), h("ul", {}, answer.input_warnings.map((w) => h("li", { text: w }))))
      : null,
  );
  const table = plansTable(answer.plans, {
    caption: `The ${answer.plans.length} best allowed plans, best first. Bars share one scale; the whisker is the 80 % interval.`,
    names: state.names,
    actions: (plan) =>
      h(
        "button",
        { type: "button", class: "explain-button", "aria-controls": "explanation", onclick: () => showExplanation(plan) },
        "Explain",
        h("span", { class: "visually-hidden", text: ` plan ${plan.plan}` }),
      ),
  });
  fill($("#plans"), answer.plans.length ? table : h("p", { text: "No plan is allowed for this patient; see the exclusions." }));
  fill($("#excluded"), exclusionsList(answer.excluded, state.names));
  $("#results").hidden = false;
  $("#explanation").hidden = true;
  setupCompare(answer.plans);
}

function showExplanation(plan) {
  fill($("#explanation-heading"), `Why ${plan.plan} has a plan effect of ${num(plan.explanation.plan_effect)} PEG points`);
  fill($("#explanation-body"), planExplanation(plan.explanation, plan.plan, state.labelFor));
  $("#explanation").hidden = false;
  focusOn($("#explanation-heading"));
}

function setupCompare(plans) {
  const section = $("#compare");
  fill($("#compare-result"));
  showErrorBox($("#compare-errors"), "");
  if (plans.length < 2) {
    section.hidden = true;
    return;
  }
  for (const [id, pick] of [["#plan_a", 0], ["#plan_b", 1]]) {
    fill($(id), plans.map((p, i) => h("option", { value: p.plan, selected: i === pick, text: `${p.rank}. ${p.plan}` })));
  }
  section.hidden = false;
}

async function compare(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const box = $("#compare-errors");
  if (state.busy || !state.input) return;
  clearFieldErrors(form);
  showErrorBox(box, "");
  const planA = $("#plan_a").value;
  const planB = $("#plan_b").value;
  if (planA === planB) {
    showRefusal(form, box, { status: 400, data: { violations: [{ field: "plan_b", problem: "choose a plan other than plan A", value: planB }] } }, "Please correct the choice");
    return;
  }
  state.busy = true;
  announce(`Comparing ${planA} with ${planB}…`);
  const result = await callApi("explain", { method: "POST", body: { ...state.input, plan_a: planA, plan_b: planB } });
  state.busy = false;
  if (!result.ok) {
    if (result.status === 401) signIn.reject(errorText(result));
    showRefusal(form, box, result, "The service refused the comparison");
    announce("The comparison was refused.");
    return;
  }
  showContrast(result.data);
  announce(result.data.summary);
}

function planCard(p, side) {
  return h(
    "article",
    { class: "plan-card", dataset: { plan: p.plan } },
    h("h4", {}, `Plan ${side}: `, h("code", { text: p.plan })),
    p.allowed ? null : h("p", { class: "badge badge-block", text: "excluded for this patient" }),
    h(
      "dl",
      { class: "facts" },
      h("dt", { text: "Utility" }), h("dd", { text: num(p.utility) }),
      h("dt", { text: "Expected improvement" }), h("dd", { text: `${num(p.expected_improvement)} PEG points` }),
      h("dt", { text: "Adverse-event risk" }), h("dd", { text: pct(p.p_adverse_event, 1) }),
      h("dt", { text: "Warnings" }), h("dd", {}, warningsList(p.warnings)),
    ),
  );
}

function showContrast(contrast) {
  const heading = h("h3", { id: "contrast-heading", tabindex: "-1", text: `${contrast.plan_a} compared with ${contrast.plan_b}` });
  fill(
    $("#compare-result"),
    heading,
    h("div", { class: "side-by-side" }, planCard(contrast.plans[0], "A"), planCard(contrast.plans[1], "B")),
    h("p", { class: "gap" }, `Utility gap A − B: `, h("strong", { text: `${num(contrast.utility_gap)} PEG points` })),
    contrastExplanation(contrast, state.labelFor),
  );
  focusOn(heading);
}

async function main() {
  signIn = setupSignIn(() => {});
  try {
    state.fields = await loadFields();
  } catch (err) {
    fill($("#form-fields"), h("p", { class: "field-error", text: `The form could not be loaded (${err.message}).` }));
    return;
  }
  state.labelFor = featureLabeller(state.fields);
  state.names = componentNames(state.fields);
  buildPatientForm($("#form-fields"), state.fields);
  const topK = $("#top_k");
  Object.assign(topK, { min: state.fields.top_k.min, max: state.fields.top_k.max, value: state.fields.top_k.default });
  if (state.fields.accepts_fhir_bundle) {
    $("#input-mode").hidden = false;
    $("#input-mode").addEventListener("change", () => {
      $("#form-fields").hidden = mode() === "fhir";
      $("#fhir-input").hidden = mode() !== "fhir";
    });
  }
  $("#patient-form").addEventListener("submit", recommend);
  $("#compare-form").addEventListener("submit", compare);
  document.body.dataset.ready = "true"; // the form is built (browser tests wait for this)
}

main();
