// The API from the browser: every call sends the key as `Authorization: Bearer`, errors keep the server's
// OpenAI-shaped body, and streams are read from fetch (EventSource cannot send an Authorization header).

const KEY = "phitune.apiKey";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY) ?? localStorage.getItem(KEY),
  set(key, remember) {
    this.clear();
    (remember ? localStorage : sessionStorage).setItem(KEY, key);
  },
  clear() {
    sessionStorage.removeItem(KEY);
    localStorage.removeItem(KEY);
  },
};

class ApiError extends Error {
  constructor(status, error) {
    super(error.message ?? `The server answered ${status}`);
    this.status = status;
    this.code = error.code ?? null;
    this.param = error.param ?? null;
    this.details = error.details ?? [];
  }
}

async function request(path, { method = "GET", json, form, signal, accept, key } = {}) {
  const headers = { Authorization: `Bearer ${key ?? apiKey.get() ?? ""}` };
  let body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  if (accept) headers.Accept = accept;
  const response = await fetch(path, { method, headers, body, signal });
  if (response.ok) return response;
  let error = {};
  try {
    error = (await response.json()).error ?? {};
  } catch {
    // not JSON (a proxy's error page): the status says enough
  }
  if (response.status === 401 && key === undefined) {
    // The stored key stopped working (revoked, expired): the app goes back to the sign-in form.
    window.dispatchEvent(new CustomEvent("phitune:unauthorized", { detail: error.message }));
  }
  throw new ApiError(response.status, error);
}

export async function get(path, options) {
  return (await request(path, options)).json();
}

export async function post(path, json, options = {}) {
  return (await request(path, { ...options, method: "POST", json })).json();
}

export async function upload(path, form) {
  return (await request(path, { method: "POST", form })).json();
}

/** Checks a key before it is kept: resolves when the API accepts it, else throws the server's error. */
export async function checkKey(key) {
  await request("/v1/fine_tuning/jobs?limit=1", { key });
}

/** Every page of a list route, oldest first where the route takes `order=asc`. */
export async function* pages(path, { signal, after } = {}) {
  const sep = path.includes("?") ? "&" : "?";
  for (;;) {
    const page = await get(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`, {
      signal,
    });
    yield page.data;
    if (!page.has_more) return;
    after = page.last_id;
  }
}

/** Fetches a download with the key and saves it under the server's file name. */
export async function download(path) {
  const response = await request(path);
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = fileName(response.headers.get("Content-Disposition")) ?? "download";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function fileName(disposition) {
  const encoded = /filename\*=utf-8''([^;]+)/i.exec(disposition ?? "");
  if (encoded) return decodeURIComponent(encoded[1]);
  return /filename="([^"]+)"/i.exec(disposition ?? "")?.[1] ?? null;
}

/**
 * Opens a server-sent event stream (GET, or POST with `json`) and calls onEvent({id, event, data}) for each
 * event until the stream ends or onEvent returns false. The server ends lines with "\n" only.
 */
export async function stream(path, { json, signal, onEvent }) {
  const method = json === undefined ? "GET" : "POST";
  const response = await request(path, { method, json, signal, accept: "text/event-stream" });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event && onEvent(event) === false) return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  const event = { id: null, event: "message", data: [] };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") event.data.push(value);
    else if (field === "id" || field === "event") event[field] = value;
  }
  return event.data.length ? { ...event, data: event.data.join("\n") } : null;
}
