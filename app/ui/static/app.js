// The dashboard's shell: the sign-in form, the navigation and a view per location hash.

import { apiKey, checkKey } from "./api.js";
import { chatView } from "./chat.js";
import { datasetsView } from "./datasets.js";
import { errorBox, h } from "./dom.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { newJobView } from "./newjob.js";

const ROUTES = [
  [/^#\/jobs$/, (root, signal) => jobsView(root, signal)],
  [/^#\/jobs\/([^/]+)$/, (root, signal, id) => jobView(root, id, signal)],
  [/^#\/datasets$/, (root, signal) => datasetsView(root, signal)],
  [/^#\/new$/, (root, signal) => newJobView(root, signal)],
  [/^#\/chat(?:\/([^/]+))?$/, (root, signal, model) => chatView(root, signal, model)],
];

const root = document.getElementById("view");
const nav = document.getElementById("nav");
const signOut = document.getElementById("sign-out");
let current = new AbortController();

function render(message) {
  // Leaving a view stops its polls and streams.
  current.abort();
  current = new AbortController();
  root.replaceChildren();
  const signedIn = apiKey.get() !== null;
  nav.hidden = signOut.hidden = !signedIn;
  if (!signedIn) return signIn(message);
  for (const [pattern, view] of ROUTES) {
    const match = pattern.exec(location.hash);
    if (!match) continue;
    for (const link of nav.querySelectorAll("a"))
      link.classList.toggle("active", location.hash.startsWith(link.hash));
    let arg;
    try {
      arg = match[1] && decodeURIComponent(match[1]);
    } catch {
      break; // a malformed %-escape (a hand-edited link): the jobs, not a blank page
    }
    return view(root, current.signal, arg);
  }
  location.replace("#/jobs"); // an unknown, empty or malformed hash; hashchange renders the jobs
}

function signIn(message) {
  const error = errorBox();
  const key = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true });
  const remember = h("input", { id: "remember", type: "checkbox" });
  const form = h(
    "form",
    { id: "sign-in", class: "card" },
    h("h1", {}, "Sign in"),
    h(
      "p",
      { class: "muted" },
      "The dashboard calls the API with your API key (",
      h("code", {}, "phitune keys create"),
      ").",
    ),
    error,
    h("label", { for: "api-key" }, "API key"),
    key,
    h("label", { class: "inline" }, remember, " Remember on this device"),
    h("button", { type: "submit" }, "Sign in"),
  );
  if (message) error.show({ message });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.clear();
    try {
      await checkKey(key.value.trim());
    } catch (e) {
      return error.show(e);
    }
    apiKey.set(key.value.trim(), remember.checked);
    render();
  });
  root.append(form);
  key.focus();
}

signOut.addEventListener("click", () => {
  apiKey.clear();
  render();
});
window.addEventListener("phitune:unauthorized", (event) => {
  apiKey.clear();
  render(event.detail ?? "The API key was refused; sign in again.");
});
window.addEventListener("hashchange", () => render());
render();
