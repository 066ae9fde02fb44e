// tessera demo frontend: plain JavaScript, no build step.
//
// It uses tessera's cookie transport: tessera sets an HttpOnly `session` cookie and a
// script-readable `csrf` cookie at login. Every request says `credentials: "include"` so the
// browser sends them cross-origin, and every state-changing request (POST, PUT, PATCH, DELETE)
// repeats the csrf cookie's value in the `X-CSRF-Token` header. The access token in the login
// response is deliberately ignored: nothing is kept in localStorage.
"use strict";

// tessera's base URL: `?api=http://host:port` on this page's address, else the one serve.py
// names in config.js (pages opened from a mailed link carry no `?api=`), else this default.
// (A real frontend hard-codes its own auth origin instead of taking it from the address.)
const DEFAULT_API = "http://127.0.0.1:8000";
const API = apiBase();
let policyVersion; // the current policy version, sent with a registration

function apiBase() {
  const raw = new URLSearchParams(window.location.search).get("api")
    || window.TESSERA_API || DEFAULT_API;
  let url;
  try {
    url = new URL(raw);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  return url.origin + url.pathname.replace(/\/+$/, "");
}

// ---- cookies and requests --------------------------------------------------------------

function readCookie(name) {
  for (const part of document.cookie.split(";")) {
    const eq = part.indexOf("=");
    if (eq > 0 && part.slice(0, eq).trim() === name) return part.slice(eq + 1).trim();
  }
  return null;
}

// Over HTTPS the cookie is `__Host-csrf`; in local development (TESSERA_COOKIE_SECURE=false)
// it is `csrf`. Cookies are not scoped by port, so a page on another port of the same host
// reads the cookie tessera set.
function csrfToken() {
  return readCookie("__Host-csrf") ?? readCookie("csrf");
}

class ApiError extends Error {
  constructor(status, problem) {
    const detail = problem && typeof problem === "object" ? problem.detail : String(problem);
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.code = problem && typeof problem === "object" ? problem.code : undefined;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (!["GET", "HEAD"].includes(method)) {
    const token = csrfToken();
    if (token) headers["X-CSRF-Token"] = token;
  }
  let response;
  try {
    response = await fetch(API + path, {
      method,
      headers,
      credentials: "include",
      cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    throw new ApiError(0, {
      code: "unreachable",
      detail: `Cannot reach tessera at ${API}: is it running, and does it allow this page's ` +
        `origin (TESSERA_CORS_ORIGINS=${window.location.origin})?`,
    });
  }
  showTracking(response.headers.get("Tk"));
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// ---- rendering --------------------------------------------------------------------------

const $ = (selector) => document.querySelector(selector);

function setStatus(text, kind = "info") {
  const status = $("#status");
  status.textContent = text;
  status.dataset.kind = kind;
}

function showError(err) {
  const code = err.status && err.code ? ` (${err.status} ${err.code})` : "";
  setStatus(`${err.message}${code}`, "error");
}

function showTracking(tk) {
  if (!tk) return;
  const meaning = { T: "T: tracked", N: "N: not tracked (Do-Not-Track / GPC honoured)" };
  $("#tk").textContent = meaning[tk] || tk;
}

const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const formatDate = (value) => (value ? dateFormat.format(new Date(value)) : "–");

function describeAgent(ua) {
  if (!ua) return "unknown browser";
  const browsers = [
    [/Edg\/(\d+)/, "Edge"], [/OPR\/(\d+)/, "Opera"], [/Firefox\/(\d+)/, "Firefox"],
    [/HeadlessChrome\/(\d+)/, "Chrome (headless)"], [/Chrom(?:e|ium)\/(\d+)/, "Chrome"],
    [/Version\/(\d+).*Safari/, "Safari"],
  ];
  const systems = [
    [/Android/, "Android"], [/iPhone|iPad/, "iOS"], [/Windows/, "Windows"],
    [/Mac OS X/, "macOS"], [/Linux/, "Linux"],
  ];
  const browser = browsers.find(([re]) => re.test(ua));
  const system = systems.find(([re]) => re.test(ua));
  if (!browser) return ua.length > 40 ? `${ua.slice(0, 40)}…` : ua;
  const name = `${browser[1]} ${ua.match(browser[0])[1]}`;
  return system ? `${name} on ${system[1]}` : name;
}

function describeConsents(consents) {
  const granted = Object.entries(consents || {})
    .filter(([, value]) => value && value.granted)
    .map(([name]) => name.replace("_", " "));
  return granted.length ? granted.join(", ") : "none granted";
}

function showLoggedOut() {
  $("#logged-in").hidden = true;
  $("#logged-out").hidden = false;
  $("#who").textContent = "not logged in";
  $("#who").dataset.state = "out";
  $("#sessions tbody").replaceChildren();
}

function showLoggedIn(me) {
  $("#logged-out").hidden = true;
  $("#logged-in").hidden = false;
  $("#who").textContent = me.email;
  $("#who").dataset.state = "in";
  $("#me-email").textContent = me.email;
  $("#me-verified").textContent = me.email_verified ? "yes" : "not yet";
  $("#me-pending").textContent = me.pending_email ?? "–";
  $("#me-id").textContent = me.id;
  $("#me-created").textContent = formatDate(me.created_at);
  $("#me-policy").textContent = me.policy_version ?? "–";
  $("#me-consents").textContent = describeConsents(me.consents);
}

function sessionRow(session) {
  const row = document.createElement("tr");
  const browser = document.createElement("td");
  browser.textContent = describeAgent(session.user_agent);
  browser.title = session.user_agent || "";
  if (session.current) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "this browser";
    browser.append(" ", badge);
    row.classList.add("current");
  }
  const started = document.createElement("td");
  started.textContent = formatDate(session.created_at);
  const expires = document.createElement("td");
  expires.textContent = formatDate(session.expires_at);
  const action = document.createElement("td");
  const end = document.createElement("button");
  end.type = "button";
  end.className = "secondary small";
  end.textContent = "End";
  end.setAttribute("aria-label", session.current ? "End this session" : "End session");
  end.addEventListener("click", () => endSession(session, end));
  action.append(end);
  row.dataset.sessionId = session.id;
  row.append(browser, started, expires, action);
  return row;
}

// ---- actions ----------------------------------------------------------------------------

// Asks GET /me who is logged in; answers with its HTTP status (200, 401, ...).
async function refresh() {
  try {
    showLoggedIn(await api("GET", "/me"));
  } catch (err) {
    showLoggedOut();
    if (err.status !== 401) showError(err);
    return err.status;
  }
  try {
    await loadSessions();
  } catch (err) {
    showError(err); // e.g. 403 policy_consent_required: GET /me answers, the rest waits
  }
  return 200;
}

async function loadSessions() {
  const sessions = await api("GET", "/auth/sessions");
  sessions.sort((a, b) => Number(b.current) - Number(a.current)
    || String(b.created_at).localeCompare(String(a.created_at)));
  $("#sessions tbody").replaceChildren(...sessions.map(sessionRow));
}

async function loadPolicy() {
  try {
    const policy = await api("GET", "/policy");
    $("#policy-version").textContent = `(version ${policy.version})`;
    return policy.version;
  } catch (err) {
    showError(err);
    return undefined;
  }
}

async function busy(button, work) {
  button.disabled = true;
  try {
    await work();
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function onRegister(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    const body = {
      email: form.email.value.trim(),
      password: form.password.value,
      is_adult: form.is_adult.checked,
    };
    if (policyVersion) body.policy_version = policyVersion;
    const user = await api("POST", "/auth/register", body);
    form.reset();
    $("#login-email").value = user.email;
    $("#login-password").focus();
    setStatus(`Account created for ${user.email}. You can log in now.`, "ok");
  });
}

function onLogin(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    await api("POST", "/auth/login", { email: form.email.value.trim(), password: form.password.value });
    form.password.value = "";
    if (await refresh() === 200) setStatus("Logged in.", "ok");
  });
}

function onLogout(event) {
  busy(event.currentTarget, async () => {
    await api("POST", "/auth/logout");
    const status = await refresh();
    if (status === 401) {
      setStatus("Logged out: the session is deleted on the server, GET /me now answers 401.", "ok");
    }
  });
}

function endSession(session, button) {
  busy(button, async () => {
    await api("DELETE", `/auth/sessions/${encodeURIComponent(session.id)}`);
    if (session.current) {
      await refresh();
      setStatus("This browser's session was ended: you are logged out.", "ok");
    } else {
      await loadSessions();
      setStatus("Session ended: that device is logged out.", "ok");
    }
  });
}

// ---- mail links: /verify-email, /reset-password, /confirm-email with #token=… ----------------
// The token travels in the fragment (never sent to a server); it is read once, put into the
// matching form and wiped from the address bar.

function tokenFromLink() {
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (!token) return;
  const field = {
    "/verify-email": "#verify-token",
    "/reset-password": "#reset-token",
    "/confirm-email": "#confirm-email-token",
  }[window.location.pathname];
  history.replaceState(null, "", window.location.pathname + window.location.search);
  if (!field) return;
  $(field).value = token;
  $(field).closest("form").scrollIntoView();
  setStatus("The code from your mail is filled in below.", "info");
}

function onForgot(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    await api("POST", "/auth/password-reset", { email: form.email.value.trim() });
    setStatus("If this address has an account, a reset mail is on its way.", "ok");
  });
}

function onReset(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    await api("POST", "/auth/password-reset/confirm",
      { token: form.token.value.trim(), new_password: form.new_password.value });
    form.reset();
    setStatus("Password changed; every session was ended. Log in with the new password.", "ok");
  });
}

function onVerify(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    await api("POST", "/auth/verify-email", { token: form.token.value.trim() });
    form.token.value = "";
    await refresh();
    setStatus("Your email address is verified.", "ok");
  });
}

function onResend(event) {
  busy(event.currentTarget, async () => {
    await api("POST", "/auth/verify-email/resend", { email: $("#resend-email").value.trim() });
    setStatus("If this address needs verifying, a new mail is on its way.", "ok");
  });
}

function onChangeEmail(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    const me = await api("PATCH", "/me",
      { email: form.email.value.trim(), current_password: form.current_password.value });
    form.reset();
    showLoggedIn(me);
    setStatus(me.pending_email
      ? `A confirmation mail went to ${me.pending_email}; the email changes once you confirm.`
      : "That is already your email.", "ok");
  });
}

function onConfirmEmail(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    const me = await api("POST", "/me/email/confirm", { token: form.token.value.trim() });
    form.reset();
    await refresh();
    setStatus(`Your email is now ${me.email}.`, "ok");
  });
}

async function main() {
  if (!API) {
    $("#api-base").textContent = "?";
    $("#who").textContent = "no tessera";
    setStatus("The api parameter must be an http(s) URL, e.g. ?api=http://127.0.0.1:8000", "error");
    return;
  }
  $("#api-base").textContent = API;
  $("#register-form").addEventListener("submit", onRegister);
  $("#login-form").addEventListener("submit", onLogin);
  $("#logout").addEventListener("click", onLogout);
  $("#forgot-form").addEventListener("submit", onForgot);
  $("#reset-form").addEventListener("submit", onReset);
  $("#verify-form").addEventListener("submit", onVerify);
  $("#resend").addEventListener("click", onResend);
  $("#change-email-form").addEventListener("submit", onChangeEmail);
  $("#confirm-email-form").addEventListener("submit", onConfirmEmail);
  tokenFromLink();
  $("#refresh-sessions").addEventListener("click", (event) => busy(event.currentTarget, loadSessions));
  policyVersion = await loadPolicy();
  await refresh();
  document.body.dataset.ready = "true";
}

main();
