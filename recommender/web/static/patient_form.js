// The patient form, generated from the schema description (fields.json): one fieldset per
// section, one labelled control per contract column, help text with the range, and a slot
// for the service's error message under every control.
import { $, h, words } from "./common.js";

const controlId = (name) => `f-${name}`;

/** Build the fieldsets into `container`. */
export function buildPatientForm(container, fields) {
  container.replaceChildren(
    ...fields.sections.map((section) =>
      h(
        "fieldset",
        { class: `section section-${section.id}` },
        h("legend", { text: section.title }),
        h("div", { class: `fields fields-${section.id}` }, section.fields.map(fieldBlock)),
      ),
    ),
  );
}

function helpText(f) {
  const parts = [];
  if (f.description.toLowerCase() !== f.form_label.toLowerCase() && f.group !== "prior") {
    parts.push(f.description[0].toUpperCase() + f.description.slice(1));
  }
  if (f.hint) parts.push(f.hint);
  return parts.join(" · ");
}

function fieldBlock(f) {
  const id = controlId(f.name);
  const help = helpText(f);
  const describedBy = [help ? `help-${f.name}` : null, `err-${f.name}`].filter(Boolean).join(" ");
  const common = { id, name: f.name, "aria-describedby": describedBy, dataset: { column: f.name } };
  const label = h(
    "label",
    { for: id },
    f.form_label,
    f.required ? h("span", { class: "required", text: " (required)" }) : null,
  );
  const error = h("p", { class: "field-error", id: `err-${f.name}`, hidden: true });
  const helpNode = help ? h("p", { class: "help", id: `help-${f.name}`, text: help }) : null;

  if (f.control === "checkbox") {
    return h(
      "div",
      { class: "field field-check", dataset: { field: f.name } },
      h("input", { ...common, type: "checkbox", value: "true" }),
      label,
      helpNode,
      error,
    );
  }
  let control;
  if (f.control === "number") {
    control = h("input", {
      ...common,
      type: "number",
      inputmode: f.type === "int" ? "numeric" : "decimal",
      step: f.step,
      min: f.min,
      max: f.max,
      required: f.required,
      autocomplete: "off",
    });
  } else if (f.control === "text") {
    control = h("input", {
      ...common,
      type: "text",
      maxlength: f.max_length,
      autocomplete: "off",
      spellcheck: "false",
    });
  } else if (f.control === "tristate") {
    control = h(
      "select",
      common,
      h("option", { value: "", text: "unknown" }),
      h("option", { value: "true", text: "yes" }),
      h("option", { value: "false", text: "no" }),
    );
  } else {
    const blank = f.required ? "choose…" : "not recorded";
    control = h(
      "select",
      { ...common, required: f.required },
      f.default === null ? h("option", { value: "", text: blank }) : null,
      f.levels.map((level) =>
        h("option", { value: level, text: words(level), selected: level === f.default }),
      ),
    );
  }
  return h("div", { class: "field", dataset: { field: f.name } }, label, control, helpNode, error);
}

/**
 * The profile as the API takes it: numbers as numbers, empty optional fields left out,
 * checked risk flags as true. Returns {patient, problems}; problems are what the browser
 * itself knows is wrong (text in a number field), in the API's violation shape.
 */
export function readPatient(form, fields) {
  const patient = {};
  const problems = [];
  for (const section of fields.sections) {
    for (const f of section.fields) {
      const el = form.elements.namedItem(f.name);
      if (!el) continue;
      if (f.control === "checkbox") {
        if (el.checked) patient[f.name] = true;
      } else if (f.control === "tristate") {
        if (el.value) patient[f.name] = el.value === "true";
      } else if (f.control === "number") {
        if (el.validity.badInput) {
          problems.push({ field: `patient.${f.name}`, problem: "not a number", value: null });
        } else if (el.value.trim() !== "") {
          patient[f.name] = Number(el.value);
        }
      } else if (el.value.trim() !== "") {
        patient[f.name] = el.value.trim();
      }
    }
  }
  return { patient, problems };
}

/** What to say under a field for one API violation. */
export function fieldMessage(v) {
  if (/^required/.test(v.problem)) return "Required: enter a value.";
  const problem = v.problem[0].toUpperCase() + v.problem.slice(1);
  const shown = v.value === null || v.value === undefined ? "" : ` (you entered ${JSON.stringify(v.value)})`;
  return problem + shown;
}

export function clearFieldErrors(form) {
  for (const error of form.querySelectorAll(".field-error")) {
    error.hidden = true;
    error.textContent = "";
  }
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

/**
 * Put each violation under the control it names ("patient.age" → #f-age, "top_k" → #top_k).
 * Returns the violations with the id of the control they were placed at (or null).
 */
export function showFieldErrors(form, violations) {
  return violations.map((v) => {
    const name = String(v.field || "").replace(/^patient\./, "");
    const control = form.querySelector(`[name="${CSS.escape(name)}"]`);
    const error = control && $(`#err-${CSS.escape(name)}`, form);
    if (!error) return { ...v, target: null };
    // Several problems may name one field; show them all.
    error.textContent = error.textContent ? `${error.textContent} ${fieldMessage(v)}` : fieldMessage(v);
    error.hidden = false;
    control.setAttribute("aria-invalid", "true");
    const label = form.querySelector(`label[for="${CSS.escape(control.id)}"]`);
    const labelText = label ? label.firstChild.textContent.trim() : name;
    return { ...v, target: control.id, message: `${labelText}: ${fieldMessage(v)}` };
  });
}
