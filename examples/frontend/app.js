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
    this.problem = problem && typeof problem === "object" ? problem : {};
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
    await loadFactors();
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

let mfaToken = null; // between the password and the second factor (POST /auth/login/mfa)

function onLogin(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), async () => {
    try {
      await api("POST", "/auth/login", { email: form.email.value.trim(), password: form.password.value });
    } catch (err) {
      if (err.code !== "mfa_required") throw err;
      form.password.value = "";
      askSecondFactor(err.problem);
      return;
    }
    form.password.value = "";
    if (await refresh() === 200) setStatus("Logged in.", "ok");
  });
}

function askSecondFactor(problem) {
  mfaToken = problem.mfa_token;
  const methods = problem.methods || [];
  $("#mfa-form").hidden = false;
  $("#mfa-passkey").hidden = !methods.includes("passkey");
  $("#mfa-code").focus();
  setStatus(`Password right: now a second factor (${methods.join(", ")}).`, "info");
}

async function finishSecondStep(body) {
  await api("POST", "/auth/login/mfa", { mfa_token: mfaToken, ...body });
  mfaToken = null;
  $("#mfa-form").reset();
  $("#mfa-form").hidden = true;
  if (await refresh() === 200) setStatus("Logged in with a second factor.", "ok");
}

function onMfaCode(event) {
  event.preventDefault();
  const form = event.currentTarget;
  busy(form.querySelector("button"), () => finishSecondStep({ code: form.code.value.trim() }));
}

// ---- passkeys (WebAuthn) -----------------------------------------------------------------

function withoutChallengeId(options) {
  const { challenge_id: _, ...rest } = options;
  return rest;
}

// A fresh assertion from one of this user's passkeys (or any, for a passkey login).
async function passkeyAssertion() {
  const options = await api("POST", "/auth/passkey/options", {});
  const publicKey = PublicKeyCredential.parseRequestOptionsFromJSON(withoutChallengeId(options));
  const credential = await navigator.credentials.get({ publicKey });
  return { challenge_id: options.challenge_id, credential: credential.toJSON() };
}

function onPasskeyLogin(event) {
  busy(event.currentTarget, async () => {
    try {
      await api("POST", "/auth/passkey/login", await passkeyAssertion());
    } catch (err) {
      if (err.code !== "mfa_required") throw err;
      askSecondFactor(err.problem);
      return;
    }
    if (await refresh() === 200) setStatus("Logged in with a passkey.", "ok");
  });
}

function onMfaPasskey(event) {
  busy(event.currentTarget, async () => finishSecondStep(await passkeyAssertion()));
}

// ---- second factors of the logged-in user ------------------------------------------------

let factors = { totp: false, passkeys: [], recovery_codes_left: 0 };

async function loadFactors() {
  factors = await api("GET", "/me/mfa");
  $("#totp-state").textContent = factors.totp ? "on" : "off";
  $("#recovery-left").textContent = String(factors.recovery_codes_left);
  $("#totp-start").hidden = factors.totp;
  $("#totp-disable").hidden = !factors.totp;
  $("#recovery-new").hidden = !(factors.totp || factors.passkeys.length);
  $("#passkeys").replaceChildren(...factors.passkeys.map(passkeyItem));
}

function passkeyItem(key) {
  const item = document.createElement("li");
  item.dataset.passkeyId = key.id;
  const used = key.last_used_at ? `last used ${formatDate(key.last_used_at)}` : "not used yet";
  item.textContent = `${key.name} (added ${formatDate(key.created_at)}, ${used}) `;
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary small";
  remove.textContent = "Remove";
  remove.setAttribute("aria-label", `Remove passkey ${key.name}`);
  remove.addEventListener("click", () => busy(remove, async () => {
    await api("DELETE", `/me/passkeys/${encodeURIComponent(key.id)}`,
      { current_password: $("#factor-password").value, ...await factorProof() });
    await loadFactors();
    setStatus(`Passkey ${key.name} removed.`, "ok");
  }));
  item.append(remove);
  return item;
}

// What a change needs once a factor is on: the code typed, else a passkey assertion.
async function factorProof() {
  const code = $("#factor-code").value.trim();
  if (code) return { code };
  if (factors.passkeys.length) return passkeyAssertion();
  return {};
}

function showRecoveryCodes(codes) {
  $("#recovery-codes").replaceChildren(...codes.map((code) => {
    const item = document.createElement("li");
    item.textContent = code;
    return item;
  }));
  $("#recovery").hidden = false;
}

async function showQr(uri) {
  // The page's own server draws it (segno), so the secret goes nowhere else.
  const image = $("#totp-qr");
  image.hidden = true;
  try {
    const response = await fetch("/qr", { method: "POST", body: uri, cache: "no-store" });
    if (!response.ok) return;
    image.src = await response.text();
    image.hidden = false;
  } catch {
    // no QR: the secret is shown to type in
  }
}

function onTotpStart(event) {
  busy(event.currentTarget, async () => {
    const enrolment = await api("POST", "/me/mfa/totp",
      { current_password: $("#factor-password").value, ...await factorProof() });
    $("#totp-secret").textContent = enrolment.secret;
    $("#totp-uri").href = enrolment.otpauth_uri;
    $("#totp-setup").hidden = false;
    await showQr(enrolment.otpauth_uri);
    $("#totp-code").focus();
    setStatus("Scan the QR code, then enter the first code.", "info");
  });
}

function onTotpConfirm(event) {
  busy(event.currentTarget, async () => {
    const answer = await api("POST", "/me/mfa/totp/confirm", { code: $("#totp-code").value.trim() });
    $("#totp-setup").hidden = true;
    $("#totp-code").value = "";
    showRecoveryCodes(answer.recovery_codes);
    await loadFactors();
    setStatus("Authenticator app on. Write down the recovery codes.", "ok");
  });
}

function onTotpDisable(event) {
  busy(event.currentTarget, async () => {
    await api("DELETE", "/me/mfa/totp",
      { current_password: $("#factor-password").value, ...await factorProof() });
    await loadFactors();
    setStatus("Authenticator app off.", "ok");
  });
}

function onRecoveryNew(event) {
  busy(event.currentTarget, async () => {
    const answer = await api("POST", "/me/mfa/recovery-codes",
      { current_password: $("#factor-password").value, ...await factorProof() });
    showRecoveryCodes(answer.recovery_codes);
    await loadFactors();
    setStatus("New recovery codes: the old ones no longer work.", "ok");
  });
}

function onPasskeyAdd(event) {
  busy(event.currentTarget, async () => {
    const options = await api("POST", "/me/passkeys/options");
    const publicKey = PublicKeyCredential.parseCreationOptionsFromJSON(withoutChallengeId(options));
    const credential = await navigator.credentials.create({ publicKey });
    const name = $("#passkey-name").value.trim() || "passkey";
    // Adding a factor needs the password and, where one is enrolled, a second factor.
    const proof = await factorProof();
    const factor = proof.credential
      ? { assertion_challenge_id: proof.challenge_id, assertion: proof.credential }
      : proof;
    await api("POST", "/me/passkeys",
      { challenge_id: options.challenge_id, credential: credential.toJSON(), name,
        current_password: $("#factor-password").value, ...factor });
    await loadFactors();
    setStatus(`Passkey "${name}" added.`, "ok");
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
  $("#mfa-form").addEventListener("submit", onMfaCode);
  $("#mfa-passkey").addEventListener("click", onMfaPasskey);
  $("#passkey-login").addEventListener("click", onPasskeyLogin);
  $("#totp-start").addEventListener("click", onTotpStart);
  $("#totp-confirm").addEventListener("click", onTotpConfirm);
  $("#totp-disable").addEventListener("click", onTotpDisable);
  $("#recovery-new").addEventListener("click", onRecoveryNew);
  $("#passkey-add").addEventListener("click", onPasskeyAdd);
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
