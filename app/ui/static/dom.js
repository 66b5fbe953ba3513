// Building the page from data. Text always becomes a text node and attributes are set one by one, so a
// file name or model output can never turn into markup (nothing here parses HTML).

const SVG_NS = "http://www.w3.org/2000/svg";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);

/** h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child) */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  let value;
  for (const [key, prop] of Object.entries(props)) {
    if (prop === undefined || prop === null || prop === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), prop);
    else if (key === "value")
      value = prop; // set once the options of a <select> exist
    else el.setAttribute(key, prop === true ? "" : String(prop));
  }
  append(el, children);
  if (value !== undefined) el.value = String(value);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return append(el, children);
}

export const isFinal = (status) => FINAL.has(status);

export function badge(status) {
  return h("span", { class: `badge ${status}`, "data-status": status }, status.replaceAll("_", " "));
}

export function time(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "—";
}

export function number(x, digits = 4) {
  if (typeof x !== "number") return "—";
  return Number.isInteger(x) ? String(x) : x.toPrecision(digits);
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

/** A box that shows an error (the server's message, its code and field) or nothing. */
export function errorBox() {
  const el = h("div", { class: "error", role: "alert", hidden: true });
  el.show = (error) => {
    const where = [error.code, error.param && `field: ${error.param}`].filter(Boolean).join(", ");
    el.replaceChildren(error.message, where ? h("span", { class: "muted" }, ` (${where})`) : "");
    el.hidden = false;
  };
  el.clear = () => {
    el.replaceChildren();
    el.hidden = true;
  };
  return el;
}

/** Runs `fn` now and again `ms` after each run ends, until `signal` aborts or `fn` returns false. */
export function every(ms, fn, signal) {
  const run = async () => {
    if (signal.aborted) return;
    let again = true;
    try {
      again = (await fn()) !== false;
    } catch (error) {
      if (error.name === "AbortError") return;
      console.error(error);
    }
    if (again && !signal.aborted) setTimeout(run, ms);
  };
  run();
}
