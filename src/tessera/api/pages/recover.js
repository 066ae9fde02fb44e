// tessera's own pages for mailed links (TESSERA_PUBLIC_URL left at tessera itself):
// /verify-email, /reset-password and /confirm-email. The token comes in the link's
// fragment (#token=…), never sent to a server; it is put into the form and wiped from the
// address bar. The form posts it to tessera's API on this same origin.
"use strict";

const ACTIONS = {
  "verify-email": { path: "/auth/verify-email", done: "Your email address is verified." },
  "reset-password": {
    path: "/auth/password-reset/confirm",
    done: "Your password is changed and every session has ended. Log in with the new password.",
  },
  "confirm-email": { path: "/me/email/confirm", done: "Your new email address is confirmed." },
};

function setStatus(text, kind) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.dataset.kind = kind;
}

function main() {
  const name = window.location.pathname.replace(/^\/+|\/+$/g, "");
  const action = ACTIONS[name];
  const form = document.getElementById(name);
  if (!action || !form) return;
  form.hidden = false;
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (token) {
    form.token.value = token;
    history.replaceState(null, "", window.location.pathname);
  }
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    for (const field of form.elements) {
      if (field.name) body[field.name] = field.name === "token" ? field.value.trim() : field.value;
    }
    const button = form.querySelector("button");
    button.disabled = true;
    try {
      const response = await fetch(action.path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        credentials: "omit",
        body: JSON.stringify(body),
      });
      if (response.ok) {
        form.hidden = true;
        setStatus(action.done, "ok");
      } else {
        const problem = await response.json().catch(() => ({}));
        setStatus(`${problem.detail || "That did not work."} (${problem.code || response.status})`,
          "error");
      }
    } catch {
      setStatus("tessera cannot be reached; try again.", "error");
    } finally {
      button.disabled = false;
    }
  });
  document.body.dataset.ready = "true";
}

main();
