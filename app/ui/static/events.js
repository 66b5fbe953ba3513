// A job's events: read whole, oldest first, then followed live until the job ends.

import { get, pages, stream } from "./api.js";
import { h, isFinal, number, time } from "./dom.js";

const RETRY_MS = 3000;

/** Calls onEvent for every event of the job, oldest first, until the job ends or `signal` aborts. */
export async function followEvents(base, signal, onEvent) {
  let last = null;
  while (!signal.aborted) {
    // The status is read before the events: when it is already final, the pages below hold every event.
    const { status } = await get(base, { signal });
    for await (const page of pages(`${base}/events?order=asc`, { signal, after: last })) {
      for (const event of page) onEvent(event);
      last = page.at(-1)?.id ?? last;
    }
    if (isFinal(status)) return;
    let ended = false;
    try {
      const after = last ? `&after=${encodeURIComponent(last)}` : "";
      await stream(`${base}/events?stream=true${after}`, {
        signal,
        onEvent: ({ event, data }) => {
          if (event === "done") {
            ended = true;
            return false;
          }
          const parsed = JSON.parse(data);
          last = parsed.id;
          onEvent(parsed);
        },
      });
    } catch (e) {
      if (e.name === "AbortError") return;
      console.warn("event stream interrupted; reading on", e);
    }
    if (ended) return;
    // The stream dropped (a restart, a proxy's timeout, the tenant's stream limit): read on from `last`.
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

export function eventItem(event) {
  const d = event.data ?? {};
  const text =
    event.type === "metrics"
      ? [
          `step ${d.step}/${d.total_steps ?? "?"}`,
          `train loss ${number(d.train_loss)}`,
          d.eval_loss !== undefined && `eval loss ${number(d.eval_loss)}`,
          d.learning_rate !== undefined && `lr ${number(d.learning_rate, 3)}`,
        ]
          .filter(Boolean)
          .join(" · ")
      : event.message;
  return h(
    "li",
    { class: `event ${event.level}`, "data-type": event.type },
    h("time", {}, time(event.created_at)),
    " ",
    h("span", { class: `level ${event.level}` }, event.level),
    " ",
    text,
  );
}
