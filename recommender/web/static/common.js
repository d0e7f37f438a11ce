// Shared by both pages: calls to the JSON API, the form description, DOM and number helpers.
// Everything is built with createElement/textContent, never innerHTML: the pages show
// values that came from a request body, and the API key in sessionStorage must stay private.

// This file is served at <ui>/static/common.js and the API at the service root, so both
// are found relative to this module, wherever the service is mounted.
const UI_ROOT = new URL("../", import.meta.url);
const API_ROOT = new URL("../../", import.meta.url);
const KEY_STORAGE = "painplan.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_STORAGE) || "",
  set: (key) => sessionStorage.setItem(KEY_STORAGE, key),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

/** Call the API; resolves to {ok, status, data}, never throws (a network failure is status 0). */
export async function callApi(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, API_ROOT);
  for (const [name, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, value);
  }
  const headers = { Accept: "application/json", Authorization: `Bearer ${apiKey.get()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (err) {
    return {
      ok: false,
      status: 0,
      data: { error: "network", message: `The service could not be reached (${err.message}).`, violations: [] },
    };
  }
  let data;
  try {
    data = await response.json();
  } catch {
    data = { error: "bad_response", message: `The service answered ${response.status} without JSON.`, violations: [] };
  }
  return { ok: response.ok, status: response.status, data };
}

let fieldsPromise;
/** The patient form description generated from features/schema.py (GET <ui>/fields.json). */
export function loadFields() {
  fieldsPromise ??= fetch(new URL("fields.json", UI_ROOT), { cache: "no-cache" }).then((r) => {
    if (!r.ok) throw new Error(`fields.json: HTTP ${r.status}`);
    return r.json();
  });
  return fieldsPromise;
}

/** Human label of a model feature (a contract column), e.g. for SHAP contributions. */
export function featureLabeller(fields) {
  const labels = new Map();
  for (const section of fields.sections) for (const f of section.fields) labels.set(f.name, f.label);
  return (name) => labels.get(name) || (name === "other features" ? "Other features" : name);
}

/**
 * h("p", {class: "x", text: "hi"}, child, …): a DOM element. Attributes: class, text,
 * hidden, on<event> (a function), dataset (an object); anything else is set with
 * setAttribute. Children may be nodes, strings, numbers, null/false (skipped) or arrays.
 */
export function h(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.setAttribute("class", value);
    else if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : String(child));
  }
}

export const svg = (tag, attrs, ...children) => h(`svg:${tag}`, attrs, ...children);

export function $(selector, root = document) {
  return root.querySelector(selector);
}

/** Replace a container's content. */
export function fill(container, ...children) {
  container.replaceChildren();
  append(container, children);
  return container;
}

/** Move focus to a heading (or other element) the user should read next. */
export function focusOn(element) {
  if (!element.hasAttribute("tabindex")) element.setAttribute("tabindex", "-1");
  element.focus({ preventScroll: true });
  element.scrollIntoView({ block: "start", behavior: "instant" });
}

/** Polite status line (role="status") read out by screen readers. */
export function announce(text) {
  const status = $("#status");
  if (status) status.textContent = text;
}

// Numbers as a clinician reads them: a real minus sign, fixed decimals.
export function num(x, digits = 2) {
  if (x === null || x === undefined || Number.isNaN(Number(x))) return "—";
  const text = Number(x).toFixed(digits);
  return /^-0\.?0*$/.test(text) ? text.slice(1) : text.replace(/^-/, "−"); // no "−0.00"
}

export function signed(x, digits = 2) {
  return (Number(x) >= 0 ? "+" : "") + num(x, digits);
}

export function pct(p, digits = 0) {
  return p === null || p === undefined ? "—" : `${num(100 * p, digits)} %`;
}

/** A level or code as words: "low_back" → "low back". */
export function words(code) {
  return String(code).replaceAll("_", " ");
}

/** "2026-11-21T12:15:35.51Z" → "2026-11-21 12:15:35 UTC". */
export function utcTime(iso) {
  if (!iso) return "—";
  return `${String(iso).replace("T", " ").replace(/(\.\d+)?(Z|[+-]00:00)?$/, "")} UTC`;
}

/** Error body of the API as one sentence (for the page-level error box). */
export function errorText(result) {
  const d = result.data || {};
  const what = {
    0: "No answer",
    400: "The request was refused",
    401: "The API key was not recognised",
    403: "This key is not allowed to do that",
    404: "Not found",
    413: "The request is too large",
    503: "The answer was withheld because it could not be recorded",
  }[result.status] || `The service answered ${result.status}`;
  return `${what}: ${d.message || d.error || "no details"}`;
}

/**
 * Fill an error box (role="alert") with a title and a list of problems; a problem placed at
 * a form control links to it, so a keyboard user can jump there. Empty list hides the box.
 */
export function showErrorBox(box, title, problems = []) {
  if (!title) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  const items = problems.map((p) => {
    const text = p.message || `${p.field}: ${p.problem}`;
    if (!p.target) return h("li", { text });
    const link = h("a", { href: `#${p.target}`, text });
    link.addEventListener("click", (event) => {
      event.preventDefault();
      document.getElementById(p.target)?.focus();
    });
    return h("li", {}, link);
  });
  fill(box, h("p", { class: "error-title", text: title }), items.length ? h("ul", {}, items) : null);
  box.hidden = false;
}
