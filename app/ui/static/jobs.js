// The jobs table, polled while it is on screen.

import { get } from "./api.js";
import { badge, errorBox, every, h, time } from "./dom.js";

const POLL_MS = 3000;

export function jobsView(root, signal) {
  const error = errorBox();
  const body = h("tbody");
  const more = h("p", { class: "muted", hidden: true }, "Showing the newest 100 jobs.");
  root.append(
    h("h1", {}, "Fine-tuning jobs"),
    error,
    h(
      "table",
      { id: "jobs" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Job", "Status", "Model", "Fine-tuned model", "Progress", "Created"].map((c) => h("th", {}, c)),
        ),
      ),
      body,
    ),
    more,
  );
  every(
    POLL_MS,
    async () => {
      try {
        const page = await get("/v1/fine_tuning/jobs?limit=100", { signal });
        error.clear();
        body.replaceChildren(...page.data.map(row));
        if (!page.data.length)
          body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No jobs yet.")));
        more.hidden = !page.has_more;
      } catch (e) {
        if (e.name !== "AbortError") error.show(e);
      }
    },
    signal,
  );
}

function row(job) {
  return h(
    "tr",
    { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
    h("td", {}, badge(job.status)),
    h("td", {}, job.model),
    h("td", {}, job.fine_tuned_model ?? "—"),
    h("td", {}, `${job.progress.percent}%`),
    h("td", {}, time(job.created_at)),
  );
}
