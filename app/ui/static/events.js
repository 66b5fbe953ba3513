// A job's events: read whole, oldest first, then followed live until the job ends.

import { get, pages, stream } from "./api.js";
import { h, isFinal, number, time } from "./dom.js";

// After a dropped stream or a failed read, the page waits before reading on: RETRY_MS, doubled after each
// failure in a row up to MAX_RETRY_MS (so a server that is down or refusing streams is not hammered), and
// back to RETRY_MS once events flow again.
const RETRY_MS = 2000;
const MAX_RETRY_MS = 60_000;

/** Calls onEvent for every event of the job, oldest first, until the job ends or `signal` aborts. */
export async function followEvents(base, signal, onEvent) {
  let last = null;
  let wait = RETRY_MS;
  const deliver = (event) => {
    last = event.id;
    wait = RETRY_MS; // events came: the next drop is a fresh one
    onEvent(event);
  };
  while (!signal.aborted) {
    let ended = false;
    try {
      // The status is read before the events: when it is already final, the pages below hold every event.
      const { status } = await get(base, { signal });
      for await (const page of pages(`${base}/events?order=asc`, { signal, after: last }))
        page.forEach(deliver);
      if (isFinal(status)) return;
      const after = last ? `&after=${encodeURIComponent(last)}` : "";
      await stream(`${base}/events?stream=true${after}`, {
        signal,
        onEvent: ({ event, data }) => {
          if (event === "done") {
            ended = true;
            return false;
          }
          deliver(JSON.parse(data));
        },
      });
    } catch (e) {
      if (e.name === "AbortError") return;
      // A 4xx other than 429 will not change by asking again (the job is gone, the key refused).
      if (e.status >= 400 && e.status < 500 && e.status !== 429) throw e;
      console.warn(`event stream interrupted; reading on in ${wait / 1000} s`, e);
    }
    if (ended) return;
    // The stream dropped (a restart, a proxy's timeout, the tenant's stream limit): read on from `last`.
    await sleep(wait, signal);
    wait = Math.min(wait * 2, MAX_RETRY_MS);
  }
}

/** Resolves after `ms`, or at once when `signal` aborts (a page left mid-wait leaves no timer behind). */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
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
