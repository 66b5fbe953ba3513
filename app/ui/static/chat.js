// The playground: a conversation with any of the tenant's models, each reply streamed in as it is generated.

import { get, stream } from "./api.js";
import { errorBox, h } from "./dom.js";

export function chatView(root, signal, model) {
  const error = errorBox();
  const models = h("select", { id: "chat-model", name: "model" });
  const system = h("textarea", { id: "chat-system", rows: 2, placeholder: "optional" });
  const temperature = h("input", {
    id: "chat-temperature",
    type: "number",
    min: 0,
    max: 2,
    step: "any",
    value: 0.7,
  });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, step: 1, value: 128 });
  const log = h("div", { id: "chat-log", class: "chat-log", "aria-live": "polite" });
  const prompt = h("textarea", { id: "chat-input", rows: 3, placeholder: "Say something…", required: true });
  const send = h("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", disabled: true }, "Stop");
  let history = [];
  let running = null;

  stop.addEventListener("click", () => running?.abort());
  const clear = h(
    "button",
    {
      type: "button",
      onclick: () => {
        history = [];
        log.replaceChildren();
      },
    },
    "Clear",
  );
  const form = h(
    "form",
    { id: "chat", class: "chat" },
    h(
      "div",
      { class: "chat-settings" },
      label("Model", models),
      label("Temperature", temperature),
      label("Max tokens", maxTokens),
      label("System prompt", system),
    ),
    log,
    prompt,
    h("div", { class: "actions" }, send, stop, clear),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.clear();
    const user = { role: "user", content: prompt.value };
    const messages = [...(system.value ? [{ role: "system", content: system.value }] : []), ...history, user];
    log.append(bubble("user", user.content));
    const reply = bubble("assistant", "");
    log.append(reply);
    prompt.value = "";
    running = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    try {
      const body = {
        model: models.value,
        messages,
        stream: true,
        temperature: Number(temperature.value),
        max_tokens: Number.parseInt(maxTokens.value, 10),
      };
      await stream("/v1/chat/completions", {
        json: body,
        signal: AbortSignal.any([signal, running.signal]),
        onEvent: ({ data }) => {
          if (data === "[DONE]") return false;
          const chunk = JSON.parse(data);
          if (chunk.error) throw Object.assign(new Error(chunk.error.message), chunk.error);
          const text = chunk.choices?.[0]?.delta?.content;
          if (text) reply.text.append(text);
        },
      });
      history.push(user, { role: "assistant", content: reply.text.textContent });
    } catch (e) {
      if (e.name !== "AbortError") error.show(e);
      else history.push(user, { role: "assistant", content: reply.text.textContent });
    } finally {
      reply.dataset.done = "true";
      running = null;
      send.disabled = false;
      stop.disabled = true;
    }
  });
  root.append(h("h1", {}, "Playground"), error, form);

  get("/v1/models", { signal })
    .then((list) => {
      const ids = list.data.map((m) => m.id);
      // A checkpoint's model id is callable too, though /v1/models does not list it.
      if (model && !ids.includes(model)) ids.unshift(model);
      models.append(...ids.map((id) => h("option", { value: id }, id)));
      if (model) models.value = model;
    })
    .catch((e) => e.name !== "AbortError" && error.show(e));
}

function label(text, control) {
  return h("label", {}, h("span", {}, text), control);
}

function bubble(role, content) {
  const text = h("div", { class: "text" }, content);
  const el = h(
    "div",
    { class: `bubble ${role}`, "data-role": role },
    h("div", { class: "role" }, role),
    text,
  );
  el.text = text;
  return el;
}
