// The header's sign-in box. The key is kept in sessionStorage: it lives as long as the tab,
// is never written to disk by the page, and is sent only as "Authorization: Bearer".
import { $, apiKey } from "./common.js";

/**
 * Wire #signin-form / #signed-in. onChange(key) runs once at start (key may be "") and after
 * every sign-in or sign-out. Returns {focus(), reject(message)}: reject forgets a key the
 * service did not recognise and asks for another.
 */
export function setupSignIn(onChange) {
  const form = $("#signin-form");
  const input = $("#api-key");
  const error = $("#signin-error");
  const signedIn = $("#signed-in");
  const signOut = $("#signout");

  function show() {
    const key = apiKey.get();
    form.hidden = Boolean(key);
    signedIn.hidden = !key;
  }

  function setError(message) {
    error.textContent = message;
    error.hidden = !message;
    if (message) input.setAttribute("aria-invalid", "true");
    else input.removeAttribute("aria-invalid");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      setError("Enter your API key.");
      input.focus();
      return;
    }
    setError("");
    apiKey.set(key);
    input.value = "";
    show();
    signOut.focus();
    onChange(key);
  });

  signOut.addEventListener("click", () => {
    apiKey.clear();
    show();
    input.focus();
    onChange("");
  });

  show();
  onChange(apiKey.get());
  return {
    focus: () => (apiKey.get() ? signOut : input).focus(),
    reject(message) {
      apiKey.clear();
      show();
      setError(message);
      input.focus();
    },
  };
}
