// One job: status, progress, actions, the live loss curve, checkpoints, downloads and events.

import { download, get, pages, post } from "./api.js";
import { LossChart } from "./chart.js";
import { eventItem, followEvents } from "./events.js";
import { badge, errorBox, every, h, isFinal, number, time } from "./dom.js";

const POLL_MS = 2000;
const MAX_EVENTS_SHOWN = 1000;

export function jobView(root, id, signal) {
  const base = `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
  const error = errorBox(); // the job's own reads
  const refused = errorBox(); // what the user asked for (an action, a download), kept until the next ask
  const chart = new LossChart();
  const summary = h("div", { id: "job-summary" });
  const actions = h("div", { class: "actions", id: "job-actions" });
  const downloads = h("div", { class: "actions", id: "job-downloads" });
  const checkpoints = h("tbody");
  const events = h("ol", { id: "events", class: "events", reversed: true });
  root.append(
    h("h1", {}, "Job ", h("code", {}, id)),
    error,
    summary,
    actions,
    refused,
    h("h2", {}, "Loss"),
    chart.el,
    h("h2", {}, "Adapter"),
    downloads,
    h("h2", {}, "Checkpoints"),
    h(
      "table",
      { id: "checkpoints" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Step", "Train loss", "Valid loss", "Model", "Download"].map((c) => h("th", {}, c)),
        ),
      ),
      checkpoints,
    ),
    h("h2", {}, "Events"),
    events,
  );

  let job = null;
  let lastStep = null;
  let actionsTaken = 0; // a poll answered from before the latest action must not undo what it showed
  const ask = (request) => async () => {
    refused.clear();
    try {
      await request();
    } catch (e) {
      refused.show(e);
    }
  };
  const act = (verb) =>
    ask(async () => {
      actionsTaken += 1;
      show(await post(`${base}/${verb}`, {}));
    });
  const save = (path) => ask(() => download(path));
  const formats = () => (job.peft_config.backend === "loralib" ? ["peft", "loralib"] : ["peft"]);

  function show(fresh) {
    job = fresh;
    summary.replaceChildren(...describe(job));
    actions.replaceChildren(
      h("button", { type: "button", onclick: act("cancel"), disabled: isFinal(job.status) }, "Cancel"),
      h(
        "button",
        {
          type: "button",
          onclick: act("pause"),
          disabled: !["queued", "running"].includes(job.status) || job.pause_requested,
        },
        "Pause",
      ),
      h(
        "button",
        {
          type: "button",
          onclick: act("resume"),
          disabled: !(job.status === "paused" || job.pause_requested),
        },
        "Resume",
      ),
    );
    downloads.replaceChildren(
      ...(job.status === "succeeded"
        ? [
            ...formats().map((f) =>
              h(
                "button",
                {
                  type: "button",
                  class: "download",
                  "data-format": f,
                  onclick: save(`${base}/adapter?format=${f}`),
                },
                `Download ${f} adapter`,
              ),
            ),
            ...job.result_files.map((fileId) =>
              h(
                "button",
                {
                  type: "button",
                  class: "download",
                  "data-result-file": fileId,
                  onclick: save(`/v1/files/${encodeURIComponent(fileId)}/content`),
                },
                "Metrics CSV",
              ),
            ),
            h(
              "a",
              { class: "button", href: `#/chat/${encodeURIComponent(job.fine_tuned_model)}` },
              "Chat with it",
            ),
          ]
        : [h("p", { class: "muted" }, "The adapter can be downloaded once the job has succeeded.")]),
    );
  }

  async function refreshCheckpoints() {
    const rows = [];
    for await (const page of pages(`${base}/checkpoints`, { signal })) rows.push(...page);
    checkpoints.replaceChildren(
      ...rows.map((c) =>
        h(
          "tr",
          { "data-checkpoint": c.id },
          h("td", {}, c.step_number),
          h("td", {}, number(c.metrics.train_loss)),
          h("td", {}, number(c.metrics.valid_loss)),
          h(
            "td",
            {},
            h(
              "a",
              { href: `#/chat/${encodeURIComponent(c.fine_tuned_model_checkpoint)}` },
              c.fine_tuned_model_checkpoint,
            ),
          ),
          h(
            "td",
            {},
            formats().map((f) =>
              h(
                "button",
                {
                  type: "button",
                  class: "download",
                  "data-format": f,
                  onclick: save(`${base}/adapter?checkpoint=${encodeURIComponent(c.id)}&format=${f}`),
                },
                f,
              ),
            ),
          ),
        ),
      ),
    );
    if (!rows.length)
      checkpoints.append(
        h(
          "tr",
          {},
          h("td", { colspan: 5, class: "muted" }, "No checkpoints (training_config.save_steps stores some)."),
        ),
      );
  }

  // The job and its checkpoints, polled until the job is final (then once more, for the last checkpoints).
  async function poll() {
    try {
      const before = actionsTaken;
      const fresh = await get(base, { signal });
      if (before === actionsTaken) show(fresh);
      error.clear();
      if (job.progress.step !== lastStep || isFinal(job.status)) {
        lastStep = job.progress.step;
        await refreshCheckpoints();
      }
    } catch (e) {
      if (e.name !== "AbortError") error.show(e);
    }
    return !job || !isFinal(job.status);
  }
  // Also read at once when an event comes, so status and progress keep up with the curve; one read at a
  // time, however many events arrive together.
  let reading = null;
  const refresh = () => (reading ??= poll().finally(() => (reading = null)));
  every(POLL_MS, refresh, signal);
  followEvents(base, signal, (event) => {
    refresh();
    if (event.type === "metrics" && event.data) chart.add(event.data);
    events.prepend(eventItem(event));
    events.children[MAX_EVENTS_SHOWN]?.remove();
  }).catch((e) => e.name !== "AbortError" && error.show(e));
}

function describe(job) {
  const p = job.progress;
  const progress = h("progress", { max: 100, value: p.percent, id: "job-progress" });
  const facts = [
    [
      "Status",
      [
        badge(job.status),
        job.pause_requested ? " (pause requested)" : "",
        job.cancel_requested && !isFinal(job.status) ? " (cancel requested)" : "",
      ],
    ],
    ["Progress", [progress, ` step ${p.step}${p.total_steps ? ` / ${p.total_steps}` : ""} · ${p.percent}%`]],
    ["Model", job.model],
    ["Fine-tuned model", job.fine_tuned_model ?? "—"],
    ["Training file", job.training_file],
    ["Validation file", job.validation_file ?? "—"],
    ["Created", time(job.created_at)],
    ["Finished", time(job.finished_at)],
    ["Trained tokens", job.trained_tokens ?? "—"],
    ["Attempt", job.attempt],
  ];
  if (job.error)
    facts.push(["Error", h("span", { class: "error-text" }, `${job.error.code}: ${job.error.message}`)]);
  return [
    h(
      "dl",
      { class: "facts" },
      facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
    ),
    recipe(job),
  ];
}

function recipe(job) {
  const text = JSON.stringify(
    { training_config: job.training_config, peft_config: job.peft_config },
    null,
    2,
  );
  return h("details", {}, h("summary", {}, "Recipe"), h("pre", {}, text));
}
